"""The Search page in a real browser (Debian chromium through Playwright): a search started from the page shows its
trials live, Pause stops it with Ray Tune's state saved, and Resume continues it to the trial count it started with,
keeping the trials already finished. Every non-local request is aborted and recorded: there must be none."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_app_browser import app_server  # noqa: F401 - the server fixture
from tests.test_app_jobs_browser import go, open_app

from playwright.sync_api import expect, sync_playwright  # noqa: E402 - test_app_browser skips when it is missing

from suture.app.jobs import FINISHED, JobStore  # noqa: E402
from suture.recipes.search_run import METRIC  # noqa: E402

pytestmark = pytest.mark.browser
TRIALS = 5


@pytest.fixture
def task_models(demo_cache: Path) -> None:
    from suture.merge.refs import resolve_ref

    for ref in ("demo:task-0-4", "demo:task-5-9"):
        resolve_ref(ref)  # the spec's models, trained once per session outside the browser's time budget


def _finished_trials(out: Path) -> set[str]:
    return {t["digest"] for t in json.loads((out / "trials.json").read_text())["trials"] if t.get(METRIC) is not None}


def test_a_search_started_paused_and_resumed_from_the_page(task_models, app_server):
    url, workspace, log = app_server
    outside: list[str] = []
    with sync_playwright() as p:
        browser, page = open_app(p, url)
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                   else (outside.append(route.request.url), route.abort()))
        try:
            go(page, "Search")
            trials = page.get_by_label("Trials [1, 200]")
            trials.fill(str(TRIALS))
            trials.press("Enter")
            page.get_by_role("button", name="Start search").click()
            expect(page.get_by_text("trials finished").first).to_be_visible(timeout=60_000)
            store = JobStore(workspace)
            [job] = store.list()
            deadline = time.monotonic() + 180
            while store.get(job.id).done < 1:  # one trial finished: Pause lands well before the fifth
                assert store.get(job.id).active and time.monotonic() < deadline, store.get(job.id).error
                time.sleep(0.5)
            page.get_by_role("button", name="Pause (resume later)").click()
            expect(page.get_by_text("The search stopped after")).to_be_visible(timeout=120_000)
            paused = store.get(job.id)
            assert paused.state == FINISHED and 1 <= paused.done < TRIALS
            out = Path(paused.out_dir)
            before = _finished_trials(out)
            assert not json.loads((out / "trials.json").read_text())["finished"] and before

            page.get_by_role("button", name="Resume").click()
            expect(page.get_by_text("Searching:")).to_be_visible(timeout=60_000)
            [resumed] = [j for j in store.list() if j.id != job.id]
            assert resumed.settings.get("resume") is True and resumed.out_dir == paused.out_dir
            assert store.wait(resumed.id, timeout=240).state == FINISHED
            expect(page.get_by_text("The search stopped after")).to_have_count(0, timeout=30_000)
            expect(page.get_by_text("Best: trial")).to_be_visible(timeout=30_000)
            summary = json.loads((out / "trials.json").read_text())
            assert summary["finished"] and len(summary["trials"]) == TRIALS
            assert before <= _finished_trials(out)  # the finished trials were kept, not rerun
            assert "Traceback" not in log.read_text()
        finally:
            browser.close()
    assert outside == []
