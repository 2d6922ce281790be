"""Output-side failures: I/O errors are one line with nothing left behind, non-finite output is never silent,
and the locked, recoverable output folder keeps its invariant (merge/writer.py's module docstring)."""

from __future__ import annotations

import errno
import json
import pathlib
import re
import resource
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock
from safetensors.torch import load_file, save_file

from suture.merge.errors import InputError, OutputError
from suture.merge.writer import PAUSE_ENV, _owner, atomic_output_dir, count_non_finite
from tests.robustness.harness import Case, run_cli_case

ROOT = Path(__file__).parents[2]
REAL_OPEN = pathlib.Path.open


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A linear merge of two folder models (with config.json, so every companion file is written)."""
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        save_file({f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(4)}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"model_type": "mlp", "torch_dtype": "float32"}))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / n), "parameters": {"weight": 0.5}} for n in ("a", "b")]}))
    return path


def _only_lock_left(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == [f".{out.name}.lock"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ I/O failures


def test_file_size_limit_is_one_line_and_leaves_nothing(recipe, tmp_path):
    """RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write raises EFBIG, reported with the shard's final path."""
    out = tmp_path / "out"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, 16_384))

    done = subprocess.run([sys.executable, "-m", "suture.recipes.cli", "run", str(recipe), str(out), "-q"], cwd=ROOT,
                          preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {out}/model.safetensors: cannot write the output: File too large"]
    _only_lock_left(out)


@pytest.mark.parametrize("where", ["file", "file/sub", "/proc", "/proc/self", "/sys"])
def test_unwritable_output_places_are_one_line(recipe, tmp_path, where):
    """A parent that is a regular file (ENOTDIR), or pseudo file systems that refuse new files (like read-only)."""
    (tmp_path / "file").write_text("not a folder")
    parent = Path(where) if where.startswith("/") else tmp_path / where
    out = parent / f"suture-out-{uuid.uuid4().hex[:8]}"
    outcome = run_cli_case(Case(where, ["run", str(recipe), str(out), "-q"], out))
    assert outcome.clean, outcome.describe()
    assert "cannot write the output" in outcome.error_lines[0] and str(parent.resolve()) in outcome.error_lines[0]


def _full_disk(monkeypatch, target: str) -> None:
    """Files named `target` opened for writing go to /dev/full: the kernel answers ENOSPC, as on a full disk."""

    def fake_open(self, mode="r", *args, **kwargs):
        if self.name == target and "w" in mode and ".suture-tmp-" in str(self):
            return REAL_OPEN(Path("/dev/full"), mode, *args, **kwargs)
        return REAL_OPEN(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", fake_open)


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "suture_recipe.yml", "report.json", "README.md"])
def test_disk_full_on_weights_and_companions(recipe, tmp_path, monkeypatch, target):
    out = tmp_path / "out"
    _full_disk(monkeypatch, target)
    outcome = run_cli_case(Case(target, ["run", str(recipe), str(out), "-q"], out))
    assert outcome.clean, outcome.describe()
    assert "No space left on device" in outcome.error_lines[0] and str(out) in outcome.error_lines[0]
    _only_lock_left(out)


def test_disk_full_while_saving_a_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from suture.merge.plot import plot_interpolation

    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, fname, **kw: original(self, "/dev/full", **kw))
    out = tmp_path / "out"
    curve = [{"t": 0.0, "loss": 1.0, "accuracy": 0.5}, {"t": 1.0, "loss": 0.5, "accuracy": 0.9}]
    with pytest.raises(OutputError) as info:
        with atomic_output_dir(out) as tmp:
            plot_interpolation({"a-b": curve}, tmp / "barrier.png")
    assert str(info.value) == f"{out}: cannot write the output: No space left on device"
    _only_lock_left(out)


# ---------------------------------------------------------------------------------------------- non-finite output


def test_count_non_finite_matches_an_elementwise_reference(monkeypatch):
    monkeypatch.setattr("suture.merge.writer._CHECK_CHUNK", 1000)  # several chunks, some clean, some not
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.randn(10_000, generator=g).to(dtype)
        assert count_non_finite(x) == 0
        idx = torch.randperm(10_000, generator=g)[:37]
        x[idx[:20]] = float("nan")
        x[idx[20:]] = float("-inf")
        assert count_non_finite(x) == int((~torch.isfinite(x)).sum()) == 37
    huge = torch.full((5000,), 3e38)  # finite values whose float32 sum overflows: still counted as finite
    assert count_non_finite(huge) == 0
    assert count_non_finite(torch.arange(10)) == 0  # integer tensors are never non-finite


