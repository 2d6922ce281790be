"""An interrupted `suture run` (Ctrl-C, SIGTERM, SIGKILL) never leaves a partial output folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def slow_recipe(tmp_path_factory):
    """Two 128 MB models merged with TIES: slow enough to interrupt mid-write on any machine."""
    root = tmp_path_factory.mktemp("interrupt")
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_file({f"layers.{i}.weight": torch.randn(1024, 1024, generator=g) for i in range(32)}, root / f"{name}.safetensors")
    recipe = {"merge_method": "ties", "base_model": str(root / "a.safetensors"),
              "models": [{"model": str(root / "b.safetensors"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "suture.recipes.cli", "run", str(recipe), str(out), "-q"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial_output(out: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Block until the hidden temporary folder holds some written bytes (the run is mid-write)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in out.parent.glob(f".{out.name}.suture-tmp-*"):
            shard = tmp / "model.safetensors"
            if shard.exists() and shard.stat().st_size > 8 * 1024 * 1024:
                return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("run did not start writing in time")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_signal_mid_write_removes_everything(tmp_path, slow_recipe, sig, code):
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    _wait_for_partial_output(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "no output was written" in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".out.lock"]  # only the (empty) lock file stays


def test_sigkill_leaves_only_a_hidden_temporary_that_the_next_run_removes(tmp_path, slow_recipe):
    out = tmp_path / "out"
    proc = _start(slow_recipe, out)
    _wait_for_partial_output(out, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name != ".out.lock"]
    assert leftovers and all(p.name.startswith(f".out.suture-tmp-{proc.pid}@") for p in leftovers)
    done = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "run", str(slow_recipe), str(out), "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]
