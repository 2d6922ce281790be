"""`suture search`: Ray Tune trials over recipe values on the digits task models (a real local Ray, 2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from safetensors.torch import load_file

from suture.merge.errors import RecipeError
from suture.recipes.search import load_search_spec, parse_search_spec
from suture.recipes.search_run import METRIC, run_search, state_digest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "recipes" / "searches" / "tasks.yaml"


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "suture.recipes.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_search_beats_start_survives_a_dead_worker_and_exports_a_reproducible_recipe(tmp_path, local_ray):
    marker = tmp_path / "killed-once"

    def kill_worker_once(config):  # runs inside the Ray worker: the first trial to get here dies with its process
        if not marker.exists():
            marker.touch()
            os._exit(1)

    spec = load_search_spec(SPEC)
    out = tmp_path / "search"
    result = run_search(spec, out, trials=5, workers=2, verbose=0, trial_hook=kill_worker_once)
    assert marker.exists()  # a worker was killed ...
    assert [r["status"] for r in result.trials] == ["TERMINATED"] * 5  # ... and its trial was retried and finished
    assert result.finished
    start = result.trials[0]
    assert {n: start[n] for n in spec.param_names()} == spec.start_config()  # trial 0 is the base recipe
    best = result.best
    assert best[METRIC] > start[METRIC]  # the search found a better merge than the starting recipe
    assert best["heldout"] is not None and 0 < best["heldout"] < 1  # held-out split scored separately
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 6 and table[0].startswith("trial,status,models[0].parameters.weight[0]")
    assert json.loads((out / "trials.json").read_text())["best"]["trial"] == best["trial"]
    assert (out / "objective.png").stat().st_size > 1000

    ran = tmp_path / "ran"
    proc = _cli("run", str(out / "best_recipe.yaml"), str(ran), "-q")
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    assert state_digest(load_file(ran / "model.safetensors")) == best["digest"]  # same tensors
    report = json.loads((ran / "report.json").read_text())
    assert report["evaluation"]["merged"]["accuracy"] == pytest.approx(best["val/digits_0_4/accuracy"], abs=1e-12)  # same score


def test_interrupted_search_resumes(tmp_path):
    out = tmp_path / "search"
    # one trial at a time and 8 in all: after 2 have finished, Ctrl-C lands well before the last one, however fast
    proc = _cli("search", str(SPEC), str(out), "--trials", "8", "--workers", "1", "-q")
    deadline = time.monotonic() + 150
    while len([p for p in (out / "ray").rglob("result.json") if p.stat().st_size > 10]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "no trial finished"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    assert proc.wait(timeout=60) == 130
    first = json.loads((out / "trials.json").read_text())
    done_before = {r["digest"] for r in first["trials"] if r.get(METRIC) is not None}
    assert not first["finished"] and 2 <= len(done_before) < 8

    again = _cli("search", str(SPEC), str(out), "--workers", "2", "--resume", "-q")
    text = again.communicate(timeout=150)[0]
    assert again.returncode == 0, text
    after = json.loads((out / "trials.json").read_text())
    assert after["finished"] and len(after["trials"]) == 8
    assert all(r["status"] == "TERMINATED" for r in after["trials"])
    assert done_before <= {r["digest"] for r in after["trials"]}  # finished trials kept, not rerun from scratch
    assert "8 trials finished" in text


def test_resume_keeps_the_trial_count_it_started_with(tmp_path):
    (tmp_path / "ray" / "search").mkdir(parents=True)
    with pytest.raises(RecipeError, match="without a trial count"):  # a search folder from elsewhere
        run_search(load_search_spec(SPEC), tmp_path, resume=True)
    (tmp_path / "search_settings.json").write_text('{"trials": 8}')
    with pytest.raises(RecipeError, match="--trials 5 cannot change a search on --resume: it was started with 8"):
        run_search(load_search_spec(SPEC), tmp_path, trials=5, resume=True)


def test_an_address_where_no_cluster_listens_is_refused_at_once(tmp_path):
    started = time.monotonic()
    with pytest.raises(RecipeError, match="--address 127.0.0.1:1: cannot reach a Ray cluster there"):
        run_search(load_search_spec(SPEC), tmp_path, address="127.0.0.1:1")
    assert time.monotonic() - started < 30 and not ray.is_initialized()


def test_starting_over_an_existing_search_is_refused(tmp_path):
    (tmp_path / "ray" / "search").mkdir(parents=True)
    with pytest.raises(RecipeError, match="already holds a search; pass --resume"):
        run_search(load_search_spec(SPEC), tmp_path)


@pytest.mark.parametrize(("edit", "replacement", "key"), [
    ("  - key: models[0].parameters.weight\n    low: 0.05\n", "  - key: models[0].parameters.weight\n    low: 2.0\n", "space[0]"),
    ("  - key: models[1].parameters.weight\n", "  - key: models[3].parameters.weight\n", "space[1].key"),
    ("  split: train\n", "  split: test\n", "evaluate"),
])
def test_bad_specs_name_key_and_line(tmp_path, edit, replacement, key):
    bad = tmp_path / "bad.yaml"
    text = SPEC.read_text()
    assert edit in text
    bad.write_text(text.replace(edit, replacement))
    with pytest.raises(RecipeError) as err:
        load_search_spec(bad)
    msg = str(err.value)
    assert str(bad) in msg and f"{key} (line " in msg and "\n" not in msg


def test_spec_requires_a_domain(tmp_path):
    with pytest.raises(RecipeError, match=r"space\[0\].*needs low and high"):
        parse_search_spec({"recipe": {"merge_method": "linear", "models": [{"model": "demo:task-0-4"}, {"model": "demo:task-5-9"}]},
                           "space": [{"key": "models[0].parameters.weight"}],
                           "evaluate": {"tasks": [{"data": "sklearn:digits"}]}})


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_trial_merges_data_driven_methods_as_suture_run_does(tmp_path, method):
    from suture.recipes.runner import run_recipe
    from suture.recipes.schema import load_recipe
    from suture.recipes.search_run import merge_recipe

    example = ROOT / "recipes" / "examples" / "regmean_finetunes.yaml"
    text = example.read_text().replace("merge_method: regmean", f"merge_method: {method}")
    if method == "fisher":
        text = text.replace("  reduce_non_diagonal_ratio: 0.6\n", "  normalize: true\n")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(text)
    state, _ = merge_recipe(load_recipe(recipe_file))  # what a search trial merges in memory
    run_recipe(recipe_file, tmp_path / "out")
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert state_digest(state) == state_digest(written)  # the same tensors, statistics included


def test_a_data_driven_hyper_parameter_is_searchable(tmp_path):
    import yaml

    from suture.recipes.search_run import evaluate_recipe

    recipe = yaml.safe_load((ROOT / "recipes" / "examples" / "regmean_finetunes.yaml").read_text())
    recipe.pop("evaluate")
    spec = parse_search_spec({"recipe": recipe, "space": [{"key": "parameters.reduce_non_diagonal_ratio", "low": 0.0, "high": 1.0}],
                              "evaluate": {"metric": "accuracy", "tasks": [{"data": "sklearn:digits", "name": "digits"}],
                                           "split": "train", "heldout_split": "test"}, "search": {"trials": 2}})
    scores = {}
    for ratio in (0.0, 1.0):
        config = dict.fromkeys(spec.param_names(), ratio)
        scores[ratio] = evaluate_recipe(spec, spec.trial_recipe(config))
    assert all(s[METRIC] > 0.8 and s["heldout"] > 0.8 for s in scores.values())  # RegMean merges of the two fine-tunes
    assert scores[0.0]["digest"] != scores[1.0]["digest"]  # the searched value reaches the RegMean kernel
