"""app/jobs.py: recipe runs in worker processes — start, progress, finish, fail, cancel (and cancel racing the
finish), non-finite output as a failure, and jobs read back from disk by a fresh store."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from suture.app import jobs
from suture.app.jobs import JobStore

WIDTH = 64


def write_models(root: Path, n: int = 2, scale: float = 1.0) -> list[str]:
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        path = root / "models" / f"m{i}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{k}.weight": torch.randn(WIDTH, WIDTH, generator=g) * scale for k in range(6)}
        save_file(tensors, str(path))
        paths.append(path.as_posix())
    return paths


def linear(paths: list[str], weight: float = 0.5, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": p, "parameters": {"weight": weight}} for p in paths], **extra}


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether the process has exited (reaped, or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def leftovers(out: Path) -> list[str]:
    """Hidden temporary/backup folders beside the output (the lock file may stay)."""
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.suture-")]


def test_a_job_runs_in_a_worker_reports_progress_and_finishes(tmp_path):
    paths = write_models(tmp_path)
    store = JobStore(tmp_path)
    out = tmp_path / "outputs" / "merged"
    job = store.start(linear(paths), out, label="two models")
    assert job.state == jobs.RUNNING and job.pid and job.pid != psutil.Process().pid
    done = store.wait(job.id, timeout=120)
    assert done.state == jobs.FINISHED and done.error is None and done.progress == 1.0
    assert done.stage in ("merge", "load") and done.finished >= done.started
    merged = load_file(str(out / "model.safetensors"))
    a, b = (load_file(p) for p in paths)
    assert torch.allclose(merged["layers.0.weight"], (a["layers.0.weight"] + b["layers.0.weight"]) / 2, atol=1e-6)
    # a fresh store (another session, a reloaded page) reads the same job back from disk
    again = JobStore(tmp_path).list()
    assert [j.id for j in again] == [job.id] and again[0].state == jobs.FINISHED and again[0].label == "two models"
    assert again[0].recipe == linear(paths) and again[0].out_dir == str(out)
    assert gone(job.pid)


def test_a_failing_job_records_its_reason_as_a_sentence(tmp_path):
    store = JobStore(tmp_path)
    job = store.wait(store.start(linear([(tmp_path / "missing.safetensors").as_posix()]), tmp_path / "outputs" / "x",
                                 label="missing").id, timeout=120)
    assert job.state == jobs.FAILED and "missing.safetensors" in job.error
    assert not job.error.startswith("<")
    assert not (tmp_path / "outputs" / "x").exists()


def test_non_finite_output_is_a_failed_job(tmp_path):
    paths = write_models(tmp_path, n=1, scale=1e5)
    store = JobStore(tmp_path)
    job = store.wait(store.start(linear(paths, 1.0, out_dtype="float16"), tmp_path / "outputs" / "nan", label="overflow").id,
                     timeout=120)
    assert job.state == jobs.FAILED and "NaN/Inf" in job.error and "layers.0.weight" in job.error


def test_cancel_kills_the_worker_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.STEP_DELAY_ENV, "1.0")  # each progress report sleeps: the merge takes ~10 s
    paths = write_models(tmp_path)
    store = JobStore(tmp_path)
    out = tmp_path / "outputs" / "slow"
    job = store.start(linear(paths), out, label="slow")
    deadline = time.monotonic() + 60
    while store.get(job.id).stage != "merge" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get(job.id).stage == "merge" and leftovers(out), "the merge should be writing its temporary folder"
    ended = store.cancel(job.id)
    assert ended.state == jobs.CANCELLED and "no output was written" in ended.error
    assert gone(job.pid, timeout=0.5)  # cancel returns once the worker is gone
    assert not out.exists() and leftovers(out) == []
    # a second Cancel changes nothing
    assert store.cancel(job.id).state == jobs.CANCELLED


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_cancel_racing_the_finish_tells_the_truth(tmp_path, monkeypatch, delay):
    """Cancel as the last tensor is written: the job ends either finished with its output or cancelled without one."""
    monkeypatch.setenv(jobs.STEP_DELAY_ENV, "0.05")
    paths = write_models(tmp_path)
    store = JobStore(tmp_path)
    out = tmp_path / "outputs" / "race"
    job = store.start(linear(paths), out, label="race")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = store.get(job.id)
        if not now.active or (now.stage == "merge" and now.done >= now.total - 1 and now.total):
            break
        time.sleep(0.005)
    time.sleep(delay)
    ended = store.cancel(job.id)
    assert ended.state in (jobs.FINISHED, jobs.CANCELLED)
    assert (ended.state == jobs.FINISHED) == (out / "model.safetensors").is_file(), ended
    assert leftovers(out) == []
    assert store.get(job.id).state == ended.state  # read again: one outcome, never both


def test_a_worker_that_dies_is_a_failure_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.STEP_DELAY_ENV, "1.0")
    paths = write_models(tmp_path)
    store = JobStore(tmp_path)
    job = store.start(linear(paths), tmp_path / "outputs" / "killed", label="killed")
    while store.get(job.id).stage == "":
        time.sleep(0.05)
    psutil.Process(job.pid).kill()  # e.g. the kernel's out-of-memory killer
    deadline = time.monotonic() + 30
    while store.get(job.id).active and time.monotonic() < deadline:
        time.sleep(0.05)
    ended = store.get(job.id)
    assert ended.state == jobs.FAILED and ended.error.startswith("The worker stopped without a result")


def test_sentence_drops_source_prefixes():
    assert jobs.sentence("<dict>: models[0].parameters.weight: must be finite, got inf") == \
        "Recipe key models[0].parameters.weight: must be finite, got inf."
    assert jobs.sentence("<string> line 2: modelz: unknown key") == "Recipe line 2: modelz: unknown key."
    assert jobs.sentence("a.safetensors: no such file") == "A.safetensors: no such file."


def finished_folder(root: Path) -> Path:
    """A finished output folder as `suture run` leaves it (weights and report) to push."""
    out = root / "outputs" / "done"
    out.mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(out / "model.safetensors"))
    (out / "report.json").write_text('{"merge_method": "linear", "models": ["a", "b"]}')
    return out


def test_a_push_job_gets_its_token_from_its_environment_only(tmp_path, hub_server):
    from tests.hub_server import DEFAULT_TOKEN

    out = finished_folder(tmp_path)
    store = JobStore(tmp_path)
    job = store.wait(store.start_publish(out, "tester/pushed", private=False, token=DEFAULT_TOKEN, label="push").id, timeout=120)
    assert job.kind == "publish" and job.state == jobs.FINISHED, job.error
    assert job.result == {"url": f"{hub_server.url}/tester/pushed"} and job.progress == 1.0
    assert hub_server.file_bytes("tester/pushed", "model.safetensors") == (out / "model.safetensors").read_bytes()
    for path in tmp_path.rglob("*"):  # the job's record, progress, outcome and log hold no token
        if path.is_file():
            assert DEFAULT_TOKEN.encode() not in path.read_bytes(), path
    # without a token the worker fails with a sentence that says how to log in
    failed = store.wait(store.start_publish(out, "tester/none", private=False, token=None, label="push").id, timeout=120)
    assert failed.state == jobs.FAILED and "no Hugging Face token" in failed.error and "HF_TOKEN" in failed.error


def test_cancel_of_a_push_job_kills_the_worker_and_keeps_the_folder(tmp_path, hub_server, monkeypatch):
    from tests.hub_server import DEFAULT_TOKEN

    monkeypatch.setenv(jobs.STEP_DELAY_ENV, "publish:5")
    out = finished_folder(tmp_path)
    store = JobStore(tmp_path)
    job = store.start_publish(out, "tester/slow", private=False, token=DEFAULT_TOKEN, label="push")
    deadline = time.monotonic() + 60
    while store.get(job.id).stage != "publish" and time.monotonic() < deadline:
        time.sleep(0.1)
    ended = store.cancel(job.id, grace=2.0)
    assert ended.state == jobs.CANCELLED and "push was stopped" in ended.error
    assert gone(job.pid)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json"]  # the result itself is untouched
