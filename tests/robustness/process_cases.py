"""Real `suture run` processes killed at random moments and racing for one output folder (issue "Trust", item 3).

`kill_and_concurrency_counts` is shared by tests/robustness/test_kill_concurrency.py and the robustness
benchmark. Every run is `python -m suture.recipes.cli run` from the repository root on a small synthetic TIES recipe
written into `workdir` (no download, about a second of merging), compared with a clean reference run:

* kills: SIGKILL at seeded random delays after start, shortly after the hidden temporary folder appears
  (mid-write), or inside the --overwrite swap (held open by SUTURE_TEST_PAUSE_BEFORE_SWAP). After each
  kill, OUT must be absent or complete (every tensor, bytes identical to the reference), and once the
  killed run's leftovers are recovered (what the next writer does first) an OUT that was complete before
  the kill must be complete again: an old folder that a kill made disappear is an output lost. Every
  third kill, and at the end, a re-run completes and must give byte-identical weights.
* concurrency: two runs started together on one OUT, with and without --overwrite, several rounds. Each
  must exit 0 or fail with one `error:` line; the final OUT must be complete and identical.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAUSE_ENV = "SUTURE_TEST_PAUSE_BEFORE_SWAP"  # read by merge/writer.py between the two renames only
SWAP_PAUSE = 1.0
TIMEOUT = 120.0


def write_recipe(workdir: Path, tensors: int = 32, width: int = 512) -> Path:
    """Two random models and a linear recipe sharded at 8 MB (several shards and an index to get wrong)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        save_file({f"layers.{i}.weight": torch.randn(width, width, generator=g) for i in range(tensors)},
                  workdir / f"{name}.safetensors")
    recipe = {"merge_method": "linear", "out_shard_size": "8MB",
              "models": [{"model": str(workdir / f"{n}.safetensors"), "parameters": {"weight": w}} for n, w in (("a", 0.3), ("b", 0.7))]}
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start_run(recipe: Path, out: Path, *, overwrite: bool = False, pause: float | None = None) -> subprocess.Popen:
    """`suture run RECIPE OUT -q [--overwrite]` as a child process of its own."""
    env = dict(os.environ)
    env.pop(PAUSE_ENV, None)
    if pause is not None:
        env[PAUSE_ENV] = str(pause)
    argv = [sys.executable, "-m", "suture.recipes.cli", "run", str(recipe), str(out), "-q"] + (["--overwrite"] if overwrite else [])
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a run; its exit code and stderr."""
    _, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, err


def weights_digest(folder: Path) -> dict[str, str] | None:
    """sha256 of every weight file (shards and index) when the folder loads with all its tensors, else None."""
    import json

    from safetensors import safe_open

    if not folder.is_dir():
        return None
    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        names = set()
        for shard in sorted(set(index["weight_map"].values())):
            with safe_open(str(folder / shard), framework="pt") as f:
                names.update(f.keys())
                for key in f.keys():
                    f.get_tensor(key)
        if names != set(index["weight_map"]):
            return None
    except (OSError, ValueError, KeyError, RuntimeError):  # safetensors raises its own errors as these
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("model*"))}


def _temporaries(out: Path, pid: int) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.suture-tmp-{pid}@*"))


def _backups(out: Path, pid: int) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.suture-old-{pid}@*"))


def _kill_when(proc: subprocess.Popen, ready, delay: float) -> bool:
    """SIGKILL `delay` seconds after `ready()` holds (False: the run ended first)."""
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    return True


def _one_line_error(code: int, err: str) -> bool:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def kill_and_concurrency_counts(workdir: Path, kills: int = 10, rounds: int = 2, seed: int = 0) -> dict:
    """Kill `kills` runs at seeded random moments and race two runs `rounds` times per mode; counts as a dict."""
    from suture.merge.writer import recover_output

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    recipe = write_recipe(workdir)
    started = time.monotonic()
    code, err = finish(start_run(recipe, workdir / "reference"))
    if code != 0:
        raise RuntimeError(f"the reference run failed: {err.strip()[-400:]}")
    run_seconds = time.monotonic() - started
    reference = weights_digest(workdir / "reference")
    assert reference is not None
    counts = {"kills_tried": 0, "kills_landed": 0, "kills_mid_write": 0, "kills_in_swap": 0, "broken_after_kill": 0,
              "outputs_lost": 0, "rerun_failures": 0, "non_identical_reruns": 0, "concurrent_rounds": 0,
              "concurrent_lost_outputs": 0, "double_success_without_overwrite": 0, "busy_refusals": 0,
              "unclear_errors": 0, "leftovers": 0}

    out = workdir / "out"
    for i in range(kills):
        if i % 4 == 0:
            shutil.rmtree(out, ignore_errors=True)  # some kills hit a first write, the others an --overwrite
        had_old = weights_digest(out) == reference
        moment = ("swap", "write", "random")[i % 3] if had_old else ("write", "random")[i % 2]
        counts["kills_tried"] += 1
        for attempt in range(3):  # a run that finished before its kill is tried again with a shorter delay
            proc = start_run(recipe, out, overwrite=had_old, pause=SWAP_PAUSE if moment == "swap" else None)
            scale = 0.5 ** attempt
            if moment == "swap":
                landed = _kill_when(proc, lambda: bool(_backups(out, proc.pid)), rng.uniform(0.0, SWAP_PAUSE * 0.8))
            elif moment == "write":
                landed = _kill_when(proc, lambda: bool(_temporaries(out, proc.pid)), scale * rng.uniform(0.0, 0.3))
            else:
                landed = _kill_when(proc, lambda: True, scale * rng.uniform(0.05, run_seconds))
            if landed:
                counts["kills_landed"] += 1
                counts["kills_mid_write"] += moment == "write"
                counts["kills_in_swap"] += moment == "swap"
                break
            finish(proc)
        if out.exists() and weights_digest(out) != reference:
            counts["broken_after_kill"] += 1
        recover_output(out)  # in this process: what `suture run` does first, without another torch start-up
        if had_old and weights_digest(out) != reference:
            counts["outputs_lost"] += 1
        if i % 3 == 2:
            code, _ = finish(start_run(recipe, out, overwrite=True))
            counts["rerun_failures"] += code != 0
            counts["non_identical_reruns"] += weights_digest(out) != reference

    code, _ = finish(start_run(recipe, out, overwrite=True))  # a final clean re-run over whatever is there
    counts["rerun_failures"] += code != 0
    counts["non_identical_reruns"] += weights_digest(out) != reference

    for overwrite in (False, True):
        for _ in range(rounds):
            counts["concurrent_rounds"] += 1
            if not overwrite:
                shutil.rmtree(out, ignore_errors=True)
            # with --overwrite both replace a complete OUT; the swap pause keeps the lock held long enough to meet
            procs = [start_run(recipe, out, overwrite=overwrite, pause=SWAP_PAUSE if overwrite else None) for _ in range(2)]
            results = [finish(p) for p in procs]
            successes = sum(code == 0 for code, _ in results)
            for code, err in results:
                if code != 0:
                    counts["unclear_errors"] += not _one_line_error(code, err)
                    counts["busy_refusals"] += "being written by another suture run" in err
            if not overwrite and successes == 2:
                counts["double_success_without_overwrite"] += 1
            if successes == 0 or weights_digest(out) != reference:
                counts["concurrent_lost_outputs"] += 1
    counts["leftovers"] = len([p for p in workdir.iterdir() if p.name.startswith(".out") and p.name != ".out.lock"])
    counts["seconds"] = round(time.monotonic() - started, 1)
    return counts
