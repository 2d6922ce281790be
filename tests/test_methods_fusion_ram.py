"""The maths of arcee_fusion, ram and ramplus_tl on hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch

from suture.merge.methods import MergeInputs, run_method
from suture.merge.methods.arcee_fusion import fusion_importance, fusion_mask, quartiles
from suture.merge.methods.ram import overlap, unique_amplification


def _run(name: str, tensors: list[torch.Tensor], base: torch.Tensor, **params) -> torch.Tensor:
    return run_method(name, MergeInputs("w", tensors, [{} for _ in tensors], params, base=base))


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones() -> None:
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 4.0, 1e-6])
    b = torch.tensor([3.0, 0.0, 0.0, -2.0, 0.0])
    out = _run("ram", [a, b], base, epsilon=1e-5)
    # entry 0 shared -> mean; 1 only a -> whole; 2 nobody; 3 shared -> mean; 4 below epsilon -> dropped
    assert out.tolist() == pytest.approx([2.0, 2.0, 0.0, 1.0, 0.0])
    # unlike a plain average, a change only one model makes is not halved
    assert out[1] == a[1]


def test_ramplus_amplifies_unique_changes_by_the_overlap_ratio() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 2.0, 0.0])  # shared: 2 entries, unique: 1 -> rho 2, capped at alpha
    b = torch.tensor([1.0, 3.0, 0.0, 5.0])  # shared: 2, unique: 1
    o = overlap([a, b], base, 1e-5)
    lam = unique_amplification(o, r=0.5, alpha=0.4, epsilon=1e-5)
    assert lam.tolist() == pytest.approx([1 + 0.5 * 0.4, 1 + 0.5 * 0.4])
    out = _run("ramplus_tl", [a, b], base, r=0.5, alpha=0.4, epsilon=1e-5)
    assert out.tolist() == pytest.approx([1.0, 2.0, 2.0 * 1.2, 5.0 * 1.2])
    # alpha = 0 switches the amplification off: RAM
    assert torch.equal(_run("ramplus_tl", [a, b], base, r=0.5, alpha=0.0, epsilon=1e-5), _run("ram", [a, b], base))


def test_ramplus_without_unique_entries_uses_epsilon_floor() -> None:
    base = torch.zeros(3)
    a, b = torch.ones(3), 2 * torch.ones(3)  # everything shared: unique count 0 -> ratio huge -> alpha cap
    out = _run("ramplus_tl", [a, b], base, r=0.1, alpha=0.2, epsilon=1e-5)
    assert out.tolist() == pytest.approx([1.5, 1.5, 1.5])


def test_quartiles_are_sorted_values_at_floor_positions() -> None:
    x = torch.tensor([9.0, 1.0, 5.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.0])  # sorted 0..9, n - 1 = 9
    q1, med, q3 = quartiles(x).tolist()
    assert (q1, med, q3) == (2.0, 4.0, 6.0)  # floor(2.25), floor(4.5), floor(6.75)


def test_fusion_importance_is_diff_times_row_kl() -> None:
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    other = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    imp = fusion_importance(other, base)
    p, q = torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5])
    kl = float((p * torch.log(p / q)).sum())
    assert imp[0].tolist() == pytest.approx([0.0, math.log(3.0) * kl], rel=1e-4)
    assert imp[1].tolist() == [0.0, 0.0]  # an unchanged row has no importance


def test_arcee_fusion_takes_only_outlier_changes() -> None:
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    other = base.clone()
    other[3, 5] += 4.0  # one large change in one row: an importance outlier
    other += 1e-3 * torch.randn(8, 16)  # small noise everywhere
    out = _run("arcee_fusion", [other], base)
    assert out[3, 5] == pytest.approx(float(other[3, 5]))
    mask = fusion_mask(fusion_importance(other, base))
    # the KL factor is per row: only the row with the large change passes the median + 1.5 IQR fence
    assert mask[3, 5] == 1 and int(mask.sum()) == int(mask[3].sum()) > 0
    kept = mask.bool()
    assert torch.equal(out[~kept], base[~kept])
    assert torch.allclose(out[kept], other[kept], atol=1e-6)


def test_new_methods_need_a_base_and_arcee_fusion_exactly_one_other_model() -> None:
    from suture.merge.errors import InputError

    x = torch.ones(3)
    with pytest.raises(InputError):
        run_method("ram", MergeInputs("w", [x, x], [{}, {}], {}))
    with pytest.raises(InputError):
        run_method("arcee_fusion", MergeInputs("w", [x, x], [{}, {}], {}, base=x))
