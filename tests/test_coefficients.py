"""AdaMerging and aTLAS: learned task-arithmetic coefficients, their invariants and their exact export.

Models: the digits demo fine-tunes (a 64-128-128-10 MLP fine-tuned on digits 0-4 and on 5-9, one shared
head) and a tiny BERT built from a config, fine-tuned here on two synthetic token tasks with a head each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from suture.merge import demo
from suture.merge.coefficient_export import export_recipe, recipe_yaml
from suture.merge.coefficients import (
    ADAMERGING,
    ATLAS,
    LearnSettings,
    apply_coefficients,
    evaluate_loss,
    group_tensors,
    learn_coefficients,
    learnable_names,
    merged_parameters,
    module_objective,
    task_vectors,
)
from suture.merge.data import CalibrationData, load_dataset
from suture.merge.errors import InputError
from suture.merge.layers import num_layers
from suture.merge.threads import single_threaded
from suture.merge.zoo import load_module, load_state
from suture.recipes.runner import run_recipe

REPO = Path(__file__).resolve().parent.parent
REFS = {"base": "demo:base", "ft_0_4": "demo:finetune-0-4", "ft_5_9": "demo:finetune-5-9"}


@pytest.fixture(scope="module")
def digits(demo_cache):
    """Base and fine-tuned tensors, and one unlabelled objective per fine-tune (its own classes' test split)."""
    folders = demo.demo_finetunes(demo_cache)
    base = load_state(folders["base"])
    fts = [load_state(folders["ft_0_4"]), load_state(folders["ft_5_9"])]
    tasks = [
        module_objective(key, load_module(folders[key]), load_dataset(spec, split="test"), batch_size=16, labelled=False)
        for key, spec in demo.FINETUNE_TASKS.items()
    ]
    return base, fts, tasks, folders


def _load_output(out: Path) -> dict[str, torch.Tensor]:
    return load_state(out)


def test_frozen_coefficients_equal_task_arithmetic(tmp_path, digits):
    """0 steps: every coefficient stays at the paper's 0.3 and the merge is task arithmetic with weight 0.3."""
    base, fts, tasks, _ = digits
    names = learnable_names(base, fts)
    learned = learn_coefficients(base, fts, group_tensors(names, "block"), tasks, ADAMERGING.with_(steps=0))
    assert torch.equal(learned.values, torch.full((2, 3), 0.3))
    merged = apply_coefficients(base, fts, learned)
    recipe = {
        "merge_method": "task_arithmetic", "base_model": REFS["base"], "dtype": "float32",
        "models": [{"model": REFS["ft_0_4"], "parameters": {"weight": 0.3}},
                   {"model": REFS["ft_5_9"], "parameters": {"weight": 0.3}}],
    }
    reference = _load_output(run_recipe(recipe, tmp_path / "ta").out_dir)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    # the differentiable merge the optimiser sees is the same formula (up to summation order)
    w = torch.tensor(0.3)
    params = merged_parameters(base, task_vectors(base, fts, names), learned.grouping, learned.values)
    for k in names:
        formula = base[k] + w * (fts[0][k] - base[k]) + w * (fts[1][k] - base[k])
        torch.testing.assert_close(params[k], formula, rtol=0, atol=1e-6)
        torch.testing.assert_close(params[k], reference[k], rtol=0, atol=1e-6)


def test_adamerging_lowers_entropy_deterministically(digits):
    base, fts, tasks, _ = digits
    names = learnable_names(base, fts)
    grouping = group_tensors(names, "task")
    seen = []
    settings = ADAMERGING.with_(steps=30)
    learned = learn_coefficients(base, fts, grouping, tasks, settings, progress=lambda *a: seen.append(a))
    frozen = learn_coefficients(base, fts, grouping, tasks, settings.with_(steps=0))
    before, after = evaluate_loss(base, fts, frozen, tasks), evaluate_loss(base, fts, learned, tasks)
    assert after < before - 1e-3, (before, after)
    assert len(learned.history) == 30  # (per-step losses are on different batches: compare full passes above)
    assert [s[1:3] for s in seen] == [(i, 30) for i in range(1, 31)] and seen[-1][3].startswith("loss ")
    assert ((learned.values >= 0) & (learned.values <= 1)).all()  # clamped as the paper does
    again = learn_coefficients(base, fts, grouping, tasks, settings)
    assert torch.equal(again.values, learned.values)  # same seed and data: same coefficients


def test_objective_is_the_papers_summed_mean_entropy_and_clamp_holds(digits):
    """Step 1's loss is Σ_tasks mean_batch H(softmax) of each task's own module on the merge (Yang et al. 2024, eq. 6),
    recomputed here on a hand-merged state dict; a large lr drives coefficients to the bounds, never past them."""
    base, fts, tasks, folders = digits
    names = learnable_names(base, fts)
    learned = learn_coefficients(base, fts, group_tensors(names, "task"), tasks, ADAMERGING.with_(steps=1, init=0.6))
    merged = {k: base[k] + 0.6 * sum(ft[k] - base[k] for ft in fts) if k in names else base[k] for k in base}
    total = 0.0
    for key, task in zip(demo.FINETUNE_TASKS, tasks):
        module = load_module(folders[key]).eval()
        module.load_state_dict(merged)
        with torch.no_grad():
            p = torch.softmax(module(task.batch(0)[0]).double(), -1)
        total += float((-(p * p.log()).sum(-1)).mean())
    assert learned.history[0]["loss"] == pytest.approx(total, rel=1e-5)
    watched = []
    pushed = learn_coefficients(base, fts, group_tensors(names, "tensor"), tasks, ADAMERGING.with_(steps=20, lr=1.0),
                                watch=lambda step, c: watched.append((step, c)))
    assert float(pushed.values.min()) >= 0.0 and float(pushed.values.max()) <= 1.0
    assert [s for s, _ in watched] == list(range(1, 21)) and torch.equal(watched[-1][1], pushed.values)
    assert ((pushed.values == 0) | (pushed.values == 1)).any()  # the clamp was reached, and held


def test_layerwise_has_one_coefficient_per_task_and_layer(digits):
    base, fts, tasks, _ = digits
    names = learnable_names(base, fts)
    block = learn_coefficients(base, fts, group_tensors(names, "block"), tasks, ADAMERGING.with_(steps=3, lr=0.05))
    assert block.values.shape == (2, 3) and block.grouping.labels == ("layer 0", "layer 1", "layer 2")
    assert block.weight(1, "layers.2.bias") == block.weight(1, "layers.2.weight") == float(block.values[1, 2])
    assert len(set(block.values.flatten().tolist())) > 1  # the layers moved apart
    per_tensor = learn_coefficients(base, fts, group_tensors(names, "tensor"), tasks, ADAMERGING.with_(steps=1))
    assert per_tensor.values.shape == (2, len(names)) == (2, 6)
    report = per_tensor.report()
    assert report["groups"] == names and len(report["coefficients"]["model 0"]) == 6
    with pytest.raises(InputError, match="granularity 'row'"):
        group_tensors(names, "row")


def test_atlas_shrinks_a_harmful_task_vector(digits):
    """Labelled digits 0-4; one task vector is the 0-4 fine-tune, the other random noise of 3x its norm."""
    base, fts, _, folders = digits
    gen = torch.Generator().manual_seed(0)
    noise = {}
    for k, t in base.items():
        delta = fts[0][k] - t
        r = torch.randn(t.shape, generator=gen)
        noise[k] = t + r * (3 * delta.norm() / r.norm())
    data = load_dataset(demo.FINETUNE_TASKS["ft_0_4"], split="train", max_items=256)
    task = module_objective("0-4", load_module(folders["base"]), data, batch_size=32, labelled=True)
    names = learnable_names(base, [fts[0], noise])
    learned = learn_coefficients(base, [fts[0], noise], group_tensors(names, "block"), [task], ATLAS.with_(steps=40),
                                 vector_names=["good", "noise"])
    good, bad = learned.values
    assert (good > bad.abs()).all(), learned.values
    assert (good > 0.9).all() and (bad.abs() < 0.2).all()  # from 0: the fine-tune scaled up, the noise kept out
    assert learned.history[-1]["loss"] < 0.5 * learned.history[0]["loss"]
    with pytest.raises(InputError, match="has no labels"):
        module_objective("x", load_module(folders["base"]), CalibrationData(data.inputs), labelled=True)


def test_exported_recipe_reproduces_the_merge_through_suture_run(tmp_path, digits, suture_cache):
    base, fts, tasks, _ = digits
    names = learnable_names(base, fts)
    learned = learn_coefficients(base, fts, group_tensors(names, "tensor"), tasks, ADAMERGING.with_(steps=5, lr=0.05))
    assert len(set(learned.values[0].tolist())) > 1
    recipe = export_recipe(learned, base_model=REFS["base"], models=[REFS["ft_0_4"], REFS["ft_5_9"]],
                           names=list(base), n_layers=num_layers(list(base)))
    weights = recipe["models"][0]["parameters"]["weight"]
    assert isinstance(weights, list) and all("value" in c for c in weights)  # per-tensor filters
    path = tmp_path / "learned.yaml"
    path.write_text(recipe_yaml(recipe, "learned by AdaMerging"))
    assert yaml.safe_load(path.read_text()) == recipe
    env = {**os.environ, "SUTURE_CACHE": str(suture_cache)}
    proc = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "run", str(path), str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = _load_output(tmp_path / "out")
    expected = apply_coefficients(base, fts, learned)
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)


