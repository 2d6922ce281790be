"""Malformed safetensors files and sharded indexes, each run through `suture inspect` and a small merge.

Every model here is built by a structured mutation of one valid small file (header length field, JSON
syntax, nesting, the type of every field, dtype, shape, data_offsets, `__metadata__`, truncation, appended
bytes, non-UTF-8, seeded random byte flips in the header) or of a valid two-shard index (types, escapes
through `..`, absolute paths, symlinks out of the folder, FIFOs, directories, devices, missing shards,
tensors the shards and the index disagree about). A single-file mutation counts only when the reference
reader, `safetensors.safe_open`, refuses it too, so a mutation that happens to stay valid (a flipped
letter in a metadata value) is set aside, and read back to check that Suture agrees with safetensors. A few cases are refused by
Suture's own policy although safetensors reads them (duplicate keys, dtypes torch cannot hold, no tensors);
they are marked as such. Byte flips in the data section are left out: they give a valid file.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from tests.robustness.harness import Case

SEED = 1234
RANDOM_FLIPS = 160


def _valid_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(4, 3, generator=g),
        "layers.0.bias": torch.randn(4, generator=g).to(torch.float16),
        "layers.1.weight": torch.randn(2, 4, generator=g).to(torch.bfloat16),
    }


def _pack(header: object, data: bytes, header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def reference_refuses(path: Path) -> bool:
    """Whether the safetensors library itself refuses the file (the oracle; regular files only)."""
    try:
        with safe_open(str(path), framework="pt"):
            return False
    except Exception:  # noqa: BLE001 - any refusal counts
        return True


class _Builder:
    """Writes the malformed models under `workdir` and remembers each one's id and path."""

    def __init__(self, workdir: Path) -> None:
        self.root = workdir
        self.files = workdir / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.models: list[tuple[str, Path]] = []
        self.still_valid: list[Path] = []  # random flips that safetensors accepts: kept aside, not counted
        valid = self.files / "valid.safetensors"
        save_file(_valid_tensors(0), valid, metadata={"format": "pt"})
        self.valid_bytes = valid.read_bytes()
        (n,) = struct.unpack("<Q", self.valid_bytes[:8])
        self.header_raw = self.valid_bytes[8 : 8 + n]
        self.header: dict = json.loads(self.header_raw)
        self.data = self.valid_bytes[8 + n :]
        self.partner = workdir / "partner.safetensors"
        save_file(_valid_tensors(1), self.partner)

    def header_copy(self) -> dict:
        return json.loads(self.header_raw)

    def add_file(self, case_id: str, content: bytes, *, policy: bool = False, may_be_valid: bool = False) -> None:
        """A single malformed file, checked against safetensors: a structured mutation it accepts is a bug
        in this suite; a random flip it accepts is set aside (`still_valid`)."""
        path = self.files / f"{len(self.models) + len(self.still_valid):04d}.safetensors"
        path.write_bytes(content)
        if not policy and not reference_refuses(path):
            if not may_be_valid:
                raise AssertionError(f"mutation {case_id} gives a file safetensors accepts; it is not malformed")
            self.still_valid.append(path)
            return
        self.models.append((f"file/{case_id}", path))

    def add_header(self, case_id: str, mutate: Callable[[dict], object], data: bytes | None = None) -> None:
        header = self.header_copy()
        result = mutate(header)
        self.add_file(case_id, _pack(header if result is None else result, self.data if data is None else data))

    def add_special(self, case_id: str, path: Path) -> None:
        """A path that is not a regular file (FIFO, device, directory): never handed to the oracle."""
        self.models.append((f"file/{case_id}", path))

    def add_index(self, case_id: str, make: Callable[[Path], None]) -> None:
        """A sharded folder (two valid shards + index) that `make` then breaks."""
        folder = self.root / "indexes" / f"{len(self.models):04d}"
        folder.mkdir(parents=True)
        tensors = _valid_tensors(0)
        names = list(tensors)
        save_file({n: tensors[n] for n in names[:2]}, folder / "model-00001-of-00002.safetensors")
        save_file({n: tensors[n] for n in names[2:]}, folder / "model-00002-of-00002.safetensors")
        index = {"metadata": {"total_size": 0}, "weight_map": {
            names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00001-of-00002.safetensors",
            names[2]: "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        make(folder)
        self.models.append((f"index/{case_id}", folder))


def _set_index(folder: Path, mutate: Callable[[dict], None]) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    mutate(index)
    path.write_text(json.dumps(index))


def _write_index(folder: Path, content: object) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(content))


def _set_entry(tensor: str, value: object) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        _set_index(folder, lambda index: index["weight_map"].__setitem__(tensor, value))
    return make


BAD_DTYPES = [None, 1, 1.5, True, "", "f32", "F99", "F32 ", "float32", ["F32"], {"F32": 1}, "F\u00e9", "I128"]
BAD_SHAPES = [None, 3, "4,3", {"0": 4}, [-1, 3], [4, -3], [4.0, 3], [4, 3.5], [4, "3"], [[4], 3], [None],
              [True, 3], [2**64], [2**40, 2**40, 2**40], [4, 4], [1], [0], [4, 3, 2], [1e300], [-0.0]]
BAD_OFFSETS = [None, 0, "0,48", ["0", "48"], [0], [0, 48, 48], [-1, 47], [0.0, 48.0], [0, 10**30], [True, 48],
               [None, None], {"begin": 0}, [0, -48], [10**9, 10**9 + 48]]
UNSUPPORTED_BY_TORCH = {"U16": 2, "U32": 4, "U64": 8, "C64": 8, "F8_E8M0": 1}  # valid for safetensors


def _header_cases(b: _Builder) -> None:
    names = [n for n in b.header if n != "__metadata__"]
    for name in names:
        for key, values in (("dtype", BAD_DTYPES), ("shape", BAD_SHAPES), ("data_offsets", BAD_OFFSETS)):
            for i, value in enumerate(values):
                b.add_header(f"{name}.{key}[{i}]={json.dumps(value)[:30]}",
                             lambda h, name=name, key=key, value=value: h[name].__setitem__(key, value))
            b.add_header(f"{name}.{key}.missing", lambda h, name=name, key=key: h[name].pop(key))
        for i, entry in enumerate([None, 1, "F32", [1, 2], [], True, {}]):
            b.add_header(f"{name}.entry[{i}]={json.dumps(entry)}", lambda h, name=name, entry=entry: h.__setitem__(name, entry))
        for depth in (200, 5000):
            text = b.header_raw.decode().rstrip()[:-1] + f',"{name}x":{{"dtype":"F32","shape":[0],"data_offsets":[0,0],"junk":' + "[" * depth + "]" * depth + "}}"
            b.add_file(f"{name}.junk_nested_{depth}", _pack(text.encode(), b.data))
        # offsets that overlap the previous tensor, leave a gap, or run past the end of the file
        begin, end = b.header[name]["data_offsets"]
        for label, shift in (("overlap", -2), ("gap", 2), ("past_eof", len(b.data))):
            b.add_header(f"{name}.data_offsets.{label}", lambda h, name=name, s=shift, be=begin, en=end: h[name].__setitem__("data_offsets", [be + s, en + s]))
        b.add_header(f"{name}.data_offsets.reversed", lambda h, name=name, be=begin, en=end: h[name].__setitem__("data_offsets", [en, be]))
        for tag, size in UNSUPPORTED_BY_TORCH.items():
            numel = (end - begin) // size
            header = b.header_copy()
            header[name].update(dtype=tag, shape=[numel])
            b.add_file(f"{name}.dtype_torch_lacks={tag}", _pack(header, b.data), policy=True)
    # __metadata__ of every wrong type
    for i, meta in enumerate([[1, 2], "x", 1, True, {"k": 1}, {"k": None}, {"k": {"a": "b"}}, {"k": ["a"]}, {"k": 1.5}]):
        b.add_header(f"__metadata__[{i}]={json.dumps(meta)[:30]}", lambda h, meta=meta: h.__setitem__("__metadata__", meta))
    deep_meta = b.header_raw.decode().rstrip()[:-1] + ',"__metadata__":' + "{\"k\":" * 300 + '"v"' + "}" * 300 + "}"
    b.add_file("__metadata__.nested_300", _pack(deep_meta.encode(), b.data))
    # top-level JSON of the wrong type or syntax
    for i, top in enumerate([b"[]", b"[1,2,3]", b'"text"', b"1", b"null", b"true", b"", b" ", b"{", b"}", b"{}x",
                             b'{"a":}', b"{'a': 1}", b'{"a": NaN}', b'{"a": Infinity}', b"\x00" * 16, b"\xef\xbb\xbf{}"]):
        b.add_file(f"top[{i}]={top[:12]!r}", _pack(top, b.data))
    b.add_file("top.empty_object", _pack(b"{}", b""), policy=True)
    b.add_file("top.only_metadata", _pack({"__metadata__": {"a": "b"}}, b""), policy=True)
    for depth in (100, 129, 1000, 100_000):
        b.add_file(f"top.nested_list_{depth}", _pack(b"[" * depth + b"]" * depth, b""))
        b.add_file(f"top.nested_object_{depth}", _pack(b'{"a":' * depth + b"{}" + b"}" * depth, b""))
    b.add_file("top.huge_integer", _pack(b.header_raw.rstrip()[:-1] + b',"n":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}', b.data))
    b.add_file("top.trailing_garbage", _pack(b.header_raw.rstrip() + b"garbage", b.data))
    b.add_file("top.two_objects", _pack(b.header_raw.rstrip() + b.header_raw.rstrip(), b.data))
    b.add_file("top.utf16", _pack(b.header_raw.decode().encode("utf-16"), b.data))
    b.add_file("top.utf32_no_bom", _pack(b.header_raw.decode().encode("utf-32-le"), b.data))
    b.add_file("top.lone_surrogate", _pack(b.header_raw.replace(b'"pt"', b'"\\ud800"'), b.data))
    # duplicate tensor names: last-one-wins would hide a tensor (refused by Suture's policy)
    first = next(n for n in b.header if n != "__metadata__")
    dup = b.header_raw.rstrip()[:-1] + b',"' + first.encode() + b'":' + json.dumps(b.header[first]).encode() + b"}"
    b.add_file("top.duplicate_tensor", _pack(dup, b.data), policy=True)
    # non-UTF-8 bytes in a name, a dtype, a metadata value and a key
    for i, (old, new) in enumerate([(b"layers.0.weight", b"layers.\xff.weight"), (b'"F32"', b'"F\xc332"'),
                                    (b'"pt"', b'"\xfe\xff"'), (b'"format"', b'"\xc0\xaf"'), (b'"shape"', b'"sh\x80pe"')]):
        b.add_file(f"non_utf8[{i}]", _pack(b.header_raw.replace(old, new, 1), b.data))


def _length_and_size_cases(b: _Builder) -> None:
    n = len(b.header_raw)
    for value in (0, 1, 2, 7, n - 1, n + 1, n + 7, n + len(b.data), n + len(b.data) + 1, 2**31, 100 * 1024 * 1024 + 1,
                  2**40, 2**62, 2**63, 2**64 - 1):
        b.add_file(f"header_len={value}", _pack(b.header_raw, b.data, header_len=value))
    size = len(b.valid_bytes)
    points = sorted({0, 1, 4, 7, 8, 9, 16, n // 2, n + 7, n + 8, n + 9, size - 1, size - 2, size - 8} | set(range(20, size, max(1, size // 40))))
    for cut in points:
        if cut < size:
            b.add_file(f"truncated_at={cut}", b.valid_bytes[:cut])
    for extra in (1, 8, 1000):
        b.add_file(f"appended={extra}", b.valid_bytes + bytes(extra))


def _random_flip_cases(b: _Builder) -> None:
    """Seeded byte flips inside the length field and the header (the data section would stay valid)."""
    rng = random.Random(SEED)
    header_end = 8 + len(b.header_raw)
    for i in range(RANDOM_FLIPS):
        content = bytearray(b.valid_bytes)
        for _ in range(rng.choice((1, 1, 2, 4))):
            content[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
        b.add_file(f"flip[{i}]", bytes(content), may_be_valid=True)


def _special_file_cases(b: _Builder) -> None:
    fifo = b.files / "fifo.safetensors"
    os.mkfifo(fifo)
    b.add_special("fifo", fifo)
    b.add_special("dir_named_safetensors", _mkdir(b.files / "dir.safetensors"))
    for device in ("/dev/zero", "/dev/null", "/dev/urandom"):
        if os.path.exists(device):
            link = b.files / f"dev_{Path(device).name}.safetensors"
            link.symlink_to(device)
            b.add_special(f"link_to_{device}", link)
    link = b.files / "link_to_fifo.safetensors"
    link.symlink_to(fifo)
    b.add_special("link_to_fifo", link)
    folder = _mkdir(b.root / "folder_with_fifo")
    os.mkfifo(folder / "model.safetensors")
    b.add_special("folder_holding_fifo", folder)
    folder = _mkdir(b.root / "folder_bad_config")
    save_file(_valid_tensors(0), folder / "model.safetensors")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    b.add_special("config_nested_100000", folder)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _index_cases(b: _Builder) -> None:
    names = [n for n in b.header if n != "__metadata__"]
    t0 = sorted(names)[0]  # any listed tensor
    outside = b.root / "outside.safetensors"
    save_file({t0: torch.zeros(1)}, outside)
    for i, top in enumerate([[], [1], "text", 1, None, True]):
        b.add_index(f"index_top[{i}]={json.dumps(top)}", lambda f, top=top: _write_index(f, top))
    for i, wm in enumerate([None, [], ["a"], "x", 1, {}, True]):
        b.add_index(f"weight_map[{i}]={json.dumps(wm)}", lambda f, wm=wm: _set_index(f, lambda ix: ix.__setitem__("weight_map", wm)))
    b.add_index("weight_map.missing", lambda f: _set_index(f, lambda ix: ix.pop("weight_map")))
    for i, value in enumerate([None, 1, 1.5, True, [], ["model-00001-of-00002.safetensors"], {"f": 1}, "", "\u0000x",
                               "nope.safetensors", "model-00003-of-00002.safetensors", str(outside), "/etc/passwd", "/dev/zero",
                               "../outside.safetensors", "../" * 20 + "etc/passwd", "sub/../model-00001-of-00002.safetensors",
                               "./../outside.safetensors", "..\\outside.safetensors", "C:\\model.safetensors",
                               "\\\\server\\share\\model.safetensors"]):
        b.add_index(f"entry[{i}]={json.dumps(value)[:40]}", _set_entry(t0, value))
    # links and special files named by an otherwise valid entry
    def link_to(target: Path | str) -> Callable[[Path], None]:
        def make(f: Path) -> None:
            (f / "link.safetensors").symlink_to(target)
            _set_entry(t0, "link.safetensors")(f)
        return make
    b.add_index("entry.link_outside", link_to(outside))
    b.add_index("entry.link_dev_zero", link_to("/dev/zero"))
    b.add_index("entry.link_to_root_dir", link_to("/"))
    b.add_index("entry.link_broken", link_to("does-not-exist.safetensors"))
    b.add_index("entry.link_loop", link_to("link.safetensors"))
    b.add_index("entry.link_dir_outside", lambda f: ((f / "up").symlink_to(b.root), _set_entry(t0, "up/outside.safetensors")(f)))
    b.add_index("entry.fifo", lambda f: (os.mkfifo(f / "pipe.safetensors"), _set_entry(t0, "pipe.safetensors")(f)))
    b.add_index("entry.directory", lambda f: ((f / "d.safetensors").mkdir(), _set_entry(t0, "d.safetensors")(f)))
    b.add_index("entry.shard_replaced_by_fifo", lambda f: ((f / "model-00002-of-00002.safetensors").unlink(),
                                                           os.mkfifo(f / "model-00002-of-00002.safetensors")))
    b.add_index("entry.shard_missing", lambda f: (f / "model-00002-of-00002.safetensors").unlink())
    b.add_index("index_file_is_fifo", lambda f: ((f / "model.safetensors.index.json").unlink(), os.mkfifo(f / "model.safetensors.index.json")))
    b.add_index("index_file_is_dir", lambda f: ((f / "model.safetensors.index.json").unlink(), (f / "model.safetensors.index.json").mkdir()))
    # index and shards disagree
    b.add_index("index_lists_absent_tensor", lambda f: _set_index(f, lambda ix: ix["weight_map"].__setitem__("ghost", "model-00001-of-00002.safetensors")))
    b.add_index("shard_holds_unlisted_tensor", lambda f: _set_index(f, lambda ix: ix["weight_map"].pop(t0)))
    other = next(n for n in names if n != t0)
    b.add_index("tensor_in_wrong_shard", lambda f: _set_index(f, lambda ix: ix["weight_map"].__setitem__(other, "model-00002-of-00002.safetensors")))
    b.add_index("tensor_in_both_shards", lambda f: save_file({n: t for n, t in _valid_tensors(0).items()}, f / "model-00002-of-00002.safetensors"))

    def duplicate_key(f: Path) -> None:
        path = f / "model.safetensors.index.json"
        text = path.read_text()
        path.write_text(text[:-2] + f', "{t0}": "model-00002-of-00002.safetensors"}}}}')
    b.add_index("weight_map.duplicate_key", duplicate_key)
    # index JSON syntax, encoding, nesting, size
    for i, raw in enumerate([b"", b"{", b'{"weight_map": {"a": "b",}}', b"\xff\xfe{}", b'{"weight_map": {"\xff": "x"}}',
                             b'{"weight_map": NaN}', b"[" * 100_000 + b"]" * 100_000,
                             b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b', "weight_map": {}}',
                             b'{"weight_map": {"a": "' + b"x" * 300 + b'"}, "n": ' + b"9" * 10_000 + b"}"]):
        b.add_index(f"index_raw[{i}]={raw[:16]!r}", lambda f, raw=raw: (f / "model.safetensors.index.json").write_bytes(raw))

    def huge(f: Path) -> None:
        with (f / "model.safetensors.index.json").open("wb") as fh:
            fh.truncate(65 * 1024 * 1024)  # sparse: refused by its size before any byte is read
    b.add_index("index_huge_65MB", huge)
    # a shard that is itself malformed, reached through a valid index
    for label, cut in (("truncated", -3), ("header_cut", 20)):
        def broken_shard(f: Path, cut: int = cut) -> None:
            path = f / "model-00002-of-00002.safetensors"
            path.write_bytes(path.read_bytes()[:cut])
        b.add_index(f"shard_{label}", broken_shard)


def malformed_models(workdir: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(case id, path) of every malformed model under `workdir`, and the random flips that stayed valid."""
    b = _Builder(workdir)
    _header_cases(b)
    _length_and_size_cases(b)
    _random_flip_cases(b)
    _special_file_cases(b)
    _index_cases(b)
    return b.models, b.still_valid


def store_cases(workdir: Path) -> list[Case]:
    """Two CLI cases per malformed model: `suture inspect MODEL` and a linear merge of it with a valid model."""
    workdir = Path(workdir)
    models, _ = malformed_models(workdir)
    partner = workdir / "partner.safetensors"
    recipes = _mkdir(workdir / "recipes")
    cases: list[Case] = []
    for i, (case_id, path) in enumerate(models):
        cases.append(Case(f"inspect:{case_id}", ["inspect", str(path)]))
        recipe = recipes / f"{i:04d}.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(path), "parameters": {"weight": 0.5}}, {"model": str(partner), "parameters": {"weight": 0.5}}]}))
        out = workdir / "out" / f"{i:04d}"
        cases.append(Case(f"merge:{case_id}", ["run", str(recipe), str(out), "--quiet"], out=out))
    return cases
