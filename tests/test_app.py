"""The Streamlit workbench, driven with streamlit.testing.v1.AppTest: every page, the demo merge, the recipe
round trip, workspace confinement, readable errors, stitching diagnostics and publishing to a local Hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app import services, state  # noqa: E402
from app.workspace import Workspace, WorkspaceError, workspace_from_args  # noqa: E402
from tests.hub_server import DEFAULT_TOKEN, hub_server  # noqa: E402,F401 - hub_server is a fixture

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
TIMEOUT = 240  # torch import, first-use demo training and merges on a busy 2-core machine


@pytest.fixture(scope="session")
def demo_models(demo_cache: Path) -> Path:
    """The three small demo models, trained once per session in the shared test cache (tests/conftest.py)."""
    from merge.refs import resolve_ref

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
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def run_demo_merge(at: AppTest) -> dict:
    at.switch_page("pages/align_merge.py").run()
    click(at, "am.run")
    assert not at.error, [e.value for e in at.error]
    return at.session_state[state.LAST_RUN]


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


def test_opens_on_the_demo_models(ws):
    at = start()
    assert [t.value for t in at.title] == ["Models"]
    assert at.session_state[state.RECIPE] == state.canonical(state.default_recipe())
    listed = at.dataframe[0].value["model"].tolist()
    assert listed[:3] == list(state.DEMO_LIBRARY)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Tensors"] == "6"
    assert int(metrics["Parameters"].replace(",", "")) == 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    # the recipe's three models share one architecture: every engine applies
    assert any("same architecture" in s.value for s in at.success)
    at.checkbox(key="models.groups").check().run()
    groups = at.dataframe[-1].value
    assert groups["group"].tolist() == ["layers.0", "layers.1"] and groups["size"].tolist() == [128, 128]


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


def test_demo_merge_runs_shows_results_and_is_reused(ws):
    at = start()
    last = run_demo_merge(at)
    out = Path(last["out_dir"])
    assert out.parent == ws.outputs and (out / "model.safetensors").is_file()
    assert last["report"]["merge_method"] == "ties" and last["report"]["tensors"] == 6 and not last["cached"]
    assert any("Merged 6 tensors with ties" in s.value for s in at.success)
    assert at.status[0].state == "complete"
    assert at.progress[0].value == 100
    table = at.dataframe[-1].value.set_index("model")
    # TIES of the two half-task fine-tunes beats each fine-tune on all ten digits (they forgot the other half)
    assert table.loc["merged", "accuracy"] > table.loc["demo:finetune-0-4", "accuracy"] + 0.2
    assert table.loc["merged", "accuracy"] > table.loc["demo:finetune-5-9", "accuracy"] + 0.2
    # a plot option reruns the page without touching the merge
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    at.radio(key="am.eval_metric").set_value("loss").run()
    assert not at.exception and at.session_state[state.LAST_RUN] == last
    # the same recipe again: the finished folder is reused
    click(at, "am.run")
    again = at.session_state[state.LAST_RUN]
    assert again["cached"] and again["out_dir"] == last["out_dir"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # recompute on request gives identical tensors
    at.checkbox(key="am.recompute").check().run()
    click(at, "am.run")
    assert not at.session_state[state.LAST_RUN]["cached"]
    assert all(torch.equal(a, b) for a, b in zip(tensors(out).values(), tensors(last["out_dir"]).values()))


def test_form_widgets_edit_the_recipe(ws):
    at = start("align_merge")
    density = [n for n in at.number_input if n.label == "density"][0]
    density.set_value(0.3).run()
    recipe = at.session_state[state.RECIPE]
    assert recipe["models"][0]["parameters"]["density"] == 0.3
    assert recipe["models"][1]["parameters"]["density"] == 0.5
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
    # an engine this build cannot run is flagged with the reason before anything runs
    at.selectbox(key=state.widget_key(at.session_state, "am", "method")).set_value("ties").run()
    at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).set_value("weight_matching").run()
    assert at.session_state[state.RECIPE]["alignment"] == {"engine": "weight_matching"}
    flagged = any(services.NOT_AVAILABLE in w.value for w in at.warning)
    assert flagged == ("weight_matching" not in services.runner_engines())
    at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).set_value("zipit").run()
    assert any(services.NOT_AVAILABLE in w.value for w in at.warning) == ("zipit" not in services.runner_engines())


def test_recipe_round_trip_export_import_identical_state(ws):
    at = start("align_merge")
    [n for n in at.number_input if n.label == "lambda"][0].set_value(0.8).run()
    at.text_input(key=state.widget_key(at.session_state, "am", "name")).set_value("round trip").run()
    at.switch_page("pages/recipe.py").run()
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
    at.switch_page("pages/align_merge.py").run()
    at.switch_page("pages/recipe.py").run()
    assert at.session_state[state.RECIPE] == before
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
    at.switch_page("pages/align_merge.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state[state.RECIPE] == imported


def test_exported_recipe_gives_the_same_tensors_with_suture_run(ws, tmp_path):
    from recipes.cli import main

    at = start()
    last = run_demo_merge(at)
    recipe_file = tmp_path / "exported.yaml"
    recipe_file.write_bytes(state.recipe_payload(at.session_state[state.RECIPE]))
    assert main(["run", str(recipe_file), str(tmp_path / "cli-out"), "-q"]) == 0
    app_tensors, cli_tensors = tensors(last["out_dir"]), tensors(tmp_path / "cli-out")
    assert app_tensors.keys() == cli_tensors.keys() and len(app_tensors) == 6
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
    click(at, "recipe.run")
    assert any("different shapes" in e.value for e in at.error), [e.value for e in at.error]
    assert at.status[0].state == "error" and not list(ws.outputs.iterdir())


def test_aligned_merge_shows_objective_evaluation_and_barriers(ws):
    at = start("recipe")
    aligned = (
        "name: aligned\nmerge_method: linear\nmodels:\n"
        "  - model: demo:finetune-0-4\n    parameters: {weight: 0.5}\n"
        "  - model: demo:finetune-5-9\n    parameters: {weight: 0.5}\n"
        "alignment: {engine: weight_matching}\nevaluate: {data: sklearn:digits, points: 5}\n"
    )
    at.text_area(key=state.widget_key(at.session_state, "recipe.text")).set_value(aligned).run()
    click(at, "recipe.apply")
    at.switch_page("pages/align_merge.py").run()
    assert at.selectbox(key=state.widget_key(at.session_state, "am", "engine")).value == "weight_matching"
    assert at.checkbox(key=state.widget_key(at.session_state, "am", "evaluate")).value
    click(at, "am.run")
    assert not at.error, [e.value for e in at.error]
    report = at.session_state[state.LAST_RUN]["report"]
    assert report["alignment"]["engine"] == "weight_matching"
    objective = services.alignment_objective(report)
    assert list(objective) == ["demo:finetune-5-9"] and len(objective["demo:finetune-5-9"]) >= 1
    assert set(services.interpolation_curves(report)) == {"naive", "aligned"}
    rows = {r["model"]: r for r in services.evaluation_rows(report)}
    assert set(rows) == {"demo:finetune-0-4", "demo:finetune-5-9", "merged"}
    # shown: objective plot, scores bar chart and interpolation plot; evaluation and barrier tables
    assert len(at.get("image")) == 3
    shown = at.dataframe[-2].value.set_index("model")
    assert shown.loc["merged", "accuracy"] == pytest.approx(rows["merged"]["accuracy"])
    barriers = at.dataframe[-1].value.set_index("path")
    assert set(barriers.index) == {"naive", "aligned"}
    assert (barriers["loss"] >= 0).all()


def test_cancelled_run_leaves_nothing(ws):
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException

    seen = []

    def interrupt(stage, done, total, detail):
        seen.append(stage)
        if stage == "merge" and done >= 2:
            raise RerunException(None)  # what a click on Cancel raises inside the next progress update

    with pytest.raises(RerunException):
        services.run_merge(state.default_recipe(), ws, progress=interrupt)
    assert "merge" in seen
    assert list(ws.outputs.iterdir()) == []  # no result and no hidden temporary folder


def test_dry_run_plan_on_the_recipe_page(ws):
    at = start("recipe")
    click(at, "recipe.plan")
    plan = at.dataframe[0].value
    assert len(plan) == 6 and not at.error


def test_stitch_page_similarity_and_map(ws):
    at = start("stitch")
    at.selectbox(key="stitch.a").set_value("demo:finetune-0-4")
    at.selectbox(key="stitch.b").set_value("demo:finetune-5-9")
    at.slider(key="stitch.samples").set_value(200)
    click(at, "stitch.compute")
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["stitch.layers"] == {"a": ["layers.0", "layers.1"], "b": ["layers.0", "layers.1"]}
    assert len(at.get("image")) == 1
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
    from merge.data import load_dataset

    assert scores["method"] == "Procrustes" and scores["test samples"] == len(load_dataset("sklearn:digits", split="test"))
    assert 0.3 < scores["R² (translated A vs B)"] <= 1.0
    at.selectbox(key="stitch.method").set_value("relative")
    click(at, "stitch.fit")
    assert 0.0 < at.session_state["stitch.scores"]["mean cosine (relative A vs B)"] <= 1.0


def test_publish_pushes_to_a_hub_without_keeping_the_token(ws, hub_server):
    at = start()
    last = run_demo_merge(at)
    at.switch_page("pages/publish.py").run()
    assert not at.exception
    body = "\n".join(m.value for m in at.markdown)
    assert "ties" in body and "demo:finetune-0-4" in body  # the model card preview
    assert any("base_model_relation" in c.value or "tags" in c.value for c in at.code)
    at.text_input(key=state.widget_key(at.session_state, "publish.repo")).set_value("tester/workbench-demo").run()
    token_box = [t for t in at.text_input if "token" in t.label.lower()][0]
    token_box.set_value(DEFAULT_TOKEN).run()
    click(at, "publish.push")
    assert not at.error, [e.value for e in at.error]
    url = f"{hub_server.url}/tester/workbench-demo"
    assert at.session_state["publish.url"] == url
    assert any(url in s.value for s in at.success)
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
    run_demo_merge(at)
    at.switch_page("pages/publish.py").run()
    at.text_input(key=state.widget_key(at.session_state, "publish.repo")).set_value("tester/no-token").run()
    click(at, "publish.push")
    assert any("no Hugging Face token" in e.value for e in at.error), [e.value for e in at.error]
    assert at.status[0].state == "error"


def test_report_figures_are_read_when_present(tmp_path):
    report = {"alignment": {"engine": "weight_matching", "models": {"b": {"objective": 2.75, "objective_per_iteration": [1.0, 2.5, 2.75]}}},
              "evaluation": {"merged": {"loss": 0.5, "accuracy": 0.8}, "models": {"a": {"loss": 0.4, "accuracy": 0.9}},
                             "barriers": {"aligned": {"loss": 0.02, "loss_midpoint": None, "accuracy": 0.01}},
                             "curves": {"aligned": [{"t": 0.0, "loss": 1.0, "accuracy": 0.9}, {"t": 1.0, "loss": 1.1, "accuracy": 0.9}]}}}
    assert services.alignment_objective(report) == {"b": [1.0, 2.5, 2.75]}
    assert list(services.interpolation_curves(report)) == ["aligned"]
    assert services.evaluation_rows(report) == [{"model": "a", "loss": 0.4, "accuracy": 0.9}, {"model": "merged", "merged": True, "loss": 0.5, "accuracy": 0.8}]
    assert services.barrier_rows(report) == [{"path": "aligned", "loss": 0.02, "accuracy": 0.01}]
    assert services.alignment_objective({"alignment": {"models": {"b": {"objective": 3.0}}}}) == {}
    from app import plots

    fig = plots.interpolation(services.interpolation_curves(report))
    assert len(fig.axes) == 2
    assert len(plots.objective({"b": [1.0, 2.0]}).axes[0].lines) == 1
