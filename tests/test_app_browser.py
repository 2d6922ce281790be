"""The workbench in a real browser: start `streamlit run app/main.py` on a free port, open it in Debian's
chromium through Playwright, run the quickstart demo merge (Git Re-Basin on two demo MLPs) by clicking, wait for
its naive-vs-aligned barrier plot, and keep a screenshot in test-artifacts/app-demo.png."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "app" / "main.py"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.browser

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is missing (install it with `apt-get install -y chromium chromium-driver`)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    pytest.skip("Playwright for Python is missing (install it with `pip install playwright`; no `playwright install` needed)",
                allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"streamlit did not answer /_stcore/health within {timeout} s:\n{log.read_text()}")


@pytest.fixture
def app_server(tmp_path: Path, demo_cache: Path):
    """`streamlit run app/main.py -- --workspace DIR` on 127.0.0.1 (demo models come from the session cache)."""
    from suture.merge.refs import resolve_ref

    for ref in ("demo:mlp-seed1", "demo:mlp-seed2"):
        resolve_ref(ref)  # the quickstart's models: trained once per session, outside the browser's time budget
    with streamlit_server(tmp_path / "ws", tmp_path) as (url, log):
        yield url, tmp_path / "ws", log


@contextmanager
def streamlit_server(workspace: Path, tmp_path: Path):
    """A freshly started `streamlit run app/main.py -- --workspace WORKSPACE` on 127.0.0.1: yields (url, log)."""
    port = free_port()
    log = tmp_path / "streamlit.log"
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(MAIN),
        "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--", "--workspace", str(workspace),
    ]
    env = dict(os.environ)
    env.pop("SUTURE_WORKSPACE", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_demo_merge_by_clicking(app_server):
    url, workspace, log = app_server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            # opens on the Models page with the demo models listed and inspected
            expect(page.get_by_role("heading", name="Models")).to_be_visible(timeout=120_000)
            expect(page.get_by_test_id("stMetric").first).to_be_visible(timeout=120_000)
            # st.navigation: go to Align & merge through the sidebar
            page.get_by_test_id("stSidebarNav").get_by_text("Align & merge").click()
            expect(page.get_by_role("heading", name="Align & merge")).to_be_visible(timeout=60_000)
            page.get_by_role("button", name="Run merge").click()
            success = page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text="Merged 8 tensors with linear")
            expect(success).to_be_visible(timeout=150_000)
            # the evidence: the interpolation plot (naive vs aligned, loss and accuracy) drawn from the run's report
            plot = page.locator(".st-key-barrier-plot").get_by_test_id("stImage")
            expect(plot).to_be_visible(timeout=60_000)
            barrier_heading = page.get_by_text("Interpolation barrier: naive vs aligned")
            expect(barrier_heading).to_be_visible()
            # Streamlit scrolls inside its own container: a tall viewport puts the whole result in the picture
            page.set_viewport_size({"width": 1400, "height": 3400})
            plot.scroll_into_view_if_needed()
            expect(plot).to_be_in_viewport(timeout=30_000)
            expect(plot.locator("img")).to_have_js_property("complete", True, timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "app-demo.png"))
            text = success.inner_text()
            box = plot.bounding_box()
        finally:
            browser.close()
    outputs = [p for p in (workspace / "outputs").iterdir() if not p.name.startswith(".")]
    assert len(outputs) == 1 and (outputs[0] / "model.safetensors").is_file(), log.read_text()
    assert outputs[0].name in text
    assert (outputs[0] / "interpolation.png").is_file()
    assert box is not None and box["width"] > 300 and box["height"] > 150  # the two-panel plot, not an empty frame
    assert (ARTIFACTS / "app-demo.png").stat().st_size > 10_000
