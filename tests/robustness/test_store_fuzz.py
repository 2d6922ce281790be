"""Malformed safetensors files and indexes: every one is refused with one clean line, by `inspect` and by a merge.

The cases come from `store_cases` (structured mutations of a valid file and a valid sharded index; see its
docstring). Against the reader before it let safetensors judge headers, this suite counted 97 tracebacks,
8 hangs (FIFOs) and 46 silent acceptances; the floor is zero of each.
"""

from __future__ import annotations

import logging
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from suture.merge.store import open_store
from tests.robustness.harness import Case, run_cli_case, tally
from tests.robustness.store_cases import _valid_tensors, malformed_models, store_cases

MIN_MODELS = 300


def test_every_malformed_model_is_refused_cleanly(tmp_path):
    cases = store_cases(tmp_path)
    outcomes = [run_cli_case(case, timeout=10) for case in cases]
    counts = tally(outcomes)
    print("store fuzz:", counts)
    bad = [o.describe() for o in outcomes if not o.clean]
    assert not bad, f"{len(bad)} of {len(outcomes)} cases not clean:\n" + "\n".join(bad[:20])
    assert counts["cases"] >= 2 * MIN_MODELS
    assert counts["clean_errors"] == counts["cases"]
    assert counts["tracebacks"] == counts["hangs"] == counts["silent_wrong"] == counts["outputs_left"] == 0
    for outcome in outcomes:  # the one line names the file or folder at fault
        assert str(tmp_path) in outcome.error_lines[0], outcome.describe()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_suite_covers_files_and_indexes(tmp_path):
    models, _ = malformed_models(tmp_path)
    kinds = [case_id.split("/")[0] for case_id, _ in models]
    assert len(models) >= MIN_MODELS
    assert kinds.count("index") >= 50 and kinds.count("file") >= 250


def test_flips_that_stay_valid_read_like_safetensors(tmp_path):
    """A random header flip safetensors accepts must be accepted by Suture too, with the same tensors."""
    _, still_valid = malformed_models(tmp_path)
    assert still_valid, "expected some seeded flips to leave a valid file (e.g. in the metadata)"
    for path in still_valid:
        store = open_store(path)
        with safe_open(str(path), framework="pt") as ref:
            assert sorted(store.names()) == sorted(ref.keys())
            for name in ref.keys():
                assert torch.equal(store.get(name), ref.get_tensor(name))


def test_data_flips_are_valid_and_read_exactly(tmp_path):
    """Flips inside the data section give a valid file: Suture reads the changed values, as safetensors does."""
    path = tmp_path / "m.safetensors"
    save_file(_valid_tensors(0), path)
    content = bytearray(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", content[:8])[0]
    rng = random.Random(7)
    for i in range(20):
        flipped = bytearray(content)
        flipped[rng.randrange(data_start, len(content))] ^= 1 << rng.randrange(8)
        target = tmp_path / f"flip{i}.safetensors"
        target.write_bytes(flipped)
        store = open_store(target)
        with safe_open(str(target), framework="pt") as ref:
            changed = 0
            for name in ref.keys():
                expected = ref.get_tensor(name)
                got = store.get(name)
                assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), name
                changed += not torch.equal(got.view(torch.uint8), _valid_tensors(0)[name].view(torch.uint8))
            assert changed == 1


def test_nan_in_data_warns_and_strict_merge_refuses(tmp_path, caplog):
    bad = tmp_path / "nan.safetensors"
    tensors = _valid_tensors(0)
    tensors["layers.0.weight"][1, 2] = float("nan")
    save_file(tensors, bad)
    partner = tmp_path / "partner.safetensors"
    save_file(_valid_tensors(1), partner)
    with caplog.at_level(logging.WARNING):
        open_store(bad).get("layers.0.weight")
    assert "'layers.0.weight' has 1 non-finite" in caplog.text
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {bad}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {partner}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    strict = run_cli_case(Case("strict", ["run", str(recipe), str(out), "--quiet", "--strict"], out=out))
    assert strict.clean, strict.describe()
    assert "non-finite" in strict.error_lines[0] and "layers.0.weight" in strict.error_lines[0]


@pytest.mark.parametrize("header_len", [2**62, 2**64 - 1])
def test_huge_declared_header_is_refused_without_allocating(tmp_path, header_len):
    import tracemalloc

    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", header_len) + b"{}")
    tracemalloc.start()
    try:
        outcome = run_cli_case(Case("huge", ["inspect", str(path)]), timeout=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.clean and "header length" in outcome.error_lines[0]
    assert peak < 50 * 1024 * 1024
