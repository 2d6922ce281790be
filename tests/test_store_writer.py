"""Tensor store and streaming writer: round trips, sharding, dtypes, atomicity and bad-input errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from suture.merge.errors import InputError
from suture.merge.store import DictStore, open_store, read_safetensors_header
from suture.merge.writer import ShardedWriter, TensorEntry, atomic_output_dir, parse_size, save_tensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g),
        "b.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def test_single_file_round_trip_lazy(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    store = open_store(tmp_path / "m.safetensors")
    assert set(store.names()) == set(tensors)
    assert store.shape("b.weight") == (8, 4) and store.dtype("b.weight") == torch.bfloat16
    for name, t in tensors.items():
        assert torch.equal(store.get(name), t)


def test_folder_and_config(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    store = open_store(tmp_path)
    assert store.config == {"model_type": "llama"}
    assert len(store) == 4


def test_sharded_writer_round_trip_with_index(tmp_path):
    tensors = _tensors()
    out = save_tensors(tensors, tmp_path / "out", max_shard_size=64)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    store = open_store(out)
    for name, t in tensors.items():
        assert torch.equal(store.get(name), t)
    # every shard is a valid safetensors file for the reference reader too
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as fh:
            for key in fh.keys():
                assert torch.equal(fh.get_tensor(key), tensors[key])


def test_single_shard_is_model_safetensors(tmp_path):
    out = save_tensors(_tensors(), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_writer_checks_order_and_shape(tmp_path):
    entries = [TensorEntry("x", (2,), torch.float32), TensorEntry("y", (3,), torch.float32)]
    writer = ShardedWriter(tmp_path, entries)
    with pytest.raises(InputError, match="expected tensor 'x' next"):
        writer.write("y", torch.zeros(3))
    with pytest.raises(InputError, match="announced"):
        writer.write("x", torch.zeros(5))
    writer.write("x", torch.zeros(2))
    with pytest.raises(InputError, match="before every tensor"):
        writer.finish()
    writer.abort()


def test_atomic_dir_leaves_nothing_on_exception(tmp_path):
    out = tmp_path / "result"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "partial.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".result.lock"]  # only the (empty) lock file stays


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    out = tmp_path / "result"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"):
        with atomic_output_dir(out):
            pass
    assert (out / "keep.txt").read_text() == "old"
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".result.lock", "result"]


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size(123) == 123
    with pytest.raises(InputError):
        parse_size("lots")


def test_missing_path_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_store(tmp_path / "nope.safetensors")


def test_truncated_file_error(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(InputError, match="truncated"):
        open_store(path)


def test_corrupt_header_error(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(InputError, match="not valid JSON"):
        open_store(path)


def test_header_lying_about_sizes(tmp_path):
    path = tmp_path / "m.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 300]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(300))
    with pytest.raises(InputError, match="header lies about tensor 'w'"):
        read_safetensors_header(path)


def test_pickle_refused_unless_opted_in(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(InputError, match="pickle"):
        open_store(path)
    with pytest.raises(InputError, match="pickle"):
        open_store(tmp_path)
    store = open_store(path, allow_pickle=True)
    assert torch.equal(store.get("w"), torch.ones(2))


def test_pickle_with_code_is_refused_even_when_opted_in(tmp_path):
    path = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"w": Payload()}, path)
    with pytest.raises(InputError, match="weights-only"):
        open_store(path, allow_pickle=True)


def test_non_finite_warns_or_raises(caplog):
    store = DictStore({"w": torch.tensor([1.0, float("nan")])})
    with caplog.at_level("WARNING"):
        store.get("w")
    assert "non-finite" in caplog.text
    strict = DictStore({"w": torch.tensor([1.0, float("inf")])}, strict=True)
    with pytest.raises(InputError, match="'w' has 1 non-finite"):
        strict.get("w")


def test_unknown_tensor_name(tmp_path):
    store = DictStore({"w": torch.ones(1)}, source="modelA")
    with pytest.raises(InputError, match="modelA: no tensor named 'v'"):
        store.get("v")