# --- a tiny BERT with a head per task ---------------------------------------------------------------------

VOCAB, LENGTH = 40, 8


def _token_task(kind: str, n: int, seed: int) -> CalibrationData:
    """Synthetic two-class token tasks: does token 3 occur (``has3``), is the first token in the low half (``low``)?"""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=gen)
    if kind == "has3":
        put = torch.rand(n, generator=gen) < 0.5
        ids[put, torch.randint(1, LENGTH, (int(put.sum()),), generator=gen)] = 3
        labels = put.long()
    else:
        labels = (ids[:, 1] < (VOCAB + 4) // 2).long()
    ids[:, 0] = 2  # [CLS]-like token
    return CalibrationData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels, name=kind)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 'pretrained' BERT and two fine-tunes of it (whole encoder + own head), saved as HF folders."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bert")
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config).eval()
    base.save_pretrained(root / "base")
    models, data = {}, {}
    for i, kind in enumerate(("has3", "low")):
        torch.manual_seed(10 + i)
        model = BertForSequenceClassification(config)
        model.load_state_dict(base.state_dict())
        model.classifier.reset_parameters()
        train = _token_task(kind, 256, seed=i)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        with single_threaded():  # tiny products: one thread is much faster on a busy machine
            _fit(model, opt, train)
        model.eval()
        model.save_pretrained(root / kind)
        models[kind], data[kind] = model, _token_task(kind, 128, seed=100 + i)
    return root, base, models, data


