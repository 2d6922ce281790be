"""Tokens never leave memory: -v logs, error lines, published folders, and a Hub that never answers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

import suture.merge.hub as hub_module
from suture.merge.errors import InputError
from suture.merge.hub import push_folder, push_timeout
from suture.merge.redact import RedactingFilter, install_log_redaction, redact, register_secret
from tests.hub_server import DEFAULT_TOKEN, enable_lfs
from tests.robustness.token_cases import CANARY, make_folder, token_canary_counts

ROOT = Path(__file__).resolve().parents[2]


def test_canary_cases_have_no_leak_and_no_hang(tmp_path):
    counts = token_canary_counts(tmp_path)
    assert counts["cases"] >= 14
    assert (counts["leaks"], counts["hangs"], counts["tracebacks"], counts["wrong"]) == (0, 0, 0, 0), counts["failures"]


def test_verbose_push_in_a_real_process_never_prints_the_token(hub_server, tmp_path):
    hub_server.tokens[CANARY] = {"user": "tester", "write": True}
    hub_server.echo_auth = True
    # the stand-in really does send the token back: whatever logs response headers would show it
    echoed = httpx2.get(f"{hub_server.url}/api/whoami-v2", headers={"Authorization": f"Bearer {CANARY}"})
    assert CANARY in echoed.headers["X-Echo-Authorization"]
    folder = make_folder(tmp_path / "out")
    env = {**os.environ, "HF_TOKEN": CANARY, "HF_HUB_VERBOSITY": "debug", "HF_DEBUG": "1"}

    done = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "push", str(folder), "tester/sub", "-v"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    assert "published:" in done.stdout
    assert "DEBUG" in done.stderr  # -v did log details
    assert CANARY not in done.stdout + done.stderr
    assert all(CANARY.encode() not in data for data in hub_server.blobs.values())


@pytest.mark.parametrize("after_headers", [False, True], ids=["no-answer", "headers-then-nothing"])
def test_a_hub_that_stalls_mid_push_fails_once_not_after_retries(hub_server, tmp_path, monkeypatch, after_headers):
    enable_lfs(hub_server, monkeypatch, threshold=16)  # the weights go through the LFS batch call (retried on timeouts)
    hub_server.stall_on = "/info/lfs/objects/batch"
    hub_server.stall_after_headers = after_headers
    folder = make_folder(tmp_path / "out")

    start = time.monotonic()
    with pytest.raises(InputError) as info:
        push_folder(folder, "tester/stalled", token=DEFAULT_TOKEN, timeout=1)
    elapsed = time.monotonic() - start

    assert f"push to {hub_server.url}/tester/stalled timed out after 1 s" in str(info.value)
    assert "\n" not in str(info.value) and DEFAULT_TOKEN not in str(info.value)
    assert hub_server.count("POST", "/info/lfs/objects/batch") == 1  # not retried: 6 tries would take 6 s + backoff
    assert elapsed < 6


def test_push_timeout_settings_are_checked(monkeypatch, tmp_path, capsys):
    from suture.recipes.cli import main

    monkeypatch.delenv("SUTURE_PUSH_TIMEOUT", raising=False)
    assert push_timeout() == 60
    monkeypatch.setenv("SUTURE_PUSH_TIMEOUT", "2.5")
    assert push_timeout() == 2.5 and push_timeout(7) == 7
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("SUTURE_PUSH_TIMEOUT", bad)
        with pytest.raises(InputError, match=f"SUTURE_PUSH_TIMEOUT='{bad}': expected a positive number of seconds"):
            push_timeout()
    monkeypatch.delenv("SUTURE_PUSH_TIMEOUT")
    folder = make_folder(tmp_path / "out")
    assert main(["push", str(folder), "tester/x", "--timeout", "-1", "-q"]) == 2
    assert capsys.readouterr().err.strip() == "error: timeout=-1.0: expected a positive number of seconds"


def test_redaction_masks_known_and_token_shaped_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-without-shape")
    register_secret("registered-secret-4242")
    text = ("env plain-secret-without-shape; reg registered-secret-4242; "
            f"(b'authorization', b'Bearer abc.def'); Authorization: Key xyz; stray {CANARY}!")
    masked = redact(text)
    for secret in ("plain-secret-without-shape", "registered-secret-4242", "abc.def", "xyz", CANARY):
        assert secret not in masked
    assert masked.count("***") == 5 and masked.endswith("stray ***!")
    # ordinary words survive
    assert redact("the token lacks write permission; use hf_hub_download") == "the token lacks write permission; use hf_hub_download"


def test_log_filter_masks_arguments_and_tracebacks():
    record = logging.LogRecord("httpcore2.http11", logging.DEBUG, __file__, 1, "headers=%r", ([(b"x-echo", f"Bearer {CANARY}".encode())],), None)
    try:
        raise RuntimeError(f"request failed with token {CANARY}")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    formatted = logging.Formatter("%(message)s").format(record)
    assert CANARY not in formatted and "Bearer ***" in formatted and "RuntimeError" in formatted


def test_install_quiets_transport_loggers_and_filters_handlers():
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        for name in ("httpx2", "httpcore2", "httpcore", "urllib3"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        install_log_redaction()
        assert all(not logging.getLogger(n).isEnabledFor(logging.INFO) for n in ("httpx2", "httpcore2.http11", "urllib3"))
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize("size", [1, 7, 64])
def test_scan_finds_the_token_at_every_offset_across_chunk_edges(tmp_path, monkeypatch, size):
    monkeypatch.setattr(hub_module, "_SCAN_CHUNK", size)  # tiny chunks: every offset crosses some edge
    needle = CANARY.encode()
    path = tmp_path / "blob.txt"
    for offset in range(0, 3 * len(needle) + 2 * size):
        data = bytearray(b"x" * (offset + len(needle) + 5))
        data[offset:offset + len(needle)] = needle
        path.write_bytes(bytes(data))
        assert hub_module._stream_contains(path, [needle]), offset
    path.write_bytes(needle[:-1] + b"-" + needle[1:])  # near misses only
    assert not hub_module._stream_contains(path, [needle])


def test_app_error_lines_and_fallback_logging_mask_tokens(capsys):
    from suture.app import services

    assert CANARY not in services.readable(RuntimeError(f"HTTP 500 for Authorization: Bearer {CANARY}"))
    assert CANARY not in services.readable(InputError(f"bad {CANARY}"))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()  # as under Streamlit: records reach logging's last-resort handler
    try:
        install_log_redaction()
        logging.getLogger("suture.app.ui").warning("unexpected error for %s", CANARY)
    finally:
        root.handlers[:] = saved
    err = capsys.readouterr().err
    assert "unexpected error for ***" in err and CANARY not in err
