"""Data-driven merging: RegMean, RegMean++ and Fisher merging, their statistics, and the recipe plumbing.

The maths is checked against independent references: RegMean against least squares over the models' stacked
inputs (torch.linalg.lstsq), the measured Gram matrices against the layer inputs computed by hand, the
Fisher against the closed-form gradient of a softmax regression. End to end, RegMean must beat plain
averaging on the digits fine-tunes and on two tiny BERT keyword tasks (held-out data).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from suture.merge.calibrate import ModelData, collect_fisher, collect_gram, sequential_gram
from suture.merge.data import CalibrationData
from suture.merge.errors import InputError, RecipeError
from suture.merge.methods import MergeInputs, get_method, run_method
from suture.merge.methods.regmean import regmean_linear
from suture.recipes.runner import run_recipe
from suture.recipes.schema import parse_recipe

F64 = torch.float64


def _merge(method, tensors, stats, **params):
    return run_method(method, MergeInputs("w", tensors, [{} for _ in tensors], params, stats=stats))


def _gram(x):
    return {"gram": x.T @ x / x.shape[0], "count": x.shape[0]}


# ------------------------------------------------------------------------------------------ RegMean maths
def test_regmean_equals_least_squares_over_the_stacked_inputs():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 5, generator=g, dtype=F64) for n in (40, 90, 25)]
    ws = [torch.randn(3, 5, generator=g, dtype=F64) for _ in xs]
    merged = _merge("regmean", ws, [_gram(x) for x in xs], reduce_non_diagonal_ratio=1.0)
    # each model's rows weighted 1/sqrt(n_i): every model's mean squared error counts once
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(a, b).solution.T
    assert torch.allclose(merged, expected, atol=1e-10)
    # equal example counts: the plain least squares over the concatenated inputs
    xs = [x[:25] for x in xs]
    merged = _merge("regmean", ws, [_gram(x) for x in xs], reduce_non_diagonal_ratio=1.0)
    plain = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    assert torch.allclose(merged, plain, atol=1e-10)
    assert not torch.allclose(merged, torch.stack(ws).mean(0), atol=1e-3)


def test_regmean_of_identical_models_returns_the_model_even_with_unused_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=g, dtype=F64)
    xs = [torch.randn(30, 6, generator=g, dtype=F64) for _ in range(3)]
    for x in xs:
        x[:, 2] = 0.0  # an input no data reaches: the Gram matrices are singular
    for ratio in (1.0, 0.6, 0.0):
        merged = _merge("regmean", [w.clone() for _ in xs], [_gram(x) for x in xs], reduce_non_diagonal_ratio=ratio)
        assert torch.allclose(merged, w, atol=1e-10)


def test_regmean_unused_input_keeps_the_average_and_diagonal_only_is_a_per_input_weighted_average():
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(2, 4, generator=g, dtype=F64) for _ in range(2)]
    xs = [torch.randn(50, 4, generator=g, dtype=F64) * torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=F64) for _ in ws]
    merged = regmean_linear(ws, [_gram(x)["gram"] for x in xs], ratio=1.0)
    assert torch.allclose(merged[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2)
    diag = _merge("regmean", ws, [_gram(x) for x in xs], reduce_non_diagonal_ratio=0.0)
    d = [(x * x).mean(0) for x in xs]
    live = slice(0, 3)
    expected = (ws[0][:, live] * d[0][live] + ws[1][:, live] * d[1][live]) / (d[0][live] + d[1][live])
    assert torch.allclose(diag[:, live], expected, atol=1e-12)


def test_regmean_averages_tensors_without_statistics_and_refuses_no_statistics_at_all():
    a, b = torch.ones(3, dtype=F64), 3 * torch.ones(3, dtype=F64)
    assert torch.allclose(_merge("regmean", [a, b], [None, None]), 2 * torch.ones(3, dtype=F64))
    with pytest.raises(InputError, match="learns from data"):
        run_method("regmean", MergeInputs("w", [a, b], [{}, {}], {}))
    assert get_method("regmean").needs_data == "gram" and not get_method("regmean").sequential
    assert get_method("regmean_plusplus").sequential and get_method("fisher").needs_data == "fisher"


# ------------------------------------------------------------------------------------------ Fisher maths
def test_fisher_merge_weighs_each_entry_by_the_models_fisher():
    g = torch.Generator().manual_seed(4)
    t = [torch.randn(3, 2, generator=g, dtype=F64) for _ in range(2)]
    f = [torch.rand(3, 2, generator=g, dtype=F64) for _ in range(2)]
    same = run_method("fisher", MergeInputs("w", [t[0], t[0].clone()], [{}, {}], {}, stats=[{"fisher": f[0]}, {"fisher": f[1]}]))
    assert torch.allclose(same, t[0], atol=1e-12)
    dominant = [{"fisher": torch.full((3, 2), 1e6, dtype=F64)}, {"fisher": torch.full((3, 2), 1e-3, dtype=F64)}]
    assert torch.allclose(run_method("fisher", MergeInputs("w", t, [{}, {}], {}, stats=dominant)), t[0], atol=1e-6)
    mp = [{"weight": 1.0}, {"weight": 3.0}]
    merged = run_method("fisher", MergeInputs("w", t, mp, {"fisher_floor": 0.0}, stats=[{"fisher": f[0]}, {"fisher": f[1]}]))
    assert torch.allclose(merged, (f[0] * t[0] + 3 * f[1] * t[1]) / (f[0] + 3 * f[1]))
    buffers = run_method("fisher", MergeInputs("w", t, mp, {}, stats=[None, None]))  # no Fisher: the weighted average
    assert torch.allclose(buffers, (t[0] + 3 * t[1]) / 4)
    # normalised: a model whose whole Fisher is 100 times larger no longer outweighs the other
    scaled = [{"fisher": f[0], "norm": 2.0}, {"fisher": 100 * f[0], "norm": 200.0}]
    even = run_method("fisher", MergeInputs("w", t, [{}, {}], {"fisher_floor": 0.0}, stats=scaled))
    assert torch.allclose(even, (t[0] + t[1]) / 2)
    raw = run_method("fisher", MergeInputs("w", t, [{}, {}], {"fisher_floor": 0.0, "normalize": False}, stats=scaled))
    assert torch.allclose(raw, (t[0] + 100 * t[1]) / 101)


# ------------------------------------------------------------------------------------------ measurement
class _Tokens(nn.Module):
    """Embedding -> Linear on token ids, so padded positions reach the Linear and must be masked out."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        return self.proj(self.emb(input_ids)).mean(1)


