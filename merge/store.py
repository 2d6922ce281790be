"""Lazy, read-only views of one model's tensors.

A :class:`TensorStore` knows every tensor's name, shape and dtype without reading data, and reads one
tensor at a time with :meth:`TensorStore.get`. Backends: a single ``.safetensors`` file, a sharded folder
with ``*.safetensors.index.json``, a folder holding ``.safetensors`` files, an in-memory dict, and, only
when the user opts in, pickle checkpoints (``.bin``/``.pt``) loaded with ``weights_only=True``.

Safetensors headers are validated by the `safetensors` library before any data is read, and refusals are
explained in one line naming the file and the field, so a truncated or crafted file fails here instead of
crashing deep in a merge. Data is then read with positioned reads (memory stays near one tensor). Index
entries must name regular files inside the model folder, and nothing that is not a regular file is opened.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from suture.merge.errors import InputError

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


def _one_line(text: object, limit: int = 300) -> str:
    """`text` as one short line (errors may quote attacker-controlled names and values)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _short(value: object) -> str:
    """A bounded repr of a header value for error messages."""
    return _one_line(repr(value), 120)


def _kind_of(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading only if it is a regular file.

    The open is non-blocking and the type is checked on the open descriptor, so a FIFO or device put in
    place of a model file is refused instead of blocking forever (or streaming endless bytes).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot open ({_one_line(getattr(exc, 'strerror', None) or exc)})") from exc
    kind = _kind_of(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise InputError(f"{path}: is {kind}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice is a corrupt (or deceptive) file, not "last one wins"."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    """A JSON object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _parse_json(raw: bytes, path: Path, what: str, *, unique_keys: bool = True) -> object:
    """Parse JSON that came from a file, as one InputError line for every way it can be bad.

    Strict UTF-8 (as the safetensors format requires; `json.loads` would otherwise guess UTF-16/32 from
    the first bytes). With `unique_keys`, a key given twice is refused instead of "last one wins", which
    could hide a tensor or a shard entry.
    """
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys if unique_keys else None)
    except _DuplicateKey as exc:
        raise InputError(f"{path}: {what} names key {_short(exc.key)} twice") from None
    except RecursionError:
        raise InputError(f"{path}: {what} nests JSON too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, bad UTF-8, integers too long to convert
        raise InputError(f"{path}: {what} is not valid JSON ({_one_line(exc, 160)})") from None


def _explain_header(header: object, data_len: int) -> str | None:
    """Name the field at fault in a header that safetensors refused (None: no clearer words than its own)."""
    if not isinstance(header, dict):
        return f"expected a JSON object, found {type(header).__name__}"
    metadata = header.get("__metadata__", {})
    if metadata is not None and (not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())):
        return f"'__metadata__' must map strings to strings, found {_short(metadata)}"
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        field = f"tensor {_short(name)}"
        if not isinstance(entry, dict):
            return f"{field}: expected an object with dtype, shape and data_offsets, found {_short(entry)}"
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            return f"{field}: missing field {missing[0]!r}"
        tag, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(tag, str) or tag not in SAFETENSORS_DTYPES:
            return f"{field}: unsupported dtype {_short(tag)} (expected one of {sorted(SAFETENSORS_DTYPES)})"
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            return f"{field}: shape must be a list of non-negative integers, found {_short(shape)}"
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            return f"{field}: data_offsets must be two non-negative integers, found {_short(offsets)}"
        begin, end = offsets
        expected = math.prod(shape) * SAFETENSORS_DTYPES[tag][1]
        if end - begin != expected:
            return (f"header lies about {field}: shape {_short(shape)} {tag} needs {expected} bytes "
                    f"but data_offsets [{begin}, {end}] give {end - begin}")
        if end > data_len:
            return f"truncated file: {field} ends at byte {end} of the data section, which has only {data_len} bytes"
        spans.append((begin, end, name))
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            return f"tensor {_short(name)} data_offsets start at {begin}, expected {cursor} (gap or overlap between tensors)"
        cursor = end
    if cursor != data_len:
        return f"{data_len - cursor} bytes after the last tensor's data (file longer than its header says)"
    return None


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (bools are ints in Python but not in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a safetensors header: (tensor infos, metadata, data start offset).

    The `safetensors` library is the judge of validity (types, dtype names, offsets covering the data
    exactly, UTF-8, nesting limits); it only maps the file, so no tensor data is read here. Suture adds
    a message naming the field when it can, refuses duplicate names and dtypes torch cannot hold, and
    keeps the offsets for its own positioned reads.
    """
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            # checked before reading, so a header length of 2**62 costs nothing
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise InputError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len} does not fit the file size {size})"
                )
            raw = fh.read(header_len)
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from exc
    data_start = 8 + header_len
    data_len = size - data_start
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        reason = _explain_header(_parse_json(raw, path, "safetensors header"), data_len)
        if reason is None:
            reason = str(exc).removeprefix("Error while deserializing header: ")
        raise InputError(f"{path}: invalid safetensors header: {_one_line(reason)}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({_one_line(exc.strerror or exc)})") from exc
    header = _parse_json(raw, path, "safetensors header")  # safetensors accepted it: bounded depth, sound types
    assert isinstance(header, dict)
    metadata = header.pop("__metadata__", None) or {}
    infos: dict[str, TensorInfo] = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        tag = entry["dtype"]
        if tag not in SAFETENSORS_DTYPES:
            raise InputError(f"{path}: tensor {_short(name)} has unsupported dtype {tag!r} (expected one of {sorted(SAFETENSORS_DTYPES)})")
        # storage order (offset order), so streaming reads walk the file forwards
        infos[name] = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[tag][0], path, data_start + entry["data_offsets"][0])
    if not infos:
        raise InputError(f"{path}: safetensors file holds no tensors")
    return infos, dict(metadata), data_start