def _fit(model, opt, train: CalibrationData) -> None:
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % 256
        x, y = train[idx]
        loss = torch.nn.functional.cross_entropy(model(**x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_tiny_bert_blockwise_with_task_heads_and_exact_export(tmp_path, tiny_bert):
    root, base_model, models, data = tiny_bert
    base = dict(base_model.state_dict())
    fts = [dict(models[k].state_dict()) for k in ("has3", "low")]
    trunk = [n for n in learnable_names(base, fts) if n.startswith("bert.")]  # heads stay per task
    grouping = group_tensors(trunk, "block")
    assert grouping.labels == ("pre", "layer 0", "layer 1", "post")  # embeddings, 2 blocks, pooler
    for k in ("has3", "low"):  # each fine-tune learned its task
        x, y = data[k][:]
        assert (models[k](**x).logits.argmax(1) == y).float().mean() > 0.8
    tasks = [module_objective(k, models[k], data[k], batch_size=32, labelled=False) for k in ("has3", "low")]
    learned = learn_coefficients(base, fts, grouping, tasks, ADAMERGING.with_(steps=20, lr=0.02),
                                 vector_names=["has3", "low"])
    assert learned.values.shape == (2, 4)
    frozen = learn_coefficients(base, fts, grouping, tasks, ADAMERGING.with_(steps=0))
    assert evaluate_loss(base, fts, learned, tasks) < evaluate_loss(base, fts, frozen, tasks)
    assert learned.weight(0, "classifier.weight") == 0.0  # not learned: the merged output keeps the base's head

    names = list(base)
    recipe = export_recipe(learned, base_model=str(root / "base"), models=[str(root / "has3"), str(root / "low")],
                           names=names, n_layers=2)
    weight = recipe["models"][1]["parameters"]["weight"]
    assert isinstance(weight[-1]["value"], list) and len(weight[-1]["value"]) == 2  # per-layer gradient
    out = run_recipe(recipe, tmp_path / "out").out_dir
    merged = _load_output(out)
    expected = apply_coefficients(base, fts, learned)
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])


def test_bad_settings_are_one_line_errors():
    with pytest.raises(InputError, match="lr must be"):
        LearnSettings(lr=0.0)
    with pytest.raises(InputError, match="objective"):
        LearnSettings(objective="mse")  # type: ignore[arg-type]


def test_export_never_lets_a_shorter_filter_capture_a_longer_name():
    """'w' is a substring of 'ww': a fallback for the common value would give 'ww' the weight of 'w'."""
    from suture.merge.coefficients import LearnedCoefficients
    from suture.recipes.params import ParamResolver
    from suture.recipes.runner import load

    names = ["w", "ww", "www"]
    learned = LearnedCoefficients(("m",), group_tensors(names, "tensor"), torch.tensor([[1.0, 2.0, 2.0]]), ADAMERGING)
    recipe = export_recipe(learned, base_model="base", models=["m"], names=names, n_layers=None)
    setting = recipe["models"][0]["parameters"]["weight"]
    assert [c.get("filter") for c in setting] == ["www", "ww", "w"]  # the full list, longest first
    resolver = ParamResolver(load(recipe))
    assert [resolver.get("weight", n, model="m") for n in names] == [1.0, 2.0, 2.0]
