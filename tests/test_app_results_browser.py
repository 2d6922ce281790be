"""The results browser and the offline promise in a real browser (Debian's chromium through Playwright).

Two quick demo runs are made in-process with `suture run` into the workspace's outputs; the server is then
started fresh, so the first page load is the one right after a server start. Every request the browser makes
is routed: anything not addressed to 127.0.0.1/localhost is aborted and recorded, and the test asserts none.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, streamlit_server

pytestmark = pytest.mark.browser

from playwright.sync_api import expect, sync_playwright  # noqa: E402 - test_app_browser skipped the module if missing

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def _quick_run(workspace: Path, name: str, weight: float) -> Path:
    """A two-MLP linear merge (Git Re-Basin first) with a 3-point interpolation: seconds, with curves and barriers."""
    from suture.recipes.cli import main

    recipe = yaml.safe_load((ROOT / "recipes" / "examples" / "quickstart.yaml").read_text())
    recipe["name"] = name
    recipe["alignment"]["max_iter"] = 5
    recipe["models"][0]["parameters"]["weight"] = weight
    recipe["models"][1]["parameters"]["weight"] = 1 - weight
    recipe["evaluate"]["points"] = 3
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = workspace / "outputs" / name
    assert main(["run", str(path), str(out), "-q"]) == 0
    return out


@pytest.fixture
def served_workspace(tmp_path: Path, demo_cache: Path):
    """A workspace holding two finished runs, served by a freshly started `streamlit run app/main.py`."""
    workspace = tmp_path / "ws"
    (workspace / "outputs").mkdir(parents=True)
    runs = [_quick_run(workspace, "even", 0.5), _quick_run(workspace, "lopsided", 0.8)]
    with streamlit_server(workspace, tmp_path) as (url, log):
        yield url, runs, log


def test_offline_first_load_and_results_comparison(served_workspace):
    url, runs, log = served_workspace
    external: list[str] = []

    def route(r):
        if urlparse(r.request.url).hostname in LOCAL_HOSTS:
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1600})
            context.route("**/*", route)
            page = context.new_page()
            # the first load after the server started is a deep link to /merge: the page, and no "Page not found"
            page.goto(f"{url}/merge", wait_until="domcontentloaded")
            expect(page.get_by_role("heading", name="Align & merge")).to_be_visible(timeout=60_000)
            page.wait_for_timeout(1500)  # the dialog, when it comes, comes with the first script run's messages
            assert page.get_by_text("Page not found").count() == 0
            assert page.get_by_role("dialog").count() == 0

            page.get_by_test_id("stSidebarNav").get_by_text("Results").click()
            expect(page.get_by_role("heading", name="Results")).to_be_visible(timeout=60_000)
            expect(page.get_by_test_id("stDataFrame").first).to_be_visible(timeout=30_000)
            # both runs are named by what they are (engine → method · models · time), not by a folder hash
            picker = page.get_by_test_id("stMultiSelect")
            picker.click()
            options = page.get_by_role("option").filter(has_text=" · ")
            expect(options).to_have_count(2, timeout=30_000)
            labels = options.all_inner_texts()
            assert all(lab.startswith("weight_matching → linear · demo:mlp-seed1 + demo:mlp-seed2 · ") for lab in labels), labels
            assert len(set(labels)) == 2, labels  # same recipe shape, same minute: told apart by folder
            page.get_by_role("option", name="Select all").click()  # both runs
            page.keyboard.press("Escape")
            expect(page.get_by_role("heading", name="Side by side")).to_be_visible(timeout=30_000)
            plot = page.locator(".st-key-results-curves").get_by_test_id("stImage")
            expect(plot).to_be_visible(timeout=30_000)
            expect(plot.locator("img")).to_have_js_property("complete", True, timeout=30_000)
            box = plot.bounding_box()
            table_text = page.locator(".st-key-results-table").inner_text()
            # the other pages load offline too (icons, fonts, plots)
            for name in ("Models", "Stitch", "Recipe", "Publish"):
                page.get_by_test_id("stSidebarNav").get_by_text(name, exact=True).click()
                expect(page.get_by_role("heading", name=name).first).to_be_visible(timeout=60_000)
            page.wait_for_timeout(500)
        finally:
            browser.close()
    assert external == [], f"requests to external hosts: {sorted(set(external))}"
    assert box is not None and box["width"] > 300 and box["height"] > 150, box
    assert "loss barrier" in table_text and "merged accuracy" in table_text, table_text
    assert all(run.name in table_text for run in runs), table_text  # one column per chosen run