def test_collect_gram_is_the_mean_input_gram_without_padding():
    torch.manual_seed(0)
    module = _Tokens()
    ids = torch.randint(1, 10, (7, 5))
    mask = torch.ones(7, 5, dtype=torch.long)
    mask[2, 3:] = 0
    mask[5, 1:] = 0
    data = CalibrationData({"input_ids": ids, "attention_mask": mask}, name="toy")
    stats = collect_gram(module, ModelData("m", data, lambda: module), batch_size=3, device=torch.device("cpu"))
    assert set(stats) == {"proj.weight"}
    x = module.emb(ids)[mask.bool()].detach().to(F64)
    assert stats["proj.weight"]["count"] == int(mask.sum())
    assert torch.allclose(stats["proj.weight"]["gram"], x.T @ x / len(x), atol=1e-6)


def _softmax_fisher(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form: d(-log p_y)/dW = (p - e_y) x^T, d/db = p - e_y, squared and averaged over items."""
    p = torch.softmax(lin(x).detach().double(), dim=1)
    r = p - nn.functional.one_hot(y, p.shape[1]).double()
    return (r.unsqueeze(2) * x.double().unsqueeze(1)).pow(2).mean(0), r.pow(2).mean(0)


def test_collect_fisher_with_true_labels_matches_the_closed_form():
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    x, y = torch.randn(20, 3), torch.randint(0, 4, (20,))
    stats = collect_fisher(lin, ModelData("m", CalibrationData(x, y), lambda: lin), batch_size=6,
                           device=torch.device("cpu"), labels="auto")
    fw, fb = _softmax_fisher(lin, x, y)
    assert torch.allclose(stats["weight"]["fisher"].double(), fw, atol=1e-6)
    assert torch.allclose(stats["bias"]["fisher"].double(), fb, atol=1e-6)
    assert stats["bias"]["norm"] == pytest.approx(float(torch.sqrt(fw.pow(2).sum() + fb.pow(2).sum())), rel=1e-6)


def test_sampled_fisher_estimates_the_expected_fisher():
    torch.manual_seed(0)
    lin = nn.Linear(2, 3)
    x = torch.tensor([[1.0, -0.5]]).repeat(3000, 1)
    stats = collect_fisher(lin, ModelData("m", CalibrationData(x), lambda: lin), batch_size=500, device=torch.device("cpu"),
                           generator=torch.Generator().manual_seed(0))
    p = torch.softmax(lin(x[:1]).double(), 1)[0]
    expected_b = sum(p[k] * (p - nn.functional.one_hot(torch.tensor(k), 3).double()).pow(2) for k in range(3))
    assert torch.allclose(stats["bias"]["fisher"].double(), expected_b, rtol=0.08)
    with pytest.raises(InputError, match="need labelled data"):
        collect_fisher(lin, ModelData("m", CalibrationData(x[:3]), lambda: lin, where="models[0].data (line 4)"),
                       batch_size=3, device=torch.device("cpu"), labels="true")


def test_sequential_gram_measures_each_layer_under_the_merged_earlier_layers():
    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    g = torch.Generator().manual_seed(5)
    nets = [mlp(1), mlp(2)]
    xs = [torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g) + 1]
    models = [ModelData(f"m{i}", CalibrationData(x), lambda i=i: mlp(i + 1)) for i, x in enumerate(xs)]
    names = list(nets[0].state_dict())
    states = {md.key: net.state_dict() for md, net in zip(models, nets)}

    def merge(chosen, stats):
        return {n: _merge("regmean", [states[k][n] for k in states], [stats[k].get(n) for k in states], reduce_non_diagonal_ratio=0.6)
                for n in chosen}

    stats = sequential_gram(models, names, merge, batch_size=8, device=torch.device("cpu"))
    first = merge({"0.weight", "0.bias"}, {k: {"0.weight": _gram(x.double())} for k, x in zip(states, xs)})
    layer0 = nn.Linear(4, 6)
    layer0.load_state_dict({"weight": first["0.weight"].float(), "bias": first["0.bias"].float()})
    for key, x in zip(states, xs):
        assert torch.allclose(stats[key]["0.weight"]["gram"], _gram(x.double())["gram"], atol=1e-5)
        h = torch.relu(layer0(x)).detach().double()  # layer 1 sees the merged layer 0, not the model's own
        assert torch.allclose(stats[key]["2.weight"]["gram"], _gram(h)["gram"], atol=1e-5)
        own = torch.relu(nets[int(key[1])][0](x)).detach().double()
        assert not torch.allclose(stats[key]["2.weight"]["gram"], _gram(own)["gram"], atol=1e-3)


# ------------------------------------------------------------------------------------------ recipes
def _digits_recipe(method: str, **extra) -> dict:
    models = [{"model": "demo:finetune-0-4", "data": "sklearn:digits?classes=0-4"},
              {"model": "demo:finetune-5-9", "data": "sklearn:digits?classes=5-9"}]
    return {"merge_method": method, "models": models, "data": {"max_items": 200}, **extra,
            "evaluate": {"data": "sklearn:digits", "plot": False, "points": 3}}


def test_regmean_beats_averaging_on_the_digits_finetunes(tmp_path):
    results = {}
    for method in ("regmean", "regmean_plusplus", "fisher"):
        report = run_recipe(_digits_recipe(method), tmp_path / method).report
        results[method] = report["evaluation"]["merged"]["accuracy"]
        assert report["data"]["statistics"] == get_method(method).needs_data
        assert report["data"]["models"]["demo:finetune-5-9"] == "sklearn:digits?classes=5-9"
    average = report["evaluation"]["midpoint_accuracy"]["naive"]  # the plain average of the two fine-tunes
    assert results["regmean"] > average + 0.01, (results, average)
    assert results["regmean_plusplus"] > average, (results, average)
    assert results["fisher"] > 0.5, results


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tests._tiny_bert import build

    return build(tmp_path_factory.mktemp("tiny-bert"))


def _task_scores(folder, paths) -> dict[str, dict[str, float]]:
    from suture.merge.data import load_dataset
    from suture.merge.derive import architecture_of, load_module
    from suture.merge.evaluate import evaluate
    from suture.merge.store import open_store

    store = open_store(folder)
    module = load_module(store, architecture_of(store))
    return {t: evaluate(module, load_dataset(str(paths[f"{t}_test"]), tokenizer=str(folder))) for t in "ab"}


def test_regmean_beats_averaging_on_two_tiny_bert_tasks(tiny_bert, tmp_path):
    p = tiny_bert
    models = [{"model": str(p["a"]), "data": str(p["a_train"])}, {"model": str(p["b"]), "data": str(p["b_train"])}]
    average = run_recipe({"merge_method": "linear", "models": [{"model": str(p[t]), "parameters": {"weight": 1.0}} for t in "ab"]},
                         tmp_path / "avg").out_dir
    scores = {"average": _task_scores(average, p)}
    for method in ("regmean", "regmean_plusplus"):
        out = run_recipe({"merge_method": method, "models": models, "data": {"max_items": 100}}, tmp_path / method).out_dir
        scores[method] = _task_scores(out, p)
    mean = {k: sum(v[t]["loss"] for t in "ab") / 2 for k, v in scores.items()}
    acc = {k: sum(v[t]["accuracy"] for t in "ab") / 2 for k, v in scores.items()}
    assert mean["regmean"] < 0.7 * mean["average"] and acc["regmean"] >= acc["average"], scores
    assert mean["regmean_plusplus"] < mean["average"], scores
    fisher = run_recipe({"merge_method": "fisher", "models": models, "data": {"max_items": 8, "labels": "sampled"}},
                        tmp_path / "fisher").report
    assert fisher["data"]["labels"] == "sampled"


# ------------------------------------------------------------------------------------------ bad input
RECIPE = """merge_method: regmean
models:
  - model: demo:finetune-0-4
    data: sklearn:digits?classes=0-4
  - model: demo:finetune-5-9
    data: {data}
"""


def test_a_model_without_data_is_named_with_its_line():
    text = "merge_method: regmean\nmodels:\n  - model: demo:finetune-0-4\n    data: sklearn:digits\n  - model: demo:finetune-5-9\n"
    with pytest.raises(RecipeError) as err:
        parse_recipe_text(text)
    assert "line 5" in str(err.value) and "models[1]" in str(err.value) and "data" in str(err.value)
    assert "\n" not in str(err.value)


def parse_recipe_text(text):
    from suture.recipes.schema import load_recipe

    return load_recipe(text)


@pytest.mark.parametrize("text,fragment", [
    (RECIPE.format(data="sklearn:digits?colour=red"), "line 6"),
    (RECIPE.format(data="sklearn:digits") + "data: sklearn:digits\n", "holds options"),
    (RECIPE.format(data="sklearn:digits") + "data:\n  batch_size: 0\n", "line 8"),
    ("merge_method: regmean\nslices:\n  - sources:\n      - model: demo:base\n        layer_range: [0, 1]\n", "not `slices`"),
])
def test_bad_data_settings_are_refused_before_running(text, fragment):
    with pytest.raises(RecipeError) as err:
        parse_recipe_text(text)
    assert fragment in str(err.value)


def test_data_that_does_not_fit_the_model_names_the_key_and_line(tmp_path):
    recipe = parse_recipe_text(RECIPE.format(data="sklearn:iris"))  # 4 features into a 64-input MLP
    with pytest.raises(InputError) as err:
        run_recipe(recipe, tmp_path / "out")
    text = str(err.value)
    assert "models[1].data (line 6)" in text and "demo:finetune-5-9" in text and "\n" not in text
    missing = parse_recipe_text(RECIPE.format(data=str(tmp_path / "nope.txt")))
    with pytest.raises(InputError, match=r"models\[1\]\.data \(line 6\).*not found"):
        run_recipe(missing, tmp_path / "out2")


def test_data_is_ignored_with_a_warning_by_data_free_methods(caplog):
    r = parse_recipe({"merge_method": "linear", "models": [{"model": "demo:base", "data": "sklearn:digits", "parameters": {"weight": 1.0}}]})
    assert r.models[0].data == "sklearn:digits"
    assert "does not learn from data" in caplog.text


# ------------------------------------------------------------------------------------------ per-task heads
def _heads_pair(root):
    """Two fine-tunes of one digits MLP trunk with their own heads: 5 classes (digits 0-4) and 3 (digits 5-7)."""
    from suture.merge.data import load_dataset
    from suture.merge.demo import train
    from suture.merge.zoo import FACTORY_REFS, build_seeded, save_module

    torch.manual_seed(0)
    trunk = build_seeded(FACTORY_REFS["mlp"], 0, widths=[64, 32, 10])
    train(trunk, load_dataset("sklearn:digits", split="train"), 2, seed=0)
    out = {}
    for name, classes, n in (("a", "0-4", 5), ("b", "5-7", 3)):
        model = build_seeded(FACTORY_REFS["mlp"], 1, widths=[64, 32, n])
        model.load_state_dict({k: v for k, v in trunk.state_dict().items() if k.startswith("layers.0.")}, strict=False)
        spec = f"sklearn:digits?classes={classes}&relabel=true"
        train(model, load_dataset(spec, split="train"), 8, seed=1)
        out[name] = save_module(model, root / name, FACTORY_REFS["mlp"], {"widths": [64, 32, n]})
        out[f"{name}_data"] = spec
    return out


def test_models_with_heads_of_their_own_keep_them_in_a_multi_head_output(tmp_path):
    from suture.merge.multihead import load_multihead, read_manifest
    from suture.merge.store import open_store

    p = _heads_pair(tmp_path)
    recipe = {"merge_method": "regmean", "models": [{"model": str(p[t]), "data": p[f"{t}_data"]} for t in "ab"],
              "evaluate": {"data": "sklearn:digits?classes=0-7", "plot": False}}
    result = run_recipe(recipe, tmp_path / "out")
    manifest = read_manifest(result.out_dir)
    assert manifest["trunk"] == ["layers.0.bias", "layers.0.weight"]
    assert [m["branch"] for m in manifest["members"]] == [["layers.1.weight", "layers.1.bias"]] * 2
    model = load_multihead(result.out_dir)
    for i, t in enumerate("ab"):  # each head is its model's own; the trunk is the merge of both
        own = open_store(p[t]).state_dict()
        state = model.members[i].state_dict()
        assert torch.equal(state["layers.1.weight"], own["layers.1.weight"])
        assert not torch.equal(state["layers.0.weight"], own["layers.0.weight"])
    assert result.report["heads"]["per_model"][str(p["b"])] == ["layers.1.bias", "layers.1.weight"]
    # the members' logits side by side classify digits 0-7 (measured 0.934)
    assert result.report["evaluation"]["merged"]["accuracy"] > 0.85, result.report["evaluation"]


def test_merging_a_model_with_its_copy_returns_it(tmp_path):
    import shutil

    from suture.merge.refs import resolve_ref
    from suture.merge.store import open_store

    source = resolve_ref("demo:finetune-0-4")
    copies = [shutil.copytree(source, tmp_path / name) for name in ("one", "two")]
    original = open_store(copies[0]).state_dict()
    for method in ("regmean", "regmean_plusplus", "fisher"):
        models = [{"model": str(c), "data": spec} for c, spec in zip(copies, ("sklearn:digits?classes=0-4", "sklearn:digits"))]
        out = run_recipe({"merge_method": method, "models": models, "data": {"max_items": 64}}, tmp_path / method).out_dir
        merged = open_store(out).state_dict()
        for name, tensor in original.items():
            assert torch.allclose(merged[name], tensor, atol=1e-5), (method, name)
