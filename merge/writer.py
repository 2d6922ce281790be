"""Streaming safetensors writer and atomic output folders.

Shapes and dtypes of every output tensor are known before any is computed (they come from the plan), so
each shard's header is written first and tensor bytes are appended one at a time as they are produced.
Peak memory is about one tensor whatever the model size, unlike writers that buffer a whole shard.

Everything is written inside a hidden temporary folder next to the destination and renamed into place only
when complete: an exception, Ctrl-C or SIGTERM removes the temporary folder, and an existing output folder is
never clobbered unless ``overwrite`` is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from merge.errors import InputError
from merge.store import TORCH_TO_SAFETENSORS

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 5_000_000_000
INDEX_NAME = "model.safetensors.index.json"
TMP_MARK = ".suture-tmp-"


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


class ShardedWriter:
    """Write tensors, in the announced order, into safetensors shards inside `folder`."""

    def __init__(self, folder: Path, entries: Sequence[TensorEntry], *, max_shard_size: int = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None) -> None:
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
        if self._open_shard is not shard:
            self._close_file()
            self._fh = (self.folder / shard.filename).open("wb")
            self._fh.write(_header_bytes(shard.entries, self.metadata))
            self._open_shard = shard
        assert self._fh is not None
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).numpy()))
        self.bytes_written += entry.nbytes
        self._next += 1

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

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
        return [s.filename for s in self.shards]

    def abort(self) -> None:
        """Close any open file without finishing (the atomic folder removes the partial data)."""
        self._close_file()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out_dir` only if the block completes."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output folder already exists (use --overwrite / `overwrite: true` to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}old-", dir=out.parent))
        os.replace(out, backup / "old")
        os.replace(tmp, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)
    logger.info("wrote %s", out)


def _remove_stale_temporaries(out: Path) -> None:
    # A run killed with SIGKILL cannot clean up; its hidden folder is recognisable by name and pid-free,
    # so later runs for the same destination remove it.
    for stale in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


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
