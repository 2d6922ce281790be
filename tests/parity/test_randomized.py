"""Randomised methods (dare_linear, dare_ties, della, della_linear) draw from mergekit's distributions.

Masks come from different random streams, so tensors cannot agree entry by entry. Instead, with one
fine-tune (or two for the TIES variants), the kept fraction of task-vector entries, the rescale factor on
kept entries and, for DELLA, how the keep rate rises with magnitude rank are measured on both outputs and
compared (binomial noise on ~60k entries is below 0.01).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.parity.conftest import NEEDS_MERGEKIT, Zoo, load_dir, run_mergekit, run_suture

pytest.importorskip("mergekit", reason=NEEDS_MERGEKIT)

DENSITY = 0.3


def _stats(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor], ft: dict[str, torch.Tensor]) -> dict[str, float]:
    """Kept fraction, rescale factor on kept entries, worst L1 mismatch and (DELLA) keep rates by magnitude."""
    kept = total = 0
    kept_l1 = out_l1 = 0.0
    l1_err, low, high = [], [], []
    for name, o in out.items():
        delta = (ft[name] - base[name]).double()
        got = (o - base[name]).double()
        live = delta != 0
        k = (got != 0) & live
        kept += int(k.sum())
        total += int(live.sum())
        kept_l1 += float(delta[k].abs().sum())
        out_l1 += float(got.abs().sum())
        if k.any():  # rescaling restores each tensor's L1 norm
            l1_err.append(abs(float(got.abs().sum() / delta.abs().sum()) - 1))
        rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
        ranks = rows.abs().argsort(dim=1).argsort(dim=1).reshape(delta.shape)
        half = (rows.shape[1] - 1) / 2
        low.append(k[(ranks < half) & live].double().mean().item())
        high.append(k[(ranks > half) & live].double().mean().item())
    return {"kept": kept / total, "factor": out_l1 / kept_l1, "l1_err": max(l1_err),
            "low": sum(low) / len(low), "high": sum(high) / len(high)}


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_linear_variants_keep_and_rescale_like_mergekit(method: str, zoo: Zoo, tmp_path: Path) -> None:
    b, f1 = zoo.path("llama", "base"), zoo.path("llama", "ft3")
    params = {"weight": 1.0, "density": DENSITY}
    if method.startswith("della"):
        params["epsilon"] = 0.2
    recipe = {"merge_method": method, "dtype": "float32", "base_model": b,
              "models": [{"model": f1, "parameters": params}]}
    base, ft = load_file(f"{b}/model.safetensors"), load_file(f"{f1}/model.safetensors")
    theirs = _stats(load_dir(run_mergekit(recipe, tmp_path / "mergekit", seed=7)), base, ft)
    ours = _stats(load_dir(run_suture(recipe, tmp_path / "suture", "--seed", "3")), base, ft)
    assert ours["kept"] == pytest.approx(theirs["kept"], abs=0.01)
    # rescale restores each tensor's L1 norm exactly, in both: about 1 / density on the kept entries
    assert theirs["l1_err"] < 1e-5 and ours["l1_err"] < 1e-5
    assert ours["factor"] == pytest.approx(theirs["factor"], rel=0.03)
    assert theirs["factor"] > 2
    if method.startswith("della"):
        # keep probability rises with magnitude rank: density - epsilon .. density + epsilon
        assert theirs["high"] - theirs["low"] > 0.15
        assert ours["low"] == pytest.approx(theirs["low"], abs=0.02)
        assert ours["high"] == pytest.approx(theirs["high"], abs=0.02)
    else:
        assert theirs["kept"] == pytest.approx(DENSITY, abs=0.01)
        assert ours["high"] == pytest.approx(ours["low"], abs=0.02)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_ties_variants_keep_like_mergekit(method: str, zoo: Zoo, tmp_path: Path) -> None:
    b, f1, f2 = zoo.path("qwen2", "base"), zoo.path("qwen2", "ft1"), zoo.path("qwen2", "ft3")
    models = [{"model": f, "parameters": {"weight": w, "density": DENSITY}} for f, w in ((f1, 0.5), (f2, 0.5))]
    recipe = {"merge_method": method, "dtype": "float32", "base_model": b, "models": models}
    base = load_file(f"{b}/model.safetensors")
    fracs = []
    for out in (load_dir(run_mergekit(recipe, tmp_path / "mergekit", seed=7)),
                load_dir(run_suture(recipe, tmp_path / "suture", "--seed", "3"))):
        changed = sum(int((out[n] != base[n]).sum()) for n in out)
        fracs.append(changed / sum(t.numel() for t in out.values()))
    theirs, ours = fracs
    # an entry changes when at least one model keeps it with the elected sign
    assert DENSITY < theirs < 1 - (1 - DENSITY) ** 2 + 0.01
    assert ours == pytest.approx(theirs, abs=0.01)
