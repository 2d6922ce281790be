"""Lazy, read-only views of one model's tensors.

A :class:`TensorStore` knows every tensor's name, shape and dtype without reading data, and reads one
tensor at a time with :meth:`TensorStore.get`. Backends: a single ``.safetensors`` file, a sharded folder
with ``*.safetensors.index.json``, a folder holding ``.safetensors`` files, an in-memory dict, and, only
when the user opts in, pickle checkpoints (``.bin``/``.pt``) loaded with ``weights_only=True``.

Safetensors headers are parsed and checked here before any data is read, so a truncated file or a header
that lies about sizes fails with a message naming the file and tensor instead of a crash deep in a merge.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from merge.errors import InputError

logger = logging.getLogger(__name__)

# safetensors dtype tags <-> torch dtypes, with element sizes in bytes
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS = {dt: tag for tag, (dt, _) in SAFETENSORS_DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, plus where it lives."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None = None
    offset: int = 0  # absolute byte offset of the data in `file` (safetensors only)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class TensorStore:
    """Read-only, lazy view of one model's tensors (subclasses implement `_read`)."""

    def __init__(self, source: str, infos: dict[str, TensorInfo], *, path: Path | None = None, config: dict | None = None, strict: bool = False) -> None:
        self.source = source
        self.path = path
        self.config = config
        self.strict = strict
        self._infos = infos

    def names(self) -> list[str]:
        """Tensor names in storage order."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of `name` without reading data."""
        try:
            return self._infos[name]
        except KeyError:
            raise InputError(f"{self.source}: no tensor named {name!r} (the model has {len(self._infos)} tensors)") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name` without reading data."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of `name` without reading data."""
        return self.info(name).dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, by name."""
        return {n: i.shape for n, i in self._infos.items()}

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor onto `device`; non-finite values warn (or raise when strict)."""
        info = self.info(name)
        tensor = self._read(name, info)
        check_finite(tensor, f"{self.source}: tensor {name!r}", strict=self.strict)
        return tensor.to(device) if str(device) != "cpu" else tensor

    def state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load every tensor (only for small models: this is the one call that reads everything)."""
        return {n: self.get(n, device) for n in self._infos}

    def total_bytes(self) -> int:
        """Sum of all tensors' data sizes."""
        return sum(i.nbytes for i in self._infos.values())

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open file handles (reading again reopens them)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, {len(self._infos)} tensors)"


def check_finite(tensor: torch.Tensor, what: str, *, strict: bool) -> None:
    """Warn about (or, when strict, refuse) NaN/Inf values in a floating tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # A sum is finite whenever every element is (barring overflow), and costs a fraction of a full
    # elementwise isfinite pass; count exactly only when it is not.
    if bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if not bad:
        return
    message = f"{what} has {bad} non-finite value(s) (NaN or Inf)"
    if strict:
        raise InputError(message)
    logger.warning(message)


class DictStore(TensorStore):
    """A store over an in-memory dict of tensors (tests, the app, intermediate results)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, source: str = "<memory>", config: dict | None = None, strict: bool = False) -> None:
        infos = {n: TensorInfo(tuple(t.shape), t.dtype) for n, t in tensors.items()}
        super().__init__(source, infos, config=config, strict=strict)
        self._tensors = dict(tensors)

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        return self._tensors[name]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header: (tensor infos, metadata, data start offset)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len} does not fit the file size {size})"
                )
            header_bytes = fh.read(header_len)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            tag, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from exc
        if tag not in SAFETENSORS_DTYPES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {tag!r} (expected one of {sorted(SAFETENSORS_DTYPES)})")
        dtype, itemsize = SAFETENSORS_DTYPES[tag]
        expected = math.prod(shape) * itemsize
        if end - begin != expected or begin < 0:
            raise InputError(
                f"{path}: header lies about tensor {name!r}: shape {list(shape)} {tag} needs {expected} bytes "
                f"but data_offsets [{begin}, {end}] give {end - begin}"
            )
        if end > data_len:
            raise InputError(
                f"{path}: truncated file: tensor {name!r} ends at byte {end} of the data section, which has only {data_len} bytes"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(shape, dtype, path, data_start + begin)
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise InputError(f"{path}: corrupt header: tensor {name!r} starts at {begin}, expected {cursor} (gap or overlap)")
        cursor = end
    # keep storage order (offset order) so streaming reads walk the file forwards
    ordered = {name: infos[name] for _, _, name in spans}
    return ordered, dict(metadata), data_start


class SafetensorsStore(TensorStore):
    """A store over one or more safetensors files (a single file, a folder, or a sharded index)."""

    def __init__(self, files: Mapping[str, Path] | list[Path], *, source: str, path: Path, config: dict | None, strict: bool = False) -> None:
        infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        expected_by_file: dict[Path, list[str]] | None = None
        if isinstance(files, Mapping):  # from an index: tensor -> file
            expected_by_file = {}
            for tensor, file in files.items():
                expected_by_file.setdefault(file, []).append(tensor)
            file_list = list(expected_by_file)
        else:
            file_list = list(files)
        for file in file_list:
            if not file.exists():
                raise InputError(f"{source}: shard {file.name} listed in the index is missing")
            file_infos, metadata, _ = read_safetensors_header(file)
            self.metadata.update(metadata)
            if expected_by_file is not None:
                missing = [t for t in expected_by_file[file] if t not in file_infos]
                if missing:
                    raise InputError(f"{file}: the index says it holds {missing[:3]} but the file does not")
            for name, info in file_infos.items():
                if name in infos:
                    raise InputError(f"{source}: tensor {name!r} appears in both {infos[name].file} and {file}")
                infos[name] = info
        super().__init__(source, infos, path=path, config=config, strict=strict)
        self._handles: dict[Path, BinaryIO] = {}

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        # Plain positioned reads instead of mmap: mapped pages count towards RSS until unmapped, which
        # would make peak memory grow with model size instead of staying near one tensor.
        assert info.file is not None
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = self._handles[info.file] = info.file.open("rb")
            except OSError as exc:
                raise InputError(f"{info.file}: cannot open ({exc.strerror or exc})") from exc
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        handle.seek(info.offset)
        got = handle.readinto(memoryview(buffer.numpy())) if info.nbytes else 0
        if got != info.nbytes:
            raise InputError(f"{info.file}: truncated while reading tensor {name!r} ({got} of {info.nbytes} bytes)")
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Close the open file handles (reading again reopens them)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class PickleStore(TensorStore):
    """A pickle checkpoint loaded with ``weights_only=True`` (only when the user opts in)."""

    def __init__(self, files: list[Path], *, source: str, path: Path, config: dict | None, strict: bool = False) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise InputError(f"{file}: cannot load as a weights-only pickle checkpoint ({exc})") from exc
            if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, Mapping):
                raise InputError(f"{file}: expected a dict of tensors, found {type(loaded).__name__}")
            for name, value in loaded.items():
                if isinstance(value, torch.Tensor):
                    tensors[name] = value
        infos = {n: TensorInfo(tuple(t.shape), t.dtype, None) for n, t in tensors.items()}
        super().__init__(source, infos, path=path, config=config, strict=strict)
        self._tensors = tensors

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        return self._tensors[name]


def read_json(path: Path) -> dict:
    """A JSON file's content; InputError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from exc


def _refuse_pickle(path: Path) -> InputError:
    return InputError(
        f"{path}: is a pickle checkpoint; Suture does not unpickle files by default because pickle can run code. "
        "Convert it to safetensors, or opt in with --allow-pickle / `allow_pickle: true` (loaded with weights_only=True)."
    )


def open_store(ref: str | Path | Mapping[str, torch.Tensor] | TensorStore, *, allow_pickle: bool = False, strict: bool = False) -> TensorStore:
    """Open a model as a lazy TensorStore: a file, a folder, a sharded index, or an in-memory dict."""
    if isinstance(ref, TensorStore):
        return ref
    if isinstance(ref, Mapping):
        return DictStore(ref, strict=strict)
    path = Path(ref).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    config_file = folder / "config.json"
    config = read_json(config_file) if config_file.is_file() else None
    source = str(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsStore([path], source=source, path=path, config=config, strict=strict)
        if path.name.endswith(".safetensors.index.json"):
            return _open_index(path, config, strict)
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(path)
            return PickleStore([path], source=source, path=path, config=config, strict=strict)
        raise InputError(f"{path}: unknown model file type (expected .safetensors, a safetensors index, or a folder)")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = [p for p in indexes if p.name == "model.safetensors.index.json"]
        indexes = preferred or indexes[:1]
    if indexes:
        return _open_index(indexes[0], config, strict)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return SafetensorsStore(shards, source=source, path=path, config=config, strict=strict)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise _refuse_pickle(pickles[0])
        return PickleStore(pickles, source=source, path=path, config=config, strict=strict)
    raise InputError(f"{path}: folder holds no .safetensors files (nor a *.safetensors.index.json)")


def _open_index(index_path: Path, config: dict | None, strict: bool) -> SafetensorsStore:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: expected a non-empty 'weight_map' object mapping tensor names to shard files")
    files = {name: index_path.parent / shard for name, shard in weight_map.items()}
    return SafetensorsStore(files, source=str(index_path.parent), path=index_path.parent, config=config, strict=strict)
