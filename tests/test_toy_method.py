"""Adding a merge method is one decorated function: a toy method from the test package runs from a recipe,
its parameter range is enforced by the framework (key path and line), and the app lists it."""

from __future__ import annotations

import importlib
import sys

import pytest
import yaml

from suture.merge.methods import get_method, list_methods, registry
from suture.merge.store import open_store
from suture.recipes.cli import main
from tests.test_runner_cli import tiny_llama


@pytest.fixture(autouse=True)
def toy_registered():
    """Register toy_max for one test only, so the other tests see exactly the built-in methods."""
    importlib.import_module("tests._toy_method")
    yield
    registry._REGISTRY.pop("toy_max", None)
    sys.modules.pop("tests._toy_method", None)


def _recipe(path, a, b, mix) -> str:
    recipe = {
        "merge_method": "toy_max",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"mix": mix},
        "dtype": "float32",
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(path)


def test_toy_method_is_registered_with_its_parameter_range() -> None:
    assert "toy_max" in list_methods()
    m = get_method("toy_max")
    assert m.papers and m.min_models == 2 and m.max_models is None and not m.requires_base
    mix = m.global_param("mix")
    assert mix.default == 1.0 and mix.bounds == "in [0, 1]" and "maximum" in mix.help
    assert m.value_problem("mix", 0.25) is None and "in [0, 1]" in m.value_problem("mix", 1.5)


def test_toy_method_runs_from_a_recipe(tmp_path) -> None:
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    recipe = _recipe(tmp_path / "toy.yml", a, b, 0.25)
    assert main(["run", recipe, str(tmp_path / "out"), "-q"]) == 0
    merged, sa, sb = open_store(tmp_path / "out"), open_store(a), open_store(b)
    for name in sa.names():
        x, y = sa.get(name), sb.get(name)
        expected = 0.25 * x.maximum(y) + 0.75 * (x + y) / 2
        assert (merged.get(name) - expected).abs().max() < 1e-6, name


def test_out_of_range_parameter_is_refused_with_key_path_and_line(tmp_path, capsys) -> None:
    a, b = tiny_llama(tmp_path / "a", 1), tiny_llama(tmp_path / "b", 2)
    recipe = _recipe(tmp_path / "bad.yml", a, b, 1.5)
    line = 1 + next(i for i, text in enumerate(open(recipe).read().splitlines()) if "mix:" in text)
    assert main(["run", recipe, str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"line {line}" in err and "parameters.mix" in err and "must be in [0, 1], got 1.5" in err
    assert not (tmp_path / "out").exists()


def test_app_lists_the_toy_method_from_the_registry() -> None:
    from suture.app import services

    info = services.methods.__wrapped__()["toy_max"]
    assert info["summary"].startswith("Blend") and info["min_models"] == 2
    assert [p["name"] for p in info["global"]] == ["mix"] and info["global"][0]["default"] == 1.0
    assert info["global"][0]["help"].endswith("(must be in [0, 1])")
