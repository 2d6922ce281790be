"""No code runs from a model's files without opt-in, and the app reads only its workspace.

A model's config.json may name any importable callable as its architecture factory. Importing a module runs
it, so each test plants a module that writes a marker file on import (and `os:system` with a `touch`
command) where Python *would* import it from, then checks the marker never appears unless the user opted in
(`--trust-remote-code`, recipe `trust_remote_code: true`, the app's toggle).
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from suture.merge import zoo
from suture.merge.errors import SutureError, UntrustedCodeError
from tests.robustness.harness import Case, run_cli_case

WIDTHS = [64, 8, 10]


class Planted:
    """A folder on sys.path holding a marker-writing module, and models whose config.json name it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "MARKER"
        self.module = f"evil_{uuid.uuid4().hex[:8]}"
        (root / f"{self.module}.py").write_text(
            f"import pathlib\npathlib.Path({str(self.marker)!r}).write_text('imported')\n"
            "def make(widths):\n    from merge.zoo import mlp\n    return mlp(widths)\n"
        )
        self.evil = self._model("evil", f"{self.module}:make", {"widths": WIDTHS})
        self.shell = self._model("shell", "os:system", {"command": f"touch {self.marker}"})
        self.good = self._model("good", "suture.merge.zoo:mlp", {"widths": WIDTHS}, seed=2)

    def _model(self, name: str, factory: str, kwargs: dict, seed: int = 1) -> Path:
        module = zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=WIDTHS)
        return zoo.save_module(module, self.root / "models" / name, factory, kwargs)

    def recipe(self, name: str, first: Path, extra: str = "") -> Path:
        path = self.root / f"{name}.yml"
        path.write_text(
            f"merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {self.good}\n    parameters: {{weight: 0.5}}\n{extra}"
        )
        return path

    def imported(self) -> bool:
        return self.marker.exists() or self.module in sys.modules


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Planted:
    monkeypatch.syspath_prepend(str(tmp_path))  # without the check, the import would succeed
    monkeypatch.chdir(tmp_path)
    out = Planted(tmp_path)
    yield out
    sys.modules.pop(out.module, None)


def _refused(case: Case, planted: Planted, config: Path) -> str:
    outcome = run_cli_case(case)
    assert outcome.clean, outcome.describe()
    line = outcome.error_lines[0]
    assert str(config / "config.json") in line and "--trust-remote-code" in line, line
    assert not planted.imported(), "the factory's module was imported"
    return line


@pytest.mark.parametrize("which", ["evil", "shell"])
def test_inspect_groups_refuses_a_foreign_factory(planted: Planted, which: str) -> None:
    model = getattr(planted, which)
    line = _refused(Case(f"inspect-{which}", ["inspect", str(model), "--groups"]), planted, model)
    assert ("os:system" if which == "shell" else planted.module) in line
    # without --groups nothing is built, so the model is described as usual
    assert run_cli_case(Case("plain", ["inspect", str(model)])).exit_code == 0
    assert not planted.imported()


@pytest.mark.parametrize("which", ["evil", "shell"])
@pytest.mark.parametrize("extra", [
    "alignment: {engine: activation_matching, data: 'sklearn:digits'}\n",
    "evaluate: {data: 'sklearn:digits', plot: false, max_items: 64}\n",
    "alignment: {engine: ot, data: 'sklearn:digits', max_items: 64}\n",
    "alignment: {engine: zipit, data: 'sklearn:digits', max_items: 64}\nmerge_method: null\n",
])
def test_run_refuses_a_foreign_factory(planted: Planted, which: str, extra: str) -> None:
    model = getattr(planted, which)
    text = planted.recipe("r", model, extra).read_text()
    if "merge_method: null" in text:  # zipit builds its own model: no merge method
        text = text.replace("merge_method: linear\n", "").replace("merge_method: null\n", "")
    (planted.root / "r.yml").write_text(text)
    out = planted.root / "out"
    _refused(Case("run", ["run", str(planted.root / "r.yml"), str(out)], out), planted, model)


def test_opting_in_runs_the_factory(planted: Planted) -> None:
    outcome = run_cli_case(Case("trusted", ["inspect", str(planted.evil), "--groups", "--trust-remote-code"]))
    assert outcome.exit_code == 0, outcome.describe()
    assert planted.marker.read_text() == "imported"
    planted.marker.unlink()
    out = planted.root / "out"
    recipe = planted.recipe("trusted", planted.evil, "trust_remote_code: true\nevaluate: {data: 'sklearn:digits', plot: false, max_items: 64}\n")
    outcome = run_cli_case(Case("trusted-run", ["run", str(recipe), str(out)]))
    assert outcome.exit_code == 0, outcome.describe()
    assert (out / "report.json").is_file()


def test_zoo_factories_and_the_recipes_own_architecture_need_no_opt_in(planted: Planted) -> None:
    """A recipe's `architecture:` on the command line is the user's own choice (like transformers' local code)."""
    out = planted.root / "out"
    recipe = planted.recipe("own", planted.evil, f"architecture: {{factory: '{planted.module}:make', kwargs: {{widths: {WIDTHS}}}}}\n"
                            "alignment: {engine: activation_matching, data: 'sklearn:digits', max_items: 64}\n")
    outcome = run_cli_case(Case("own", ["run", str(recipe), str(out)]))
    assert outcome.exit_code == 0, outcome.describe()
    assert planted.marker.exists()


