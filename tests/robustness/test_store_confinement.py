"""Sharded indexes stay inside their folder, without refusing the layouts real models use."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from suture.merge.errors import InputError
from suture.merge.store import open_store
from tests.robustness.store_cases import _valid_tensors


def _sharded(folder, shard_names=("a.safetensors", "b.safetensors")):
    tensors = _valid_tensors(0)
    names = list(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: tensors[n] for n in names[:2]}, folder / shard_names[0])
    save_file({n: tensors[n] for n in names[2:]}, folder / shard_names[1])
    weight_map = {names[0]: shard_names[0], names[1]: shard_names[0], names[2]: shard_names[1]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def _same(store, tensors):
    assert sorted(store.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(store.get(name), t)


def test_shards_in_a_subfolder_and_links_inside_the_folder_are_read(tmp_path):
    folder = tmp_path / "m"
    (folder / "shards").mkdir(parents=True)
    tensors = _sharded(folder / "shards")
    (folder / "shards" / "model.safetensors.index.json").unlink()
    (folder / "link.safetensors").symlink_to(folder / "shards" / "b.safetensors")
    names = list(tensors)
    weight_map = {names[0]: "shards/a.safetensors", names[1]: "shards/a.safetensors", names[2]: "link.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _same(open_store(folder), tensors)


def test_hub_cache_snapshot_links_into_blobs_are_read(tmp_path):
    """huggingface_hub's cache links snapshots/REV/FILE to ../../blobs/HASH: that is still the model's repo."""
    repo = tmp_path / "models--org--name"
    blobs = repo / "blobs"
    tensors = _sharded(blobs, ("h1", "h2"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for shard, blob in (("model-1.safetensors", "h1"), ("model-2.safetensors", "h2"), ("model.safetensors.index.json", "model.safetensors.index.json")):
        (snapshot / shard).symlink_to(os.path.relpath(blobs / blob, snapshot))
    names = list(tensors)
    (blobs / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        names[0]: "model-1.safetensors", names[1]: "model-1.safetensors", names[2]: "model-2.safetensors"}}))
    _same(open_store(snapshot), tensors)
    # ... but another repository's blobs are outside
    other = tmp_path / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    save_file({names[2]: tensors[names[2]]}, other / "x")
    (snapshot / "model-2.safetensors").unlink()
    (snapshot / "model-2.safetensors").symlink_to(other / "x")
    with pytest.raises(InputError, match="outside the model folder"):
        open_store(snapshot)


def test_fifo_given_directly_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(InputError, match="FIFO"):
        open_store(fifo)
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(InputError, match="FIFO"):
        open_store(folder)
    assert time.monotonic() - start < 5


def test_escape_names_the_index_and_entry(tmp_path):
    folder = tmp_path / "m"
    tensors = _sharded(folder)
    save_file({"x": torch.ones(1)}, tmp_path / "secret.safetensors")
    index = folder / "model.safetensors.index.json"
    name = next(iter(tensors))
    for entry, reason in (("../secret.safetensors", "'..' is refused"), (str(tmp_path / "secret.safetensors"), "absolute")):
        data = json.loads(index.read_text())
        data["weight_map"][name] = entry
        index.write_text(json.dumps(data))
        with pytest.raises(InputError) as err:
            open_store(folder)
        message = str(err.value)
        assert message.startswith(f"{index}: weight_map entry {name!r} -> {entry!r}") and reason in message
        assert "\n" not in message
