"""The Streamlit workbench, driven with streamlit.testing.v1.AppTest: every page, the quickstart demo (Git Re-Basin
with its barrier plot), the examples picker, OT and ZipIt options and results, the recipe round trip, workspace
confinement, readable errors, stitching diagnostics and publishing to a local Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from suture.app import services, state  # noqa: E402
from suture.app.workspace import Workspace, WorkspaceError, workspace_from_args  # noqa: E402
from suture.merge.errors import SutureError  # noqa: E402
from tests.hub_server import DEFAULT_TOKEN  # noqa: E402

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
TIMEOUT = 240  # torch import, first-use demo training and merges on a busy 2-core machine


@pytest.fixture(scope="session")
def demo_models(demo_cache: Path) -> Path:
    """The three small demo models, trained once per session in the shared test cache (tests/conftest.py)."""
    from suture.merge.refs import resolve_ref

    for ref in state.DEMO_LIBRARY:
        resolve_ref(ref)
    return demo_cache


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_models: Path) -> Workspace:
    monkeypatch.setenv("SUTURE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return Workspace.open(tmp_path / "ws")


def start(page: str | None = None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    assert not at.exception, [e.value for e in at.exception]
    if page:
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def load_example(at: AppTest, name: str) -> dict:
    """Pick and load an example recipe with the picker of the Models or the Recipe page."""
    where = "recipe" if any(t.value == "Recipe" for t in at.title) else "models"
    at.selectbox(key=f"{where}.examples.pick").set_value(name).run()
    click(at, f"{where}.examples.load")
    assert at.session_state[state.RECIPE] == state.example_recipe(name)
    assert any(f"Loaded the example {name}" in s.value for s in at.success), [s.value for s in at.success]
    return at.session_state[state.RECIPE]


def finish_job(at: AppTest) -> AppTest:
    """Wait for the session's background job (app/jobs.py) to end, then rerun the page to show its outcome."""
    from suture.app.jobs import JobStore
    from suture.app.ui import ACTIVE_JOB

    JobStore(at.session_state[state.WORKSPACE]).wait(at.session_state[ACTIVE_JOB], timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def run_demo_merge(at: AppTest, example: str | None = None) -> dict:
    if example:
        load_example(at, example)
    at.switch_page("views/align_merge.py").run()
    finish_job(click(at, "am.run"))
    assert not at.error, [e.value for e in at.error]
    return at.session_state[state.LAST_RUN]


def frame(at: AppTest, *columns: str):
    """The first table shown whose columns include all of `columns` (tables carry no keys)."""
    for df in at.dataframe:
        value = df.value
        if set(columns) <= set(value.columns):
            return value
    raise AssertionError(f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")


def number(at: AppTest, name: str):
    """The numeric field named `name` (its label goes on with the range it accepts, e.g. "density [0, 1]")."""
    found = [n for n in at.number_input if n.label == name or n.label.startswith(name + " [") or n.label.startswith(name + " (")]
    assert found, [n.label for n in at.number_input]
    return found[0]  # the first (a per-model parameter: the first model's)


def apply(at: AppTest, form: str) -> AppTest:
    """Submit one of Align & merge's forms ("align" options or "params"): its fields take effect only then."""
    return click(at, state.widget_key(at.session_state, "am", f"{form}-apply"))


def tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def write_model(path: Path, seed: int = 0, width: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    data = {"layers.0.weight": torch.randn(width, 4, generator=g), "layers.0.bias": torch.randn(width, generator=g)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(data, str(path))
    return data


# ---------------------------------------------------------------------------------------------- workspace & state


def test_workspace_argument_environment_and_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert workspace_from_args(["--workspace", "a"], {"SUTURE_WORKSPACE": "b"}) == tmp_path / "a"
    assert workspace_from_args(["--other", "x"], {"SUTURE_WORKSPACE": str(tmp_path / "b")}) == tmp_path / "b"
    assert workspace_from_args([], {}) == tmp_path / "suture-workspace"


def test_typed_paths_cannot_leave_the_workspace(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    outside = tmp_path / "secret.safetensors"
    write_model(outside)
    (ws.root / "link").symlink_to(tmp_path)
    for typed in ("../secret.safetensors", str(outside), "link/secret.safetensors", "models/../../secret.safetensors", "~/x"):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            ws.resolve(typed)
    inside = ws.root / "models" / "a.safetensors"
    write_model(inside)
    assert ws.resolve("models/a.safetensors", must_exist=True) == inside
    assert ws.resolve(str(inside)) == inside
    with pytest.raises(WorkspaceError, match="no such file"):
        ws.resolve("models/missing.safetensors", must_exist=True)
    assert inside in ws.list_models()


def test_data_files_must_be_inside_the_workspace(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    torch.save({}, tmp_path / "outside.npz")
    (ws.root / "calib.npz").write_bytes(b"x")
    assert services.confine_data("sklearn:digits?classes=0-4", ws) == "sklearn:digits?classes=0-4"
    assert services.confine_data("calib.npz?max_items=10", ws) == (ws.root / "calib.npz").as_posix() + "?max_items=10"
    assert services.confine_data({"source": "file:calib.npz"}, ws) == {"source": (ws.root / "calib.npz").as_posix()}
    for typed in ("../outside.npz", f"file:{tmp_path / 'outside.npz'}"):
        with pytest.raises(WorkspaceError, match="outside the workspace"):
            services.confine_data(typed, ws)
    recipe = {**state.default_recipe(), "evaluate": {"data": str(tmp_path / "outside.npz")}}
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        services.run_merge(recipe, ws)
    assert list(ws.outputs.iterdir()) == []


def test_uploads_are_checked_and_limited(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    good = tmp_path / "good.safetensors"
    write_model(good)
    stored = ws.save_upload("../../evil/name.safetensors", good.read_bytes(), limit=1 << 20)
    assert stored.parent == ws.uploads and stored.name == "name.safetensors"
    assert torch.equal(load_file(str(stored))["layers.0.bias"], load_file(str(good))["layers.0.bias"])
    with pytest.raises(WorkspaceError, match="over the upload limit"):
        ws.save_upload("big.safetensors", good.read_bytes(), limit=10)
    with pytest.raises(WorkspaceError, match="only .safetensors"):
        ws.save_upload("model.bin", b"\x80\x04pickle", limit=1 << 20)
    with pytest.raises(WorkspaceError, match="not a valid .safetensors"):
        ws.save_upload("broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", limit=1 << 20)
    assert sorted(p.name for p in ws.uploads.iterdir()) == ["name.safetensors"]


def test_edit_keeps_what_the_form_does_not_manage():
    recipe = state.canonical({
        "merge_method": "linear", "models": [{"model": "demo:base", "parameters": {"weight": 1}}, {"model": "demo:finetune-0-4", "parameters": {"weight": 2.0}}],
        "parameters": {"normalize": False}, "dtype": "float32", "chat_template": "chatml",
    })
    edited = state.edit_recipe(recipe, method="linear", base=None, models=["demo:base", "demo:finetune-0-4"],
                               global_params={}, model_params={"demo:base": {"weight": 1}}, known_params=["weight", "normalize"],
                               name=None, dtype="float32")
    assert edited == recipe  # nothing changed: 1 stays 1 (not 1.0), untouched keys stay
    assert state.keep_or_set({"weight": 1}, "weight", 1.0, None) == (True, 1)
    assert state.keep_or_set({}, "lambda", 1.0, 1.0) == (False, None)
    assert state.keep_or_set({}, "normalize", False, True) == (True, False)
    switched = state.edit_recipe(recipe, method="slerp", base="demo:base", models=["demo:finetune-0-4"], global_params={"t": 0.3},
                                 model_params={}, known_params=["t"])
    assert switched["parameters"] == {"t": 0.3} and "parameters" not in switched["models"][0]
    assert switched["chat_template"] == "chatml"


# ---------------------------------------------------------------------------------------------- pages


def test_opens_on_the_quickstart_demo(ws):
    at = start()
    assert [t.value for t in at.title] == ["Models"]
    recipe = at.session_state[state.RECIPE]
    assert recipe == state.example_recipe("quickstart") == state.default_recipe()
    assert recipe["alignment"]["engine"] == "weight_matching" and recipe["evaluate"]["data"] == "sklearn:digits"
    assert state.referenced_refs(recipe) == ["demo:mlp-seed1", "demo:mlp-seed2"]
    listed = at.dataframe[0].value["model"].tolist()
    assert listed[:len(state.DEMO_LIBRARY)] == list(state.DEMO_LIBRARY)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tensors"] == "8"
    assert int(metrics["Parameters"].replace(",", "")) == 64 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 10 + 10
    # the two seeds share one architecture: every engine applies
    assert any("same architecture" in s.value for s in at.success)
    assert not at.status  # the demo models were cached: nothing to train
    at.checkbox(key="models.groups").check().run()
    groups = at.dataframe[-1].value
    assert groups["group"].tolist() == ["layers.0", "layers.1", "layers.2"] and groups["size"].tolist() == [512] * 3
    # every example recipe is offered, the quickstart first
    names = list(state.example_recipes())
    assert names[0] == "quickstart" and at.selectbox(key="models.examples.pick").options == [n.replace("_", " ") for n in names]


def test_demo_models_in_training_are_shown_in_a_status_box(ws, monkeypatch):
    seen = []

    def not_cached(ref: str) -> bool:
        seen.append(ref)
        return False  # as on first use: every demo model has to be built

    monkeypatch.setattr(services, "demo_ready", not_cached)
    at = start()
    assert "demo:mlp-seed1" in seen
    boxes = [s for s in at.status if "Trained on first use" in s.label]
    assert boxes and all(b.state == "complete" for b in boxes), [(s.label, s.state) for s in at.status]
    assert "demo:mlp-seed1" in boxes[0].label
    assert services.demo_ready.__name__ == "not_cached"
    monkeypatch.undo()
    assert services.demo_ready("demo:mlp-seed1") and services.demo_ready("demo:base") and services.demo_ready("models/x")


def test_hub_ids_are_added_without_downloading(ws):
    at = start()
    at.text_input(key="models.hub").set_value("not a repo id").run()
    click(at, "models.add_hub")
    assert any("not a Hub id" in e.value for e in at.error)
    at.text_input(key="models.hub").set_value("someone/some-model@v1").run()
    click(at, "models.add_hub")
    assert "someone/some-model@v1" in at.session_state[state.LIBRARY]
    at.selectbox(key="models.inspect").set_value("someone/some-model@v1").run()
    assert any("downloaded only when you ask" in i.value for i in at.info)
    assert not at.error and not at.exception


def test_models_page_adds_paths_uploads_and_refuses_escapes(ws, tmp_path):
    write_model(ws.root / "models" / "a.safetensors", seed=1)
    write_model(tmp_path / "outside.safetensors", seed=2)
    at = start()
    at.text_input(key="models.path").set_value("models/a.safetensors")
    click(at, "models.add_path")
    added = (ws.root / "models" / "a.safetensors").as_posix()
    assert added in at.session_state[state.LIBRARY]
    before = list(at.session_state[state.LIBRARY])
    for typed in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        at.text_input(key="models.path").set_value(typed)
        click(at, "models.add_path")
        assert any("outside the workspace" in e.value for e in at.error), [e.value for e in at.error]
        assert at.session_state[state.LIBRARY] == before
    # upload: stored under uploads/, usable as a model
    payload = (tmp_path / "outside.safetensors").read_bytes()
    at.file_uploader[0].set_value(("up.safetensors", payload, "application/octet-stream")).run()
    click(at, "models.add_upload")
    stored = ws.uploads / "up.safetensors"
    assert stored.read_bytes() == payload and stored.as_posix() in at.session_state[state.LIBRARY]
    # compatibility of the two small models (same names, different widths) vs the demo set
    write_model(ws.root / "models" / "wide.safetensors", seed=3, width=16)
    at.text_input(key="models.path").set_value("models/wide.safetensors")
    click(at, "models.add_path")
    at.multiselect(key="models.compare").set_value([added, (ws.root / "models" / "wide.safetensors").as_posix()]).run()
    assert any("different widths" in w.value for w in at.warning), [w.value for w in at.warning]


def test_demo_merge_shows_the_barrier_plot_and_is_reused(ws):
    at = start()
    last = run_demo_merge(at)
    out = Path(last["out_dir"])
    assert out.parent == ws.outputs and (out / "model.safetensors").is_file()
    report = last["report"]
    assert report["merge_method"] == "linear" and report["tensors"] == 8 and not last["cached"]
    assert report["alignment"]["engine"] == "weight_matching"
    assert any("Merged 8 tensors with linear" in s.value for s in at.success)
    assert at.status[0].state == "complete" and at.progress[0].value == 100
    # the evidence: aligned interpolation has a far smaller barrier than naive averaging of the two seeds
    barriers = frame(at, "path", "loss barrier").set_index("path")
    assert set(barriers.index) == {"naive", "aligned"}
    assert barriers.loc["aligned", "loss barrier"] < barriers.loc["naive", "loss barrier"] - 0.1
    assert barriers.loc["aligned", "midpoint accuracy"] > barriers.loc["naive", "midpoint accuracy"]
    assert set(services.interpolation_curves(report)) == {"naive", "aligned"}
    objective = services.alignment_objective(report)
    assert list(objective) == ["demo:mlp-seed2"] and objective["demo:mlp-seed2"][-1] >= objective["demo:mlp-seed2"][0]
    # objective plot, barrier plot (loss and accuracy panels) and the scores chart
    assert len(at.get("image")) == 3
    table = frame(at, "model", "accuracy").set_index("model")
    assert table.loc["merged", "accuracy"] == pytest.approx(report["evaluation"]["merged"]["accuracy"])
    assert table.loc["merged", "accuracy"] > 0.9
    # the permutation of a group, recomputed (cached) for the heatmap, is a permutation matrix
    at.checkbox(key="am.show_matrix").check().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("image")) == 4
    matrices = services.alignment_matrices((out / "suture_recipe.yml").read_text(), "cpu", last["out_dir"])
    assert matrices["kind"] == "permutation" and list(matrices["groups"]) == ["layers.0", "layers.1", "layers.2"]
    perm = torch.as_tensor(matrices["groups"]["layers.1"])
    assert perm.shape == (512, 512) and torch.equal(perm.sum(0), torch.ones(512)) and torch.equal(perm.sum(1), torch.ones(512))
    assert not torch.equal(perm, torch.eye(512))  # two seeds: the hidden units really were reordered
    # plot options rerun the page without touching the merge
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    at.multiselect(key="am.curve_metrics").set_value(["loss"]).run()
    at.radio(key="am.eval_metric").set_value("loss").run()
    assert not at.exception and at.session_state[state.LAST_RUN] == last
    # the same recipe again: the finished folder is reused
    finish_job(click(at, "am.run"))
    again = at.session_state[state.LAST_RUN]
    assert again["cached"] and again["out_dir"] == last["out_dir"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_form_widgets_edit_the_recipe(ws):
    at = start()
    load_example(at, "ties_finetunes")
    at.switch_page("views/align_merge.py").run()
    density = number(at, "density")
    density.set_value(0.3)
    apply(at, "params")
    recipe = at.session_state[state.RECIPE]
    assert recipe["models"][0]["parameters"]["density"] == 0.3
    assert recipe["models"][1]["parameters"]["density"] == 0.5
    # the range is shown, and a value outside it is an error right below the field: never clamped, never run
    assert density.label == "density [0, 1]"
    number(at, "density").set_value(99999999999999999999)
    apply(at, "params")
    assert number(at, "density").value == pytest.approx(1e20)  # what was typed, not 1
    assert any(e.value.startswith("density: must be in [0, 1], got 1e+20") for e in at.error), [e.value for e in at.error]
    assert at.session_state[state.RECIPE]["models"][0]["parameters"]["density"] == 0.3  # the last valid value
    assert at.button(key="am.run").disabled and any("Out of range: density" in e.value for e in at.error)
    number(at, "density").set_value(0.4)
    apply(at, "params")
    assert not at.error and not at.button(key="am.run").disabled
    assert at.session_state[state.RECIPE]["models"][0]["parameters"]["density"] == 0.4
    at.selectbox(key=state.widget_key(at.session_state, "am", "method")).set_value("task_arithmetic").run()
    recipe = at.session_state[state.RECIPE]
    assert recipe["merge_method"] == "task_arithmetic" and recipe["base_model"] == "demo:base"
    # method needing exactly one model besides the base: the form shows why the recipe is invalid, Run is off
    at.selectbox(key=state.widget_key(at.session_state, "am", "method")).set_value("slerp").run()
    assert any("slerp merges exactly two models" in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="am.run").disabled
    # a data file typed outside the workspace is refused and never reaches the recipe
    at.selectbox(key=state.widget_key(at.session_state, "am", "method")).set_value("ties").run()
    at.checkbox(key=state.widget_key(at.session_state, "am", "evaluate")).check().run()
    at.text_input(key=state.widget_key(at.session_state, "am", "data")).set_value("../../etc/hosts.txt").run()
    assert any("outside the workspace" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state[state.RECIPE]["evaluate"] == {"data": "sklearn:digits"}
    at.text_input(key=state.widget_key(at.session_state, "am", "data")).set_value("sklearn:digits").run()
    at.checkbox(key=state.widget_key(at.session_state, "am", "evaluate")).uncheck().run()
    # engines: each shows only its own options, filled with the library's defaults, which stay out of the recipe
    assert services.runner_engines() == {"weight_matching", "activation_matching", "ot", "zipit", "cca"}
    at.selectbox(key=state.widget_key(at.session_state, "am", "method")).set_value("ties").run()
    engine_box = at.selectbox(key=state.widget_key(at.session_state, "am", "engine"))
    engine_box.set_value("weight_matching").run()
    assert at.session_state[state.RECIPE]["alignment"] == {"engine": "weight_matching"}
    assert not any("not available in this build" in w.value for w in at.warning)
    labels = {n.label: n.value for n in at.number_input}
    assert labels["Max iterations (≥ 1)"] == 100 and not any(label.startswith("alpha") for label in labels)
    number(at, "Max iterations").set_value(0)
    apply(at, "align")
    assert any(e.value == "Max iterations: must be greater than or equal to 1, got 0." for e in at.error), [e.value for e in at.error]
    assert at.session_state[state.RECIPE]["alignment"] == {"engine": "weight_matching"} and at.button(key="am.run").disabled
    number(at, "Max iterations").set_value(100)
    apply(at, "align")
    assert not at.error
    at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).set_value("ot").run()
    recipe = at.session_state[state.RECIPE]
    assert recipe["alignment"] == {"engine": "ot", "data": "sklearn:digits"} and recipe["merge_method"] == "ties"
    shown = {w.label.split(" (")[0].split(" [")[0] for w in [*at.selectbox, *at.number_input, *at.checkbox, *at.text_input]}
    assert {"Ground metric", "Distance", "Solver", "Unit masses", "Normalize features", "Target widths", "Reference share"} <= shown
    assert "Sinkhorn regularisation" not in shown and "Seed" not in shown and "Matcher" not in shown
    solver = [b for b in at.selectbox if b.label == "Solver"][0]
    assert solver.value == "emd" and "Singh & Jaggi" in " ".join(c.value for c in at.caption)
    solver.set_value("sinkhorn")
    apply(at, "align")
    reg = number(at, "Sinkhorn regularisation")
    assert reg.value == pytest.approx(0.05)
    reg.set_value(0.1)
    apply(at, "align")
    assert at.session_state[state.RECIPE]["alignment"] == {"engine": "ot", "data": "sklearn:digits", "solver": "sinkhorn", "reg": 0.1}
    # ZipIt builds the model itself: its options replace the merge method, the OT options are dropped
    at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).set_value("zipit").run()
    assert not at.exception, [e.value for e in at.exception]
    recipe = at.session_state[state.RECIPE]
    assert recipe["alignment"] == {"engine": "zipit", "data": "sklearn:digits"}, recipe["alignment"]
    labels = {w.label.split(" [")[0].removesuffix(" (≥ 0)"): w.value for w in [*at.selectbox, *at.number_input, *at.text_input]}
    assert labels["alpha (merge decay)"] == 0.5 and labels["beta (within-model budget)"] == 1.0
    assert labels["Matcher"] == "zip" and labels["Heads"] == "concat" and labels["Zip up to group"] == ""
    assert "Solver" not in labels and "Method" not in labels
    assert any("Stoica" in c.value for c in at.caption)


def test_recipe_round_trip_export_import_identical_state(ws):
    at = start()
    load_example(at, "ties_finetunes")
    at.switch_page("views/align_merge.py").run()
    number(at, "lambda").set_value(0.8)
    apply(at, "params")
    at.text_input(key=state.widget_key(at.session_state, "am", "name")).set_value("round trip").run()
    at.switch_page("views/recipe.py").run()
    before = dict(at.session_state[state.RECIPE])
    assert before["parameters"]["lambda"] == 0.8
    payload = state.recipe_payload(before)
    assert at.code[0].value.strip() == payload.decode().strip()  # the YAML shown is the download
    assert state.download_name(before) == "round-trip.yaml"
    version = at.session_state[state.VERSION]
    at.file_uploader[0].set_value(("round-trip.yaml", payload, "application/x-yaml")).run()
    click(at, "recipe.use_upload")
    assert at.session_state[state.VERSION] == version + 1
    assert at.session_state[state.RECIPE] == before
    assert any("Loaded round-trip.yaml" in s.value for s in at.success)
    # visiting the form after the import does not change the recipe
    at.switch_page("views/align_merge.py").run()
    at.switch_page("views/recipe.py").run()
    assert at.session_state[state.RECIPE] == before
    assert state.recipe_payload(at.session_state[state.RECIPE]) == payload


def test_every_example_loads_and_round_trips(ws):
    at = start("recipe")
    assert {"quickstart", "resnet_rebasin", "ties_finetunes", "zipit_tasks"} <= set(state.example_recipes())
    for name in state.example_recipes():
        expected = load_example(at, name)
        assert set(state.referenced_refs(expected)) <= set(at.session_state[state.LIBRARY])
        # the form shows the example without changing it (engine options included)
        at.switch_page("views/align_merge.py").run()
        assert not at.exception and not at.error, (name, [e.value for e in at.error])
        if "stitch" not in expected:
            engine = at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).value
            assert engine == (expected.get("alignment") or {}).get("engine", "(none)")
        assert at.session_state[state.RECIPE] == expected, name
        # export -> import -> identical state
        at.switch_page("views/recipe.py").run()
        payload = state.recipe_payload(at.session_state[state.RECIPE])
        at.file_uploader[0].set_value((f"{name}.yaml", payload, "application/x-yaml")).run()
        click(at, "recipe.use_upload")
        assert at.session_state[state.RECIPE] == expected, name
        assert state.recipe_payload(at.session_state[state.RECIPE]) == payload


MERGEKIT_STYLE = [
    # base listed among the models, a gradient, mergekit-only flags
    "models:\n  - model: demo:finetune-0-4\n    parameters: {density: 0.5, weight: 0.5}\n"
    "  - model: demo:finetune-5-9\n    parameters: {density: 0.5, weight: [0.3, 0.7]}\n  - model: demo:base\n"
    "merge_method: ties\nbase_model: demo:base\nparameters: {normalize: true, int8_mask: true}\ndtype: float16\n",
    # global per-model parameter and filtered conditions
    "merge_method: slerp\nbase_model: demo:base\nmodels:\n  - model: demo:base\n  - model: demo:finetune-0-4\n"
    "parameters:\n  t:\n    - filter: layers.0\n      value: [0, 0.5]\n    - value: 0.5\n",
    "merge_method: linear\nmodels:\n  - model: demo:finetune-0-4\n  - model: demo:finetune-5-9\nparameters: {weight: 0.5}\n",
]


@pytest.mark.parametrize("text", MERGEKIT_STYLE)
def test_visiting_the_form_leaves_an_imported_recipe_unchanged(ws, text):
    at = start("recipe")
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(text).run()
    click(at, "recipe.apply")
    assert not at.error, [e.value for e in at.error]
    imported = at.session_state[state.RECIPE]
    assert imported == state.canonical(text)
    at.switch_page("views/align_merge.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state[state.RECIPE] == imported


def test_exported_recipe_gives_the_same_tensors_with_suture_run(ws, tmp_path):
    from suture.recipes.cli import main

    at = start()
    last = run_demo_merge(at)  # the quickstart: weight matching, then linear
    recipe_file = tmp_path / "exported.yaml"
    recipe_file.write_bytes(state.recipe_payload(at.session_state[state.RECIPE]))
    assert main(["run", str(recipe_file), str(tmp_path / "cli-out"), "-q"]) == 0
    app_tensors, cli_tensors = tensors(last["out_dir"]), tensors(tmp_path / "cli-out")
    assert app_tensors.keys() == cli_tensors.keys() and len(app_tensors) == 8
    for name in app_tensors:
        assert torch.equal(app_tensors[name], cli_tensors[name]), name


def test_bad_recipes_and_failing_runs_show_readable_errors(ws, tmp_path):
    at = start("recipe")
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value("merge_method: linear\nmodelz: []\n").run()
    click(at, "recipe.apply")
    assert any("unknown key 'modelz'" in e.value and "line 2" in e.value for e in at.error), [e.value for e in at.error]
    write_model(tmp_path / "outside.safetensors")
    outside = f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'outside.safetensors'}\n    parameters: {{weight: 1.0}}\n"
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(outside).run()
    click(at, "recipe.apply")
    assert any("outside the workspace" in e.value for e in at.error)
    outside_data = "merge_method: linear\nmodels:\n  - model: demo:base\n    parameters: {weight: 1.0}\nevaluate: {data: ../../x.npz}\n"
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(outside_data).run()
    click(at, "recipe.apply")
    assert any("outside the workspace" in e.value for e in at.error)
    assert at.session_state[state.RECIPE] == state.canonical(state.default_recipe())
    # a recipe that validates but cannot run: shapes differ, the library's message is shown, no traceback
    write_model(ws.root / "models" / "a.safetensors", width=8)
    write_model(ws.root / "models" / "b.safetensors", width=16)
    mixed = "merge_method: linear\nmodels:\n  - model: models/a.safetensors\n    parameters: {weight: 1.0}\n  - model: models/b.safetensors\n    parameters: {weight: 1.0}\n"
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(mixed).run()
    click(at, "recipe.apply")
    assert state.referenced_refs(at.session_state[state.RECIPE]) == [(ws.root / "models" / n).as_posix() for n in ("a.safetensors", "b.safetensors")]
    finish_job(click(at, "recipe.run"))
    assert any("different shapes" in e.value for e in at.error), [e.value for e in at.error]
    assert at.status[0].state == "error" and not list(ws.outputs.iterdir())


def test_non_finite_merge_is_shown_as_failed_not_as_a_success(ws):
    """Weights of 1e5 merged into float16 overflow to inf: the folder is written, but the page shows an error."""
    (ws.root / "models").mkdir(parents=True, exist_ok=True)
    save_file({"layers.0.weight": torch.full((4, 4), 1e5), "layers.0.bias": torch.ones(4)}, str(ws.root / "models" / "big.safetensors"))
    text = "merge_method: linear\nout_dtype: float16\nmodels:\n  - model: models/big.safetensors\n    parameters: {weight: 1.0}\n"
    at = start("recipe")
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(text).run()
    click(at, "recipe.apply")
    finish_job(click(at, "recipe.run"))
    assert any("NaN/Inf" in e.value and "layers.0.weight" in e.value for e in at.error), [e.value for e in at.error]
    assert at.status[0].state == "error"
    assert state.LAST_RUN not in at.session_state
    outcome = services.run_merge(at.session_state[state.RECIPE], ws)  # reused: still flagged
    assert outcome.cached and outcome.report["non_finite"] == {"tensors": ["layers.0.weight"], "count": 1}
    assert outcome.problem and outcome.as_dict()["problem"] == outcome.problem


def test_zipit_on_the_task_demo_shows_joint_accuracy_and_stop_sweep(ws):
    at = start()
    load_example(at, "zipit_tasks")
    at.switch_page("views/align_merge.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("no merge method applies" in i.value for i in at.info)
    alpha = number(at, "alpha (merge decay)")
    alpha.set_value(0.4)
    apply(at, "align")
    recipe = at.session_state[state.RECIPE]
    assert recipe["alignment"]["alpha"] == 0.4 and "merge_method" not in recipe
    finish_job(click(at, "am.run"))
    assert not at.error, [e.value for e in at.error]
    report = at.session_state[state.LAST_RUN]["report"]
    assert report["alignment"]["engine"] == "zipit" and report["alignment"]["alpha"] == 0.4
    assert any("Zipped 2 models with ZipIt!" in s.value for s in at.success)
    joint = frame(at, "model", "accuracy").set_index("model")
    assert list(joint.index) == ["zipit (this recipe)", "naive averaging", "permutation", "ensemble (upper bound)"]
    ev = report["evaluation"]
    assert joint.loc["zipit (this recipe)", "accuracy"] == pytest.approx(ev["merged"]["accuracy"])
    # the paper's point on models trained on different tasks: zipping beats averaging and permuting
    assert joint.loc["zipit (this recipe)", "accuracy"] > joint.loc["naive averaging", "accuracy"] + 0.05
    assert joint.loc["zipit (this recipe)", "accuracy"] > joint.loc["permutation", "accuracy"] + 0.05
    sweep = frame(at, "stop_at", "accuracy")
    assert sweep["stop_at"].tolist() == ["full", "layers.1", "layers.0"]
    assert sweep["accuracy"].tolist() == pytest.approx([r["accuracy"] for r in ev["stop_sweep"]])
    # stop-sweep plot and the joint-accuracy chart
    assert len(at.get("image")) == 2
    groups = frame(at, "group", "within-model merges")
    assert groups["group"].tolist() == ["layers.0", "layers.1", "layers.2"] and (groups["size"] == 128).all()


def test_ot_fuses_two_workspace_mlps_of_different_widths(ws):
    from suture.merge import demo, zoo
    from suture.merge.data import load_dataset

    data = load_dataset("sklearn:digits", split="train")
    for name, widths, seed in (("narrow", [64, 32, 32, 10], 1), ("wide", [64, 48, 48, 10], 2)):
        module = zoo.build_seeded("suture.merge.zoo:mlp", seed, widths=widths)
        demo.train(module, data, epochs=8, seed=seed)
        zoo.save_module(module, ws.root / "models" / name, "suture.merge.zoo:mlp", {"widths": widths})
    text = ("name: ot-widths\nmerge_method: linear\nmodels:\n  - model: models/narrow\n    parameters: {weight: 0.5}\n"
            "  - model: models/wide\n    parameters: {weight: 0.5}\nalignment: {engine: ot, data: sklearn:digits}\n"
            "evaluate: {data: sklearn:digits, points: 5}\n")
    at = start("recipe")
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(text).run()
    click(at, "recipe.apply")
    at.switch_page("views/align_merge.py").run()
    assert at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).value == "ot"
    [b for b in at.selectbox if b.label == "Solver"][0].set_value("sinkhorn")
    apply(at, "align")
    number(at, "Sinkhorn regularisation").set_value(0.05)
    apply(at, "align")
    assert at.session_state[state.RECIPE]["alignment"]["solver"] == "sinkhorn"
    finish_job(click(at, "am.run"))
    assert not at.error, [e.value for e in at.error]
    report = at.session_state[state.LAST_RUN]["report"]
    assert report["alignment"]["engine"] == "ot"
    # per-group transport figures: B's 48 units onto the reference's 32
    stats = frame(at, "group", "size_a", "size_b")
    assert stats["group"].tolist() == ["layers.0", "layers.1"]
    assert (stats["size_a"] == 32).all() and (stats["size_b"] == 48).all() and stats["converged"].all()
    barriers = frame(at, "path", "loss barrier").set_index("path")
    assert set(barriers.index) == {"truncated", "aligned"}
    mids = report["evaluation"]["midpoint_accuracy"]
    assert mids["aligned"] > mids["truncated"]  # transport beats cutting the wide model down
    images = len(at.get("image"))
    at.checkbox(key="am.show_matrix").check().run()
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("image")) == images + 1
    out = Path(at.session_state[state.LAST_RUN]["out_dir"])
    matrices = services.alignment_matrices((out / "suture_recipe.yml").read_text(), "cpu", str(out))
    plan = torch.as_tensor(matrices["groups"]["layers.0"])
    assert matrices["kind"] == "transport" and plan.shape == (32, 48)
    # uniform marginals: every reference unit receives 1/32 of the mass, every unit of B sends 1/48
    assert torch.allclose(plan.sum(1), torch.full((32,), 1 / 32, dtype=plan.dtype), atol=1e-3)
    assert torch.allclose(plan.sum(0), torch.full((48,), 1 / 48, dtype=plan.dtype), atol=1e-3)


def test_cancelled_run_leaves_nothing(ws):
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException

    seen = []

    def interrupt(stage, done, total, detail):
        seen.append(stage)
        if stage == "merge" and done >= 2:
            raise RerunException(None)  # what a click on Cancel raises inside the next progress update

    with pytest.raises(RerunException):
        services.run_merge(state.example_recipe("ties_finetunes"), ws, progress=interrupt)
    assert "merge" in seen
    # no result and no hidden temporary folder: only the output's empty lock file
    assert [p.name for p in ws.outputs.iterdir() if not p.name.endswith(".lock")] == []


def test_dry_run_plan_on_the_recipe_page(ws):
    at = start("recipe")
    click(at, "recipe.plan")
    plan = at.dataframe[0].value
    assert len(plan) == 8 and not at.error


def test_stitch_page_similarity_and_map(ws):
    at = start("stitch")
    at.selectbox(key="stitch.a").set_value("demo:finetune-0-4")
    at.selectbox(key="stitch.b").set_value("demo:finetune-5-9")
    at.slider(key="stitch.samples").set_value(200)
    click(at, "stitch.compute")
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["stitch.layers"] == {"a": ["layers.0", "layers.1"], "b": ["layers.0", "layers.1"]}
    assert len(at.get("image")) == 1
    # cut B follows cut A (and can still be set on its own)
    at.selectbox(key="stitch.layer_a").set_value("layers.1").run()
    assert at.selectbox(key="stitch.layer_b").value == "layers.1"
    at.selectbox(key="stitch.layer_b").set_value("layers.0").run()
    assert at.selectbox(key="stitch.layer_a").value == "layers.1" and at.selectbox(key="stitch.layer_b").value == "layers.0"
    result = services.similarity_matrix("demo:finetune-0-4", "demo:finetune-5-9", "sklearn:digits", "cka", 200)
    self_sim = services.similarity_matrix("demo:finetune-0-4", "demo:finetune-0-4", "sklearn:digits", "cka", 200)
    assert torch.allclose(torch.as_tensor(self_sim["matrix"]).diagonal(), torch.ones(2, dtype=torch.float64))
    # fine-tunes of one base stay close layer by layer
    assert result["matrix"][0][0] > 0.7 and result["matrix"].min() > 0.3
    # plot options do not recompute (cached), and the map scores on held-out data
    at.selectbox(key="stitch.cmap").set_value("magma").run()
    at.selectbox(key="stitch.method").set_value("Procrustes")
    click(at, "stitch.fit")
    scores = at.session_state["stitch.scores"]
    from suture.merge.data import load_dataset

    assert scores["method"] == "Procrustes" and scores["test samples"] == len(load_dataset("sklearn:digits", split="test"))
    assert 0.3 < scores["R² (translated A vs B)"] <= 1.0
    at.selectbox(key="stitch.method").set_value("relative")
    click(at, "stitch.fit")
    assert 0.0 < at.session_state["stitch.scores"]["mean cosine (relative A vs B)"] <= 1.0


def test_stitch_helpers_match_cuts_and_show_each_result_once():
    assert services.matching_layer("layers.2", ["layers.0", "layers.1", "layers.2"], ["layers.0", "layers.1", "layers.2"]) == "layers.2"
    assert services.matching_layer("blocks.3", ["blocks.1", "blocks.3"], ["layers.0", "layers.1", "layers.2"]) == "layers.1"
    assert services.matching_layer("blocks.9", ["blocks.1", "blocks.9"], ["layers.0"]) == "layers.0"
    report = {"method": "procrustes", "evaluate": {"results": {
        "target_head": {"accuracy": 0.9}, "procrustes": {"accuracy": 0.8, "f1_macro": 0.79}, "stitch": {"accuracy": 0.8, "f1_macro": 0.79}}}}
    assert [r["model"] for r in services.stitch_result_rows(report)] == ["target_head", "procrustes (chosen)"]
    names = ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert services.format_cut({"source_layer": 3, "target_layer": 2, "cka": 0.8712, "accuracy": 0.9123, "f1_macro": None}, names, names) == {
        "cut in A": "layers.2", "cut in B": "layers.1", "stitched accuracy": "0.912", "macro F1": "—", "CKA": "0.871"}
    assert services.cut_choices(names) == names[:3] and services.layer_name(names, 0) == "input"


def test_stitch_page_runs_the_stitch(ws):
    at = start("stitch")
    at.selectbox(key="stitch.a").set_value("demo:mlp-seed1")
    at.selectbox(key="stitch.b").set_value("demo:mlp-seed2")
    at.run()
    # one convention: cuts are module names (those of the similarity heatmap), B's cut follows A's, penultimate by default
    assert at.selectbox(key="stitch.run.layer_a").options == ["layers.0", "layers.1", "layers.2"]
    assert at.selectbox(key="stitch.run.layer_a").value == "layers.2" == at.selectbox(key="stitch.run.layer_b").value
    assert not any("counted from" in c.value for c in at.caption)
    at.selectbox(key="stitch.run.layer_a").set_value("layers.1").run()
    assert at.selectbox(key="stitch.run.layer_b").value == "layers.1"
    assert number(at, "Anchors").label == "Anchors (≥ 1)"
    number(at, "Anchors").set_value(0)
    click(at, "stitch.run")  # out of range: an error under the field, nothing starts
    assert any(e.value == "Anchors: must be greater than or equal to 1, got 0." for e in at.error), [e.value for e in at.error]
    assert not (ws.root / "jobs").exists() or not list((ws.root / "jobs").iterdir())
    number(at, "Anchors").set_value(256)
    at.selectbox(key="stitch.run.method").set_value("procrustes")
    at.checkbox(key="stitch.run.plan").check()
    click(at, "stitch.run")
    # the stitch runs in a worker process (a `stitch` job), not in the page script
    from suture.app.jobs import JobStore

    [job] = JobStore(ws.root).list()
    assert job.kind == "stitch" and job.pid != os.getpid() and job.recipe["stitch"]["method"] == "procrustes"
    JobStore(ws.root).wait(job.id, timeout=TIMEOUT)
    at.run()
    assert not at.error, [e.value for e in at.error]
    assert at.status[-1].state == "complete"
    done = at.session_state["stitch.run.result"]
    assert done["job"] == job.id and Path(done["out_dir"]) == Path(job.out_dir)
    report = done["report"]
    assert Path(done["out_dir"]).parent == ws.outputs and (Path(done["out_dir"]) / "stitched").is_dir()
    assert report["source"] == {**report["source"], "model": "demo:mlp-seed1", "layer": 2}
    results = frame(at, "model", "accuracy").set_index("model")
    # A's units feed B in another order: the fitted map recovers most of B's accuracy, a naive cut does not
    chosen = f"{report['method']} (chosen)"  # the chosen method's row, once (not again as "stitch")
    assert "stitch" not in results.index and list(results.index).count(chosen) == 1
    assert results.loc[chosen, "accuracy"] > 0.8 and results.loc["naive_absolute", "accuracy"] < 0.5
    assert results.loc[chosen, "accuracy"] == pytest.approx(report["evaluate"]["results"]["stitch"]["accuracy"])
    assert len(report["plots"]) == 2 and len(at.get("image")) == 2  # similarity (drawn with module names) and accuracy
    assert any("cut at layers.1" in s.value and "(at layers.1)" in s.value for s in at.success), [s.value for s in at.success]
    # the planner's table: every pair of the three hidden layers by module name, CKA highest on the diagonal
    planned = [d.value for d in at.dataframe if "cut in A" in d.value.columns]
    best, table = planned
    assert len(best) == 1 and len(table) == 9 and set(table["cut in A"]) == {"layers.0", "layers.1", "layers.2"}
    cka = table["CKA"].astype(float)
    same = table["cut in A"] == table["cut in B"]
    assert cka[same].min() > cka[~same].min()
    top = max(report["plan"]["rows"], key=lambda r: (round(r["accuracy"], 12), r["cka"]))
    assert best.iloc[0]["stitched accuracy"] == f"{top['accuracy']:.3f}"
    # a new session (a reloaded browser) opens the finished stitch from the Jobs panel
    again = start("models")
    click(again, f"jobs.open.{job.id}")
    assert any(t.value == "Stitch" for t in again.title)
    assert again.session_state["stitch.run.result"]["out_dir"] == done["out_dir"]
    assert any(Path(done["out_dir"]).name in s.value for s in again.success), [s.value for s in again.success]


def test_cancel_of_a_stitch_job_kills_its_worker_and_leaves_no_temporary_folder(ws, monkeypatch):
    import time

    from suture.app.jobs import STEP_DELAY_ENV, JobStore
    from tests.test_jobs import gone

    monkeypatch.setenv(STEP_DELAY_ENV, "features:3")  # the worker (inheriting this environment) lingers in "features"
    at = start("stitch")
    at.selectbox(key="stitch.a").set_value("demo:mlp-seed1")
    at.selectbox(key="stitch.b").set_value("demo:mlp-seed2")
    click(at, "stitch.run")
    store = JobStore(ws.root)
    [job] = store.list()
    deadline = time.monotonic() + TIMEOUT
    while store.get(job.id).stage != "features" and time.monotonic() < deadline:
        time.sleep(0.2)
    out = Path(job.out_dir)
    assert [q for q in ws.outputs.iterdir() if q.name.startswith(f".{out.name}.suture-tmp-")], "stitching inside its temp folder"
    at.run()
    assert any("Running: computing features" in s.label for s in at.status), [s.label for s in at.status]
    click(at, "stitch.job.cancel")
    assert gone(job.pid), "the worker must be gone after Cancel"
    assert store.get(job.id).state == "cancelled"
    assert any("Cancelled" in w.value for w in at.warning), [w.value for w in at.warning]
    assert "stitch.run.result" not in at.session_state and not at.success
    assert [q.name for q in ws.outputs.iterdir() if not q.name.endswith(".lock")] == []


def test_publish_pushes_to_a_hub_without_keeping_the_token(ws, hub_server):
    at = start()
    last = run_demo_merge(at, "ties_finetunes")
    at.switch_page("views/publish.py").run()
    assert not at.exception
    body = "\n".join(m.value for m in at.markdown)
    assert "ties" in body and "demo:finetune-0-4" in body  # the model card preview
    assert any("base_model_relation" in c.value or "tags" in c.value for c in at.code)
    at.text_input(key=state.widget_key(at.session_state, "publish.repo")).set_value("tester/workbench-demo").run()
    token_box = [t for t in at.text_input if "token" in t.label.lower()][0]
    token_box.set_value(DEFAULT_TOKEN).run()
    click(at, "publish.push")
    # the push runs in a worker process (a `publish` job); its record holds no token
    from suture.app.jobs import JobStore
    from suture.app.ui import PUBLISH_JOB

    job = JobStore(ws.root).get(at.session_state[PUBLISH_JOB])
    assert job.kind == "publish" and job.pid != os.getpid()
    job = JobStore(ws.root).wait(job.id, timeout=TIMEOUT)
    at.run()
    assert not at.error, [e.value for e in at.error]
    url = f"{hub_server.url}/tester/workbench-demo"
    assert job.state == "finished" and job.result["url"] == url
    assert any(url in s.value for s in at.success), [s.value for s in at.success]
    pushed = hub_server.list_files("tester/workbench-demo")
    assert {"model.safetensors", "README.md", "suture_recipe.yml", "report.json"} <= set(pushed)
    assert hub_server.file_bytes("tester/workbench-demo", "model.safetensors") == (Path(last["out_dir"]) / "model.safetensors").read_bytes()
    # the token is nowhere in the session state or the workspace
    assert DEFAULT_TOKEN not in repr(at.session_state.to_dict())
    for path in ws.root.rglob("*"):
        if path.is_file():
            assert DEFAULT_TOKEN.encode() not in path.read_bytes(), path
    # storing the repository in the recipe adds a publish section (never the token)
    at.checkbox(key=state.widget_key(at.session_state, "publish.keep")).check().run()
    assert at.session_state[state.RECIPE]["publish"] == {"repo_id": "tester/workbench-demo"}


def test_publish_reports_a_missing_token(ws, hub_server):
    at = start()
    run_demo_merge(at, "ties_finetunes")
    at.switch_page("views/publish.py").run()
    at.text_input(key=state.widget_key(at.session_state, "publish.repo")).set_value("tester/no-token").run()
    click(at, "publish.push")
    assert any("no Hugging Face token" in e.value for e in at.error), [e.value for e in at.error]
    message = next(e.value for e in at.error if "no Hugging Face token" in e.value)
    assert "`hf auth login`" in message and "HF_TOKEN" in message and "token=" not in message  # said to a person
    assert at.status[0].state == "error"


def test_publish_previews_the_card_plot_and_holds_back_non_finite_results(ws):
    import json

    from matplotlib.figure import Figure

    good, bad = ws.outputs / "good-0123456789", ws.outputs / "nan-0123456789"
    for folder, count in ((good, 0), (bad, 2)):
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({"merge_method": "linear", "models": ["demo:mlp-seed1", "demo:mlp-seed2"],
                                                        "non_finite": {"tensors": ["fc.weight"] * count, "count": count}}))
        (folder / "README.md").write_text("---\ntags:\n- merge\n---\n\n# merged\n\n## Evaluation\n\n"
                                          "![Evaluation plot](interpolation.png)\n\nafter the plot\n")
    Figure(figsize=(2, 1)).savefig(good / "interpolation.png")
    diverged = ws.outputs / "diverged-0123456789"  # finite weights, but the merged model's loss is NaN
    diverged.mkdir()
    (diverged / "report.json").write_text(json.dumps({"merge_method": "linear", "models": ["demo:mlp-seed1", "demo:mlp-seed2"],
                                                      "evaluation": {"merged": {"loss": float("nan"), "accuracy": 0.1}}}))
    at = start("publish")
    assert not at.exception, [e.value for e in at.exception]
    box = at.selectbox(key="publish.folder")
    assert len(box.options) == 1 and "good-0123456789" in box.options[0] and "linear · demo:mlp-seed1" in box.options[0]
    assert any("nan-0123456789" in w.value and "NaN/Inf" in w.value for w in at.warning), [w.value for w in at.warning]
    assert any("diverged-0123456789" in w.value and "merged model loss = nan" in w.value for w in at.warning)
    with pytest.raises(SutureError, match="diverged-0123456789: not published: non-finite evaluation figures"):
        services.start_push_job(diverged, ws, "tester/x", private=False, token="t")
    assert not (ws.root / "jobs").exists() or not list((ws.root / "jobs").iterdir())
    assert len(at.get("image")) == 1  # the card's plot, loaded from the folder
    body = "\n".join(m.value for m in at.markdown)
    assert "after the plot" in body and "![Evaluation plot]" not in body
    assert services.card_parts("a ![p](x.png) b ![q](https://e.org/y.png)") == [
        ("text", "a "), ("image", "x.png"), ("text", " b ![q](https://e.org/y.png)")]


def test_report_figures_are_read_when_present(tmp_path):
    report = {"alignment": {"engine": "weight_matching", "models": {"b": {"objective": 2.75, "objective_per_iteration": [1.0, 2.5, 2.75]}}},
              "evaluation": {"merged": {"loss": 0.5, "accuracy": 0.8}, "models": {"a": {"loss": 0.4, "accuracy": 0.9}},
                             "barriers": {"aligned": {"loss": 0.02, "loss_midpoint": None, "accuracy": 0.01}},
                             "curves": {"aligned": [{"t": 0.0, "loss": 1.0, "accuracy": 0.9}, {"t": 1.0, "loss": 1.1, "accuracy": 0.9}]}}}
    assert services.alignment_objective(report) == {"b": [1.0, 2.5, 2.75]}
    assert list(services.interpolation_curves(report)) == ["aligned"]
    assert services.evaluation_rows(report) == [{"model": "a", "loss": 0.4, "accuracy": 0.9}, {"model": "merged", "merged": True, "loss": 0.5, "accuracy": 0.8}]
    assert services.barrier_rows(report) == [{"path": "aligned", "loss barrier": 0.02, "accuracy barrier": 0.01}]
    noisy = {"evaluation": {"barriers": {"aligned": {"loss": -4e-9, "accuracy": -0.02}}, "midpoint_accuracy": {"aligned": 0.97}}}
    # float noise at an exact match reads 0, a real dip below the endpoints' line stays negative
    assert services.barrier_rows(noisy) == [{"path": "aligned", "loss barrier": 0.0, "accuracy barrier": -0.02, "midpoint accuracy": 0.97}]
    assert services.alignment_objective({"alignment": {"models": {"b": {"objective": 3.0}}}}) == {}
    from suture.app import plots

    fig = plots.interpolation(services.interpolation_curves(report))
    assert len(fig.axes) == 2
    assert len(plots.objective({"b": [1.0, 2.0]}).axes[0].lines) == 1


def test_plots_share_font_sizes_show_accuracy_differences_and_keep_legends_off_the_lines():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from suture.app import plots
    from suture.merge.plot import FONT

    curve = [{"t": t, "loss": 0.1 + t * (1 - t), "accuracy": 0.98 - 0.05 * t * (1 - t)} for t in (0.0, 0.5, 1.0)]
    fig = plots.interpolation({"run one · naive": curve, "run two · aligned": curve})
    FigureCanvasAgg(fig).draw()
    legend = fig.legends[0]
    assert not any(ax.get_legend() for ax in fig.axes)  # one legend for the figure, not one over each panel
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert all(box.y1 <= ax.get_window_extent(renderer).y0 for ax in fig.axes)  # below the panels
    sizes = {t.get_fontsize() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}
    assert sizes == {FONT["tick"]} and {ax.xaxis.label.get_fontsize() for ax in fig.axes} == {FONT["label"]}
    # 0.97 vs 0.98 on an axis that does not start at 0
    bars = plots.scores([{"model": "a", "accuracy": 0.97}, {"model": "merged", "accuracy": 0.98, "merged": True}])
    low, high = bars.axes[0].get_xlim()
    assert 0.9 < low < 0.97 and 0.98 < high < 1.0
    assert plots.scores([{"model": "a", "accuracy": 0.1}, {"model": "b", "accuracy": 0.9}]).axes[0].get_xlim()[0] == 0.0
    # iterations are whole numbers
    obj = plots.objective({"b": [1.0, 2.0, 2.5, 2.6, 2.7]})
    FigureCanvasAgg(obj).draw()
    assert all(float(t).is_integer() for t in obj.axes[0].get_xticks())
