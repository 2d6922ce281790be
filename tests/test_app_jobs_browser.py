"""Jobs in a real browser (Debian chromium through Playwright): a merge goes on while the user visits other pages
and its result opens from the Jobs panel; Cancel during a long evaluation kills the worker and leaves no temporary
folder; a failure's reason and a NaN merge are shown as failures without expanding anything; a stitch runs as a job
that Cancel kills the same way; a push from the Publish page is a job that reaches a local Hub."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, app_server  # noqa: F401 - the server fixture

from playwright.sync_api import expect, sync_playwright  # noqa: E402 - test_app_browser skips when it is missing

from suture.app.jobs import STEP_DELAY_ENV, JobStore  # noqa: E402
from tests.test_jobs import gone  # noqa: E402

pytestmark = pytest.mark.browser


@pytest.fixture
def slow_jobs(monkeypatch):
    """Workers sleep at each progress report (an env var only tests set, before the server starts: its workers
    inherit the server's environment), so a job is still running when clicked."""
    monkeypatch.setenv(STEP_DELAY_ENV, "0.3")


@pytest.fixture
def slow_evaluation(monkeypatch):
    """Only the evaluation is slow: a job reaches it quickly, then stays there until cancelled."""
    monkeypatch.setenv(STEP_DELAY_ENV, "evaluate:2")


def open_app(p, url: str):
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(url, wait_until="domcontentloaded")
    expect(page.get_by_role("heading", name="Models")).to_be_visible(timeout=120_000)
    return browser, page


def go(page, name: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(name, exact=True).click()
    expect(page.get_by_role("heading", name=name, exact=True)).to_be_visible(timeout=60_000)


def apply_recipe(page, text: str) -> None:
    go(page, "Recipe")
    box = page.get_by_label("Or edit the YAML")
    box.fill(text)
    box.press("Control+Enter")
    page.get_by_role("button", name="Apply the edited YAML").click()
    expect(page.get_by_text("Applied the edited recipe.")).to_be_visible(timeout=60_000)


def test_a_job_continues_across_pages_and_its_result_opens_from_the_list(slow_jobs, app_server):
    url, workspace, log = app_server
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        try:
            go(page, "Align & merge")
            page.get_by_role("button", name="Run merge").click()
            expect(page.get_by_text("Running:").first).to_be_visible(timeout=60_000)
            store = JobStore(workspace)
            [job] = store.list()
            # leave for other pages while it runs; the sidebar keeps listing it
            go(page, "Stitch")
            go(page, "Models")
            assert store.get(job.id).active, "the job should still be running (slow_jobs)"
            panel = page.locator(f".st-key-job-{job.id}")
            expect(panel).to_contain_text("running", timeout=30_000)
            assert psutil.Process(job.pid).is_running()
            expect(panel).to_contain_text("finished", timeout=150_000)
            panel.get_by_role("button", name="Open result").click()
            expect(page.get_by_role("heading", name="Align & merge")).to_be_visible(timeout=60_000)
            success = page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="Merged 8 tensors with linear")
            expect(success).to_be_visible(timeout=60_000)
            expect(page.locator(".st-key-barrier-plot").get_by_test_id("stImage")).to_be_visible(timeout=60_000)
            text = success.inner_text()
        finally:
            browser.close()
    assert store.get(job.id).state == "finished" and Path(job.out_dir).name in text


def start_and_cancel(page, store: JobStore, page_name: str, button: str, running: str):
    """Start a job from a page, wait until it shows `running` (working inside its temporary folder), click Cancel and
    wait for the page's "Cancelled"; returns the job and its output folder."""
    go(page, page_name)
    page.get_by_role("button", name=button).click()
    expect(page.get_by_test_id("stExpander").filter(has_text=running)).to_be_visible(timeout=120_000)
    [job] = store.list()
    assert psutil.Process(job.pid).is_running()
    out = Path(job.out_dir)
    assert [q for q in out.parent.iterdir() if q.name.startswith(f".{out.name}.suture-tmp-")], "working inside its temp folder"
    expect(page.locator(f".st-key-job-{job.id}")).to_contain_text("running", timeout=30_000)  # listed in the Jobs panel
    page.get_by_role("button", name="Cancel").first.click()
    warning = page.locator('[data-testid="stAlertContentWarning"]').filter(has_text="Cancelled")
    expect(warning).to_be_visible(timeout=60_000)
    return job, out


def assert_cancelled(store: JobStore, job, out: Path) -> None:
    """No worker, a cancelled record, and nothing of the output (only the output's empty lock file may stay)."""
    assert gone(job.pid), "the worker must be gone after Cancel"
    assert store.get(job.id).state == "cancelled"
    assert not out.exists() and not [q for q in out.parent.iterdir() if ".suture-" in q.name and not q.name.endswith(".lock")]


def test_cancel_during_a_long_evaluation_kills_the_worker(slow_evaluation, app_server):
    url, workspace, log = app_server
    store = JobStore(workspace)
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        try:
            job, out = start_and_cancel(page, store, "Align & merge", "Run merge", "Running: evaluating")
        finally:
            browser.close()
    assert_cancelled(store, job, out)


FAILING = """merge_method: linear
models:
  - model: models/a.safetensors
    parameters: {weight: 1.0}
  - model: models/b.safetensors
    parameters: {weight: 1.0}
"""
OVERFLOW = """merge_method: linear
out_dtype: float16
models:
  - model: models/big.safetensors
    parameters: {weight: 1.0}
"""


def test_failures_and_nan_merges_show_their_reason_in_full(app_server):
    url, workspace, log = app_server
    models = workspace / "models"
    models.mkdir(parents=True, exist_ok=True)
    save_file({"layers.0.weight": torch.ones(8, 4)}, str(models / "a.safetensors"))
    save_file({"layers.0.weight": torch.ones(16, 4)}, str(models / "b.safetensors"))
    save_file({"layers.0.weight": torch.full((4, 4), 1e5)}, str(models / "big.safetensors"))
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        try:
            apply_recipe(page, FAILING)
            page.get_by_role("button", name="Run merge").click()
            error = page.locator('[data-testid="stAlertContentError"]').filter(has_text="different shapes")
            expect(error).to_be_visible(timeout=120_000)  # visible at once: not inside a collapsed box
            assert "<dict>" not in error.inner_text()
            apply_recipe(page, OVERFLOW)
            page.get_by_role("button", name="Run merge").click()
            nan = page.locator('[data-testid="stAlertContentError"]').filter(has_text="NaN/Inf")
            expect(nan).to_be_visible(timeout=120_000)
            assert "layers.0.weight" in nan.inner_text()
            expect(page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="Merged")).to_have_count(0)
        finally:
            browser.close()
    states = sorted(j.state for j in JobStore(workspace).list())
    assert states == ["failed", "failed"]


