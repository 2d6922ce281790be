"""The app's Search page and search jobs: the example spec loads, a bad spec is one readable line, Start creates a
search job, and a real 3-trial search (local Ray, one worker) runs as a job whose trials and best recipe the page
shows; Cancel leaves no process of the job (Ray's included) behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("streamlit")
pytest.importorskip("ray")
from streamlit.testing.v1 import AppTest  # noqa: E402

from suture.app import jobs, state  # noqa: E402
from suture.app.jobs import JobStore  # noqa: E402
from suture.app.workspace import Workspace  # noqa: E402

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
SPEC = Path(__file__).resolve().parents[1] / "recipes" / "searches" / "tasks.yaml"
TIMEOUT = 240


@pytest.fixture(scope="module")
def task_models(demo_cache: Path) -> Path:
    from suture.merge.refs import resolve_ref

    for ref in ("demo:task-0-4", "demo:task-5-9"):
        resolve_ref(ref)
    return demo_cache


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_models: Path) -> Workspace:
    monkeypatch.setenv("SUTURE_WORKSPACE", str(tmp_path / "ws"))
    return Workspace.open(tmp_path / "ws")


def search_page() -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    at.switch_page("views/search.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_example_spec_loads_with_bounded_inputs_and_start_creates_a_search_job(ws):
    at = search_page()
    assert at.selectbox(key="search.spec").value == "tasks"
    assert not at.error, [e.value for e in at.error]
    assert "4 values searched" in at.expander[0].label and "digits_0_4" in at.expander[0].label
    trials, workers = at.number_input(key="search.trials"), at.number_input(key="search.workers")
    assert trials.value == 12 and trials.label == "Trials [1, 200]" and workers.label == "Workers [1, 16]"
    trials.set_value(500).run()  # typed as it is, never clamped: an error under the field
    assert [e.value for e in at.error] == ["Trials: must be in [1, 200], got 500."]
    assert at.number_input(key="search.trials").value == 500 and at.button(key="search.start").disabled
    at.number_input(key="search.trials").set_value(1).run()
    assert not at.error
    at.button(key="search.start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job_id = at.session_state["search_job"]
    store = JobStore(ws.root)
    record = json.loads((store.root / job_id / jobs.JOB_FILE).read_text())
    assert (record["kind"], record["trials"], record["workers"], record["spec"]) == ("search", 1, 1, str(SPEC))
    assert Path(record["out_dir"]).parent == ws.root / "outputs"
    store.cancel(job_id, grace=2.0)  # the real search is the next test's


@pytest.mark.parametrize("text, ok", [("auto", True), ("10.0.0.1:6379", True), ("ray://head.example:10001", True),
                                      ("head:99999", False), ("http://x:1", False), ("10.0.0.1", False), ("a b:1", False)])
def test_the_cluster_address_is_checked_next_to_its_field(ws, text, ok):
    at = search_page()
    at.text_input(key="search.address").input(text).run()
    assert not at.exception, [e.value for e in at.exception]
    if ok:
        assert not at.error and not at.button(key="search.start").disabled
    else:
        assert [e.value for e in at.error] == [f"Ray cluster address {text!r} is not valid: use auto, HOST:PORT "
                                               "(e.g. 10.0.0.1:6379) or ray://HOST:PORT, or leave it empty to start Ray here."]
        assert at.button(key="search.start").disabled


def test_a_search_job_on_a_cluster_address_passes_it_to_the_worker(ws):
    store = JobStore(ws.root)
    job = store.start_search(SPEC, ws.root / "outputs" / "remote", label="search tasks", trials=2, workers=1,
                             address="127.0.0.1:1")  # nothing listens there: the worker fails in one line
    ended = store.wait(job.id, timeout=TIMEOUT)
    assert ended.settings["address"] == "127.0.0.1:1"
    assert ended.state == jobs.FAILED and "--address 127.0.0.1:1: cannot reach a Ray cluster there" in ended.error
    assert "Traceback" not in ended.error


@pytest.mark.parametrize("text, expected", [
    ("recipe: {merge_method: linear}\nspace: nope\n", "space"),
    (SPEC.read_text().replace("demo:task-0-4", "/etc/models/a.safetensors"), "outside the workspace"),
])
def test_a_bad_spec_is_one_readable_line_and_cannot_start(ws, text, expected):
    (ws.root / "searches").mkdir()
    (ws.root / "searches" / "bad.yaml").write_text(text)
    at = search_page()
    at.selectbox(key="search.spec").set_value("workspace: bad.yaml").run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and expected in at.error[0].value and "\n" not in at.error[0].value.strip(), at.error[0].value
    assert "Traceback" not in at.error[0].value
    assert at.button(key="search.start").disabled


def test_a_real_search_job_finishes_and_the_page_shows_its_trials_and_best_recipe(ws):
    store = JobStore(ws.root)
    job = store.start_search(SPEC, ws.root / "outputs" / "search", label="search tasks", trials=3, workers=1)
    done = store.wait(job.id, timeout=TIMEOUT)
    assert done.state == jobs.FINISHED, (done.error, (done.folder / jobs.LOG_FILE).read_text()[-2000:])
    assert (done.done, done.total) == (3, 3)
    summary = json.loads((Path(done.out_dir) / "trials.json").read_text())
    assert len(summary["trials"]) == 3 and all(t["objective"] is not None for t in summary["trials"])
    best = summary["best"]
    assert best["objective"] == max(t["objective"] for t in summary["trials"])

    at = search_page()
    at.session_state["search_job"] = job.id
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"Best: trial {best['trial']} with objective {best['objective']:.4f}" in s.value for s in at.success)
    table = at.dataframe[0].value
    assert len(table) == 3 and list(table["objective"]) == [t["objective"] for t in summary["trials"]]
    at.button(key="search.load_best").click().run()
    assert not at.exception, [e.value for e in at.exception]
    loaded = at.session_state[state.RECIPE]
    assert loaded == state.canonical((Path(done.out_dir) / "best_recipe.yaml").read_text())
    weights = [m["parameters"]["weight"] for m in loaded["models"]]
    assert weights == [[best[f"models[{i}].parameters.weight[{k}]"] for k in (0, 1)] for i in (0, 1)]


def test_cancel_stops_the_search_and_every_ray_process_of_the_job(ws):
    store = JobStore(ws.root)
    job = store.start_search(SPEC, ws.root / "outputs" / "cancelled", label="search tasks", trials=50, workers=1)
    worker = psutil.Process(job.pid)
    deadline = time.monotonic() + 120
    family: list[psutil.Process] = []
    while time.monotonic() < deadline:  # wait until Ray's raylet and GCS run under the worker
        family = worker.children(recursive=True)
        if any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running()):
            break
        time.sleep(0.5)
    assert any("raylet" in " ".join(p.cmdline()) for p in family), [p.name() for p in family]
    ended = store.cancel(job.id)
    assert ended.state == jobs.CANCELLED
    _, alive = psutil.wait_procs([worker, *family], timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [(p.pid, p.name()) for p in alive]