def test_check_happens_before_import() -> None:
    with pytest.raises(UntrustedCodeError, match="config.json: architecture factory 'no_such_pkg_x:f'"):
        zoo.check_factory_trust("no_such_pkg_x:f", source="m/config.json")
    zoo.check_factory_trust("no_such_pkg_x:f", source=None)  # the user named it: allowed
    zoo.check_factory_trust("no_such_pkg_x:f", source="m/config.json", trust_remote_code=True)
    for ref in ("mlp", "resnet", "suture.merge.zoo:mlp", "suture.merge.zoo:resnet_small"):
        zoo.check_factory_trust(ref, source="m/config.json")
    with pytest.raises(UntrustedCodeError):
        zoo.check_factory_trust("suture.merge.zoo:save_module", source="m/config.json")  # in the zoo's module, not a factory


# ------------------------------------------------------------------------------------------------ the app

streamlit = pytest.importorskip("streamlit")


@pytest.fixture
def ws(planted: Planted):
    from suture.app.workspace import Workspace

    return Workspace.open(planted.root / "ws")


def test_app_services_refuse_foreign_factories(planted: Planted, ws) -> None:
    import shutil

    from suture.app import services

    for name in ("evil", "good"):
        shutil.copytree(getattr(planted, name), ws.root / "models" / name)
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ws.root / "models" / name), "parameters": {"weight": 0.5}} for name in ("evil", "good")],
              "evaluate": {"data": "sklearn:digits", "plot": False, "max_items": 64}}
    with pytest.raises(UntrustedCodeError, match="models/evil/config.json: architecture factory"):
        services.run_merge(recipe, ws, device="cpu")
    with pytest.raises(UntrustedCodeError, match="trust toggle|trust_remote_code"):
        services.module(str(ws.root / "models" / "evil"))
    stitch = {"source": {"model": str(ws.root / "models" / "evil"), "layer": 1}, "target": {"model": str(ws.root / "models" / "good"), "layer": 1}, "method": "procrustes"}
    with pytest.raises(SutureError, match="architecture factory .* --trust-remote-code"):
        services.run_stitch(stitch, ws)
    # a recipe's own trust_remote_code does not grant it in the app: only the toggle does
    with pytest.raises(UntrustedCodeError, match="recipe key trust_remote_code"):
        services.run_merge({**recipe, "trust_remote_code": True}, ws, device="cpu")
    assert not planted.imported()
    outcome = services.run_merge(recipe, ws, device="cpu", trust_remote_code=True)
    assert (outcome.out_dir / "report.json").is_file() and planted.marker.exists()


def test_app_architecture_must_be_zoo_workspace_or_trusted(planted: Planted, ws, monkeypatch: pytest.MonkeyPatch) -> None:
    from suture.app import services

    recipe = {"merge_method": "linear", "models": [{"model": "demo:mlp-seed1"}, {"model": "demo:mlp-seed2"}]}
    services.check_architecture({**recipe, "architecture": "suture.merge.zoo:mlp"}, ws)
    with pytest.raises(UntrustedCodeError, match=rf"recipe key architecture: factory '{planted.module}:make'"):
        services.check_architecture({**recipe, "architecture": f"{planted.module}:make"}, ws)
    with pytest.raises(UntrustedCodeError, match="recipe key architecture"):
        services.check_architecture({**recipe, "architecture": {"factory": "os:system", "kwargs": {"command": "true"}}}, ws)
    services.check_architecture({**recipe, "architecture": f"{planted.module}:make"}, ws, trust_remote_code=True)
    # a module that lives in the workspace is the user's own code
    inside = f"mine_{uuid.uuid4().hex[:6]}"
    (ws.root / f"{inside}.py").write_text(f"import pathlib\npathlib.Path({str(planted.marker)!r}).write_text('x')\n")
    monkeypatch.syspath_prepend(str(ws.root))
    services.check_architecture({**recipe, "architecture": f"{inside}:make"}, ws)
    assert not planted.imported() and inside not in sys.modules  # located, never imported


def test_app_confines_every_path_of_a_recipe(planted: Planted, ws) -> None:
    from suture.app import services
    from suture.app.workspace import WorkspaceError

    outside = planted.root / "outside"
    outside.mkdir()
    (outside / "data.npz").write_bytes(b"x")
    (ws.root / "data.npz").write_bytes(b"x")
    base = {"merge_method": "linear", "models": [{"model": "demo:mlp-seed1"}, {"model": "demo:mlp-seed2"}]}
    services.check_recipe_paths({**base, "evaluate": {"data": "data.npz"}}, ws)
    bad = {
        "alignment.data": {**base, "alignment": {"engine": "weight_matching", "data": str(outside / "data.npz")}},
        "evaluate.data": {**base, "evaluate": {"data": {"source": "../outside/data.npz"}}},
        "tokenizer_source": {**base, "tokenizer_source": str(planted.good)},
        "models": {**base, "base_model": str(planted.good), "merge_method": "task_arithmetic"},
        "models (LoRA)": {**base, "models": [{"model": f"demo:mlp-seed1+{planted.good}"}, {"model": "demo:mlp-seed2"}]},
    }
    for key, recipe in bad.items():
        with pytest.raises(WorkspaceError, match=rf"recipe key {key.replace('(', '[(]').replace(')', '[)]')}: .*outside the workspace"):
            services.check_recipe_paths(recipe, ws)
    stitch = {"source": {"model": "demo:mlp-seed1", "layer": 1}, "target": {"model": "demo:mlp-seed2", "layer": 1}, "method": "procrustes"}
    for sub in ("anchors", "evaluate", "head"):
        section = {**stitch, sub: {"data": str(outside / "data.npz")}}
        with pytest.raises(WorkspaceError, match=rf"recipe key stitch.{sub}.data: .*outside the workspace"):
            services.run_stitch(section, ws)
    slices = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(planted.good), "layer_range": [0, 1]}]}]}
    with pytest.raises(WorkspaceError, match="recipe key models: .*outside the workspace"):
        services.check_recipe_paths(slices, ws)