class SafetensorsStore(TensorStore):
    """A store over one or more safetensors files (a single file, a folder, or a sharded index)."""

    def __init__(self, files: Mapping[str, Path] | list[Path], *, source: str, path: Path, config: dict | None, strict: bool = False) -> None:
        infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        expected_by_file: dict[Path, list[str]] | None = None
        if isinstance(files, Mapping):  # from an index: tensor -> file (already confined by _open_index)
            expected_by_file = {}
            for tensor, file in files.items():
                expected_by_file.setdefault(file, []).append(tensor)
            file_list = list(expected_by_file)
        else:
            file_list = list(files)
        for file in file_list:
            file_infos, metadata, _ = read_safetensors_header(file)
            self.metadata.update(metadata)
            if expected_by_file is not None:
                listed = set(expected_by_file[file])
                missing = [t for t in expected_by_file[file] if t not in file_infos]
                if missing:
                    raise InputError(f"{file}: the index says it holds {_short(missing[:3])} but the file does not")
                unlisted = [t for t in file_infos if t not in listed]
                if unlisted:
                    raise InputError(f"{file}: holds {_short(unlisted[:3])}, which the index does not list for this shard")
            for name, info in file_infos.items():
                if name in infos:
                    raise InputError(f"{source}: tensor {_short(name)} appears in both {infos[name].file} and {file}")
                infos[name] = info
        super().__init__(source, infos, path=path, config=config, strict=strict)
        self._handles: dict[Path, BinaryIO] = {}

    def _read(self, name: str, info: TensorInfo) -> torch.Tensor:
        # Plain positioned reads instead of mmap: mapped pages count towards RSS until unmapped, which
        # would make peak memory grow with model size instead of staying near one tensor.
        assert info.file is not None
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = open_regular(info.file)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        try:
            handle.seek(info.offset)
            got = handle.readinto(memoryview(buffer.numpy())) if info.nbytes else 0
        except OSError as exc:
            raise InputError(f"{info.file}: cannot read tensor {_short(name)} ({_one_line(exc.strerror or exc)})") from exc
        if got != info.nbytes:
            raise InputError(f"{info.file}: truncated while reading tensor {_short(name)} ({got} of {info.nbytes} bytes)")
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
            open_regular(file).close()  # a FIFO or device named .pt is refused before torch opens it
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


MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any real config or index (a 1T-parameter index is a few MB)


def read_json(path: Path, *, unique_keys: bool = False) -> dict:
    """A JSON object from a file; InputError naming the file when it cannot be read, parsed, or is not an object.

    Only regular files are opened (a FIFO would block) and only up to MAX_JSON_BYTES.
    """
    with open_regular(path) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise InputError(f"{path}: {size} bytes is too large for a JSON file here (limit {MAX_JSON_BYTES})")
            raw = fh.read(MAX_JSON_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{path}: cannot read JSON ({_one_line(exc.strerror or exc)})") from exc
    data = _parse_json(raw, path, "content", unique_keys=unique_keys)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


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
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot open ({_one_line(getattr(exc, 'strerror', None) or exc)})") from None
    kind = _kind_of(mode)
    if kind is not None and not stat.S_ISDIR(mode):
        raise InputError(f"{path}: is {kind}, not a model file or folder")
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
    shards = sorted(path.glob("*.safetensors"))  # each is opened with open_regular: a FIFO is refused, never read
    if shards:
        return SafetensorsStore(shards, source=source, path=path, config=config, strict=strict)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise _refuse_pickle(pickles[0])
        return PickleStore(pickles, source=source, path=path, config=config, strict=strict)
    raise InputError(f"{path}: folder holds no .safetensors files (nor a *.safetensors.index.json)")


def _open_index(index_path: Path, config: dict | None, strict: bool) -> SafetensorsStore:
    index = read_json(index_path, unique_keys=True)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: expected a non-empty 'weight_map' object mapping tensor names to shard files, found {_short(weight_map)}")
    folder = index_path.parent
    roots = _allowed_roots(folder)
    checked: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise InputError(f"{index_path}: weight_map entry {_short(name)} -> {_short(shard)}: expected a shard file name (a non-empty string)")
        if shard not in checked:
            checked[shard] = _confined_shard(index_path, name, shard, folder, roots)
        files[name] = checked[shard]
    return SafetensorsStore(files, source=str(folder), path=folder, config=config, strict=strict)


def _allowed_roots(folder: Path) -> list[Path]:
    """Where an index's shards may live once symlinks are resolved: the model folder, and for a
    huggingface_hub cache snapshot (`models--org--name/snapshots/REV`) that repository's `blobs/`, which the
    snapshot's links point into."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        roots.append(real.parent.parent / "blobs")
    return roots


def _confined_shard(index_path: Path, name: str, shard: str, folder: Path, roots: list[Path]) -> Path:
    """The shard file an index entry names, refused unless it is a regular file inside the model folder."""
    def refuse(reason: str) -> InputError:
        return InputError(f"{index_path}: weight_map entry {_short(name)} -> {_short(shard)}: {reason}")

    if "\0" in shard:
        raise refuse("file name contains a NUL byte")
    if PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive:
        raise refuse("absolute paths are refused; shards must sit in the model folder")
    if ".." in PureWindowsPath(shard).parts:  # splits on both / and \\
        raise refuse("'..' is refused; shards must sit in the model folder")
    file = folder / shard
    try:
        real = file.resolve(strict=True)
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise refuse("the shard file is missing (or is a broken link)") from None
    except (OSError, RuntimeError) as exc:  # permission, symlink loop
        raise refuse(f"cannot open ({_one_line(getattr(exc, 'strerror', None) or exc)})") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise refuse(f"resolves to {real}, outside the model folder {roots[0]}")
    kind = _kind_of(mode)
    if kind is not None:
        raise refuse(f"is {kind}, not a safetensors file")
    return file
