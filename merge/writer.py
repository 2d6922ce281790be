"""Streaming safetensors writer and atomic, locked output folders.

Shapes and dtypes of every output tensor are known before any is computed (they come from the plan), so
each shard's header is written first and tensor bytes are appended one at a time as they are produced.
Peak memory is about one tensor whatever the model size, unlike writers that buffer a whole shard. Each
tensor is checked for NaN/Inf after the cast to its output dtype (fp16 overflow shows up here), in chunks,
so the check needs no full-size copy.

Everything is written inside a hidden temporary folder next to the destination and renamed into place only
when complete. Names beside an output folder ``P/OUT``:

* ``P/.OUT.lock`` -- a ``filelock`` lock held from before the temporary folder is made until the final
  rename is done. A second writer of the same OUT is refused at once with one line (it does not wait: a merge
  can take hours). The empty lock file stays in place: deleting a flock file while others may open it is racy.
* ``P/.OUT.suture-tmp-PID@HOST-*`` -- the folder being written (or garbage being deleted).
* ``P/.OUT.suture-old-PID@HOST-*`` -- the previous OUT during an ``--overwrite`` swap; always complete,
  because it only ever comes from renaming a complete OUT.

Invariant: OUT is either absent or a complete folder, and when an ``--overwrite`` run dies between its two
renames (OUT -> backup, temporary -> OUT) the complete old folder survives as the backup. Every writer,
holding the lock, first recovers what dead owners (pid gone on this host, checked with ``os.kill(pid, 0)``)
left: a backup is renamed back to OUT when OUT is missing and deleted otherwise; temporaries are deleted.
Folders of live owners, or of other hosts, are never touched. After the swap the backup is first renamed
to a temporary name and only then deleted, so a half-deleted backup is never restored. Whether OUT may be
replaced is checked again at the final rename (it may have appeared meanwhile). An exception, Ctrl-C or
SIGTERM removes the temporary folder; I/O failures (read-only or missing parent, disk full, file-size
limit) become one :class:`~merge.errors.OutputError` line naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from filelock import FileLock, Timeout

from suture.merge.errors import InputError, OutputError
from suture.merge.store import TORCH_TO_SAFETENSORS

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"
TMP_MARK = ".suture-tmp-"
OLD_MARK = ".suture-old-"
LOCK_SUFFIX = ".lock"
PAUSE_ENV = "SUTURE_TEST_PAUSE_BEFORE_SWAP"  # seconds to sleep between the two renames (process-level tests)
MAX_NAMED = 5  # non-finite tensors named in a warning
_CHECK_CHUNK = 1 << 22  # elements per finite check: bounds the check's extra memory


@dataclass(frozen=True)
class TensorEntry:
    """A tensor the writer will receive: name, final shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class _Shard:
    filename: str
    entries: list[TensorEntry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def parse_size(value: int | str) -> int:
    """Parse a shard size such as 5000000000, "5GB", "500MB" or "2GiB" into bytes."""
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        size = int(float(number) * factor)
    except ValueError:
        raise InputError(f"shard size {value!r}: expected a number of bytes or a size like '5GB' or '500MB'") from None
    if size <= 0:
        raise InputError(f"shard size {value!r}: must be positive")
    return size


def plan_shards(entries: Sequence[TensorEntry], max_shard_size: int) -> list[_Shard]:
    """Split entries into shards of at most max_shard_size bytes (a larger tensor gets a shard of its own)."""
    shards: list[_Shard] = [_Shard("")]
    for entry in entries:
        current = shards[-1]
        if current.entries and current.nbytes + entry.nbytes > max_shard_size:
            current = _Shard("")
            shards.append(current)
        current.entries.append(entry)
    total = len(shards)
    for i, shard in enumerate(shards, start=1):
        shard.filename = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
    return shards


def _header_bytes(entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        if e.dtype not in TORCH_TO_SAFETENSORS:
            raise InputError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in safetensors")
        header[e.name] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def count_non_finite(tensor: torch.Tensor) -> int:
    """NaN/Inf values in a floating tensor, in chunks: a chunk's sum is finite whenever its values are, so
    the exact elementwise count runs only on chunks whose sum is not (no full-size mask is allocated)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.reshape(-1)
    acc = torch.float64 if flat.dtype == torch.float64 else torch.float32  # fp16 sums cannot overflow in fp32
    bad = 0
    for chunk in flat.split(_CHECK_CHUNK):
        if chunk.element_size() == 1:  # float8: reductions need a wider type
            chunk = chunk.to(torch.float32)
        if not bool(torch.isfinite(chunk.sum(dtype=acc))):
            bad += chunk.numel() - int(torch.isfinite(chunk).sum())
    return bad


def non_finite_summary(names: Sequence[str], total: int | None = None) -> str:
    """'a', 'b', ... (and N more): the first few of `total` tensor names for a one-line message."""
    total = len(names) if total is None else total
    shown = names[:MAX_NAMED]
    return ", ".join(repr(n) for n in shown) + (f" (and {total - len(shown)} more)" if total > len(shown) else "")


class ShardedWriter:
    """Write tensors, in the announced order, into safetensors shards inside `folder`.

    Tensors with NaN/Inf (after the cast to their output dtype) are listed in ``non_finite`` and reported in
    one warning by :meth:`finish`; with ``strict`` the first one raises :class:`OutputError` instead.
    """

    def __init__(self, folder: Path, entries: Sequence[TensorEntry], *, max_shard_size: int = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None, strict: bool = False) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise InputError(f"output would contain duplicate tensor names: {dupes[:5]}")
        self.folder = folder
        self.metadata = dict(metadata or {"format": "pt"})
        self.metadata.setdefault("format", "pt")
        self.shards = plan_shards(entries, max_shard_size)
        self._order = [(shard, e) for shard in self.shards for e in shard.entries]
        self._next = 0
        self._fh: BinaryIO | None = None
        self._open_shard: _Shard | None = None
        self.bytes_written = 0
        self.strict = strict
        self.non_finite: list[str] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the announced name, shape and dtype."""
        if self._next >= len(self._order):
            raise InputError(f"tensor {name!r} was not announced to the writer")
        shard, entry = self._order[self._next]
        if name != entry.name:
            raise InputError(f"writer expected tensor {entry.name!r} next, got {name!r}")
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise InputError(
                f"tensor {name!r}: announced {list(entry.shape)} {entry.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        bad = count_non_finite(data)
        if bad:
            if self.strict:
                raise OutputError(f"output tensor {name!r}: {bad} of {data.numel()} values are NaN/Inf after the cast to "
                                  f"{str(entry.dtype).removeprefix('torch.')} (out of range for the dtype, or produced by the merge); "
                                  "--strict refuses non-finite output")
            self.non_finite.append(name)
        path = self.folder / shard.filename
        try:
            if self._open_shard is not shard:
                self._close_file()
                self._fh = path.open("wb")
                self._open_shard = shard
                self._fh.write(_header_bytes(shard.entries, self.metadata))
            assert self._fh is not None
            if data.numel():
                self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        except OSError as exc:  # disk full, file too large: name the shard (write() errors carry no file name)
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        self.bytes_written += entry.nbytes
        self._next += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()  # buffered bytes are written here: a full disk can surface at close
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror or str(exc), fh.name) from exc

    def finish(self) -> list[str]:
        """Close the last shard and write the index when sharded; returns the shard file names."""
        if self._next != len(self._order):
            missing = [e.name for _, e in self._order[self._next : self._next + 3]]
            raise InputError(f"writer closed before every tensor was written (next missing: {missing})")
        self._close_file()
        if not self._order:  # an empty model still gets a valid (empty) file
            (self.folder / "model.safetensors").write_bytes(_header_bytes([], self.metadata))
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {e.name: s.filename for s in self.shards for e in s.entries},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.non_finite:
            logger.warning("%d output tensor(s) contain NaN/Inf after the cast to the output dtype: %s",
                           len(self.non_finite), non_finite_summary(self.non_finite))
        return [s.filename for s in self.shards]

    def abort(self) -> None:
        """Close any open file without finishing (the atomic folder removes the partial data)."""
        with contextlib.suppress(OSError):  # the data is being discarded; the first error is the one to report
            self._close_file()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out_dir` only if the block completes (see the module docstring)."""
    out = Path(out_dir).expanduser().resolve()
    tmp: Path | None = None
    try:
        if out.parent.exists() and not out.parent.is_dir():
            raise OutputError(f"{out}: cannot write the output: {out.parent} is a file, not a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        # a folder written inside this process's own temporary folder (e.g. repaired weights) is already
        # private: no lock file is left inside the output
        with contextlib.nullcontext() if _inside_own_temporary(out) else _output_lock(out):
            _recover(out)
            _check_replaceable(out, overwrite)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}{_owner()}-", dir=out.parent))
            try:
                yield tmp
                _install(tmp, out, overwrite)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as exc:
        raise _output_error(exc, out, tmp) from exc
    logger.info("wrote %s", out)


def recover_output(out_dir: str | Path) -> None:
    """Clean up after killed writers of `out_dir` now (every writer also does it first): a killed --overwrite's
    old folder is restored when OUT is missing; dead owners' temporaries are deleted. Raises OutputError
    when another run holds OUT."""
    out = Path(out_dir).expanduser().resolve()
    if not out.parent.is_dir():
        return
    try:
        with _output_lock(out):
            _recover(out)
    except OSError as exc:
        raise _output_error(exc, out, None) from exc


def _output_error(exc: OSError, out: Path, tmp: Path | None) -> OutputError | InputError:
    """One line naming the path and the cause; paths inside the temporary folder are shown under OUT."""
    name = str(exc.filename) if exc.filename is not None else None
    reason = exc.strerror or str(exc)
    if name is None:
        return OutputError(f"{out}: cannot write the output: {reason}")
    if tmp is not None and (name == str(tmp) or name.startswith(f"{tmp}/")):
        name = str(out) + name[len(str(tmp)):]
    if not _is_output_path(name, out):
        return InputError(f"{name}: {reason}")  # e.g. an input read failed while the output was being written
    return OutputError(f"{name}: cannot write the output: {reason}")


def _is_output_path(name: str, out: Path) -> bool:
    """OUT, a file inside it, one of its folders above, or one of the hidden names beside it."""
    text = str(out)
    return (name == text or name.startswith(f"{text}/") or text.startswith(name.rstrip("/") + "/")
            or name.startswith(str(out.parent / f".{out.name}.")))


def _owner() -> str:
    """PID@HOST of this process, as put into the names of its temporary folders and backups."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return f"{os.getpid()}@{host}"


def _inside_own_temporary(out: Path) -> bool:
    m = re.search(rf"{re.escape(TMP_MARK)}(\d+)@", out.parent.name)
    return m is not None and int(m.group(1)) == os.getpid()


def _recorded_owner(name: str, out: Path) -> tuple[int, str] | None:
    """(pid, host) from a temporary/backup folder name beside OUT, or None for any other name."""
    m = re.match(rf"\.{re.escape(out.name)}\.suture-(?:tmp|old)-(\d+)@([A-Za-z0-9_.]+)-", name)
    return (int(m.group(1)), m.group(2)) if m else None


def _owner_alive(name: str, out: Path) -> bool | None:
    """Whether the owner recorded in a temporary/backup name still runs (None: not one of ours)."""
    owner = _recorded_owner(name, out)
    if owner is None:
        return None
    pid, host = owner
    if host != _owner().split("@", 1)[1] or pid == os.getpid():
        return True  # another machine's process cannot be checked; our own folders are in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold ``.OUT.lock`` beside OUT, or refuse at once when another run holds it."""
    path = out.parent / f".{out.name}{LOCK_SUFFIX}"
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        if not path.exists():  # not contention: the lock file cannot be made (e.g. under /proc); say why
            path.open("a").close()
            raise OutputError(f"{path}: cannot create the output's lock file") from None
        pids = sorted({str(owner[0]) for p in out.parent.iterdir()
                       if (owner := _recorded_owner(p.name, out)) and _owner_alive(p.name, out)})
        who = f" (pid {', '.join(pids)})" if pids else ""
        raise OutputError(f"{out}: is being written by another suture run{who}; wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def _recover(out: Path) -> None:
    """Undo what dead owners left for OUT: restore a backup when OUT is missing, delete the rest."""
    mine = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.suture-")]  # no glob: OUT may hold [*?
    leftovers = sorted(mine, key=lambda p: OLD_MARK not in p.name)
    for path in leftovers:  # backups first, so a missing OUT is restored before its temporaries go
        if _owner_alive(path.name, out) is not False:
            continue
        if OLD_MARK in path.name and not out.exists() and not out.is_symlink():
            os.replace(path, out)
            logger.warning("%s: restored the previous output folder, left by an --overwrite run that was killed", out)
        else:
            _discard(path, out)


def _discard(path: Path, out: Path) -> None:
    """Delete a folder after renaming it to a temporary name (a half-deleted backup is never restored)."""
    if OLD_MARK in path.name:
        trash = out.parent / f".{out.name}{TMP_MARK}{_owner()}-{secrets.token_hex(4)}"
        try:
            os.replace(path, trash)
        except OSError as exc:  # OUT is in place either way; a later run deletes the backup once we are gone
            logger.warning("%s: could not remove the previous folder's backup %s (%s)", out, path.name, exc.strerror or exc)
            return
        path = trash
    shutil.rmtree(path, ignore_errors=True)


def _check_replaceable(out: Path, overwrite: bool, *, late: bool = False) -> None:
    if out.exists() and not overwrite:
        when = "appeared while this run was writing; it was left alone" if late else "output folder already exists"
        raise InputError(f"{out}: {when} (use --overwrite / `overwrite: true` to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing OUT goes to a backup first (see the invariant)."""
    _check_replaceable(out, overwrite, late=True)
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.parent / f".{out.name}{OLD_MARK}{_owner()}-{secrets.token_hex(4)}"
    os.replace(out, backup)
    try:
        if pause := os.environ.get(PAUSE_ENV):
            time.sleep(float(pause))
        os.replace(tmp, out)
    except BaseException:  # Ctrl-C/SIGTERM in between, or a failed rename: put the old folder back
        if not out.exists():
            os.replace(backup, out)
        raise
    _discard(backup, out)


def save_tensors(tensors: Mapping[str, torch.Tensor], out_dir: str | Path, *, overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write an in-memory dict of tensors as a (possibly sharded) safetensors folder, atomically."""
    entries = [TensorEntry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_size=max_shard_size, metadata=metadata)
        try:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            writer.finish()
        finally:
            writer.abort()
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text)
    return Path(out_dir).expanduser().resolve()