def _overflow_recipe(tmp_path: Path, value: float, weight: float, out_dtype: str | None) -> Path:
    save_file({"big.weight": torch.full((8, 8), value), "fine.weight": torch.ones(8, 8)}, tmp_path / "m.safetensors")
    data = {"merge_method": "linear", "models": [{"model": str(tmp_path / "m.safetensors"), "parameters": {"weight": weight}}]}
    if out_dtype:
        data["out_dtype"] = out_dtype
    path = tmp_path / "overflow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("value, weight, out_dtype, bad", [
    (1e5, 1.0, "float16", ["big.weight"]),  # fp16 overflow after the cast
    (1.0, 1e308, None, ["big.weight", "fine.weight"]),  # the weight itself is inf in float32 compute
])
def test_non_finite_output_warns_records_and_fails_under_strict(tmp_path, value, weight, out_dtype, bad):
    recipe = _overflow_recipe(tmp_path, value, weight, out_dtype)
    out = tmp_path / "out"
    outcome = run_cli_case(Case("warn", ["run", str(recipe), str(out)], out))
    assert outcome.exit_code == 0, outcome.describe()
    warnings = re.findall(r"WARNING suture\.merge\.writer: .*", outcome.stderr)  # after the progress bars' output
    assert len(warnings) == 1 and "NaN/Inf" in warnings[0] and "'big.weight'" in warnings[0], outcome.stderr
    assert f"warning: {len(bad)} output tensor(s) contain NaN/Inf" in outcome.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["non_finite"] == {"tensors": bad, "count": len(bad)}
    written = load_file(out / "model.safetensors")
    assert [n for n, t in written.items() if not torch.isfinite(t).all()] == bad  # the check saw the real values

    strict_out = tmp_path / "strict"
    outcome = run_cli_case(Case("strict", ["run", str(recipe), str(strict_out), "--strict", "-q"], strict_out))
    assert outcome.clean, outcome.describe()
    assert "'big.weight'" in outcome.error_lines[0] and "--strict refuses non-finite output" in outcome.error_lines[0]
    _only_lock_left(strict_out)


def test_finite_output_records_an_empty_non_finite_section(recipe, tmp_path):
    out = tmp_path / "out"
    assert run_cli_case(Case("ok", ["run", str(recipe), str(out), "-q"], None)).exit_code == 0
    assert json.loads((out / "report.json").read_text())["non_finite"] == {"tensors": [], "count": 0}


# -------------------------------------------------------------------------------------- lock and recovery


def _leftover(out: Path, kind: str, pid: int, host: str | None = None, content: str = "old") -> Path:
    host = host or _owner().split("@", 1)[1]
    path = out.parent / f".{out.name}.suture-{kind}-{pid}@{host}-abcd1234"
    path.mkdir()
    (path / "weights.txt").write_text(content)
    return path


def test_dead_owners_backup_is_restored_when_out_is_missing(tmp_path):
    out = tmp_path / "out"
    backup = _leftover(out, "old", _dead_pid())
    partial = _leftover(out, "tmp", _dead_pid(), content="half")
    with pytest.raises(InputError, match="already exists"):  # restored first, then not clobbered
        with atomic_output_dir(out):
            pass
    assert (out / "weights.txt").read_text() == "old"
    assert not backup.exists() and not partial.exists()


def test_dead_owners_backup_is_deleted_when_out_exists(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("new")
    backup = _leftover(out, "old", _dead_pid())
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "weights.txt").write_text("newer")
    assert (out / "weights.txt").read_text() == "newer" and not backup.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_live_or_foreign_owners_leftovers_are_left_alone(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _leftover(out, "tmp", sleeper.pid)
        foreign = _leftover(out, "old", _dead_pid(), host="another-machine")
        with atomic_output_dir(out) as tmp:
            (tmp / "weights.txt").write_text("new")
        assert live.exists() and foreign.exists()
        assert (out / "weights.txt").read_text() == "new"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
        "print('held', flush=True); time.sleep(60)"), str(tmp_path / ".out.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _leftover(out, "tmp", holder.pid, content="half")
        with pytest.raises(OutputError, match=rf"^{out}: is being written by another suture run \(pid {holder.pid}\)"):
            with atomic_output_dir(out, overwrite=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    with atomic_output_dir(out) as tmp:  # the holder is gone: its lock and temporary go with it
        (tmp / "weights.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_out_appearing_meanwhile_is_not_clobbered_without_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="appeared while this run was writing"):
        with atomic_output_dir(out) as tmp:
            (tmp / "weights.txt").write_text("mine")
            out.mkdir()
            (out / "weights.txt").write_text("theirs")
    assert (out / "weights.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_interrupt_between_the_two_renames_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("old")

    def interrupted(seconds: float) -> None:
        assert not out.exists()  # we are between OUT -> backup and temporary -> OUT
        raise KeyboardInterrupt

    monkeypatch.setenv(PAUSE_ENV, "5")
    monkeypatch.setattr("suture.merge.writer.time.sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "weights.txt").write_text("new")
    assert (out / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_folders_written_inside_a_running_output_get_no_lock_file(tmp_path):
    """Repair and ZipIt write a sub-folder inside the output's temporary folder: nothing extra may end up in OUT."""
    from suture.merge.writer import save_tensors

    out = tmp_path / "out [1]"  # glob characters in the name are plain characters
    with atomic_output_dir(out) as tmp:
        save_tensors({"w": torch.ones(2)}, tmp / ".repaired", overwrite=True)
        for item in (tmp / ".repaired").iterdir():
            item.replace(tmp / item.name)
        (tmp / ".repaired").rmdir()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out [1].lock", "out [1]"]