@pytest.fixture
def slow_features(monkeypatch):
    """Only the stitch's feature stage is slow: the job reaches it quickly, then stays there until cancelled."""
    monkeypatch.setenv(STEP_DELAY_ENV, "features:10")


def test_a_stitch_runs_as_a_job_and_cancel_kills_its_worker(slow_features, app_server):
    url, workspace, log = app_server
    store = JobStore(workspace)
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        try:
            job, out = start_and_cancel(page, store, "Stitch", "Run the stitch", "Running: computing features")
            expect(page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="Stitched")).to_have_count(0)
        finally:
            browser.close()
    assert job.kind == "stitch"
    assert_cancelled(store, job, out)


def test_a_push_runs_as_a_job_to_a_local_hub(hub_server, app_server):
    """The Publish page's push is a `publish` job: its worker reaches the local Hub (HF_ENDPOINT, inherited by the
    server and its workers) with the typed token, which no file of the workspace holds afterwards."""
    from tests.hub_server import DEFAULT_TOKEN
    from tests.test_app_results_browser import _quick_run

    url, workspace, log = app_server
    (workspace / "outputs").mkdir(parents=True, exist_ok=True)
    out = _quick_run(workspace, "to-publish", 0.5)
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        try:
            go(page, "Publish")
            repo = page.get_by_role("textbox", name="Repository id")
            repo.fill("tester/from-browser")
            repo.press("Enter")
            token = page.get_by_role("textbox", name="Hugging Face token (write access)")
            token.fill(DEFAULT_TOKEN)
            token.press("Enter")
            page.get_by_role("button", name="Push").click()
            success = page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="Published")
            expect(success).to_be_visible(timeout=120_000)
            text = success.inner_text()
        finally:
            browser.close()
    [job] = JobStore(workspace).list()
    assert job.kind == "publish" and job.state == "finished" and "tester/from-browser" in text
    assert hub_server.file_bytes("tester/from-browser", "model.safetensors") == (out / "model.safetensors").read_bytes()
    for path in workspace.rglob("*"):
        if path.is_file():
            assert DEFAULT_TOKEN.encode() not in path.read_bytes(), path
