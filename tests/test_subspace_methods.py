"""The data-free subspace merges (TSV-M, Iso-C, Iso-CTS, WUDI) against the properties their papers state,
and each one end to end from a recipe on the demo fine-tunes of the digits MLP."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from suture.merge.errors import ParameterError
from suture.merge.methods import MergeInputs, run_method
from suture.merge.methods.iso import isotropic
from suture.merge.methods.wudi import wudi_matrix
from suture.recipes.cli import main


def merge(name, taus, base=None, weights=None, **params):
    """Merged task vector (output - base) of method ``name`` on float64 task vectors."""
    taus = [torch.as_tensor(t, dtype=torch.float64) for t in taus]
    base = torch.randn(taus[0].shape, dtype=torch.float64) if base is None else base
    mp = [{"weight": w} for w in weights] if weights else [{} for _ in taus]
    out = run_method(name, MergeInputs("w", [base + t for t in taus], mp, params, base=base))
    return out - base


def orthonormal(n, seed):
    return torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))[0]


def low_rank(u, s, v):
    """u diag(s) v^T."""
    return (u * torch.as_tensor(s, dtype=torch.float64)) @ v.T


def rand(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=tol)


# ---------------------------------------------------------------- Iso-C / Iso-CTS


def test_iso_c_spectrum_is_isotropic_with_the_sums_mean_singular_value():
    taus = [rand(8, 6, seed=i) for i in range(3)]
    out = merge("iso_c", taus, alpha=1.0)
    s_sum = torch.linalg.svdvals(sum(taus))
    close(torch.linalg.svdvals(out), torch.full((6,), s_sum.mean().item(), dtype=torch.float64))
    # the same singular vectors as the sum: U^T out V is diagonal
    u, _, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    close(u.T @ out @ vh.T, torch.eye(6, dtype=torch.float64) * s_sum.mean())
    close(merge("iso_c", taus, alpha=1.3), 1.3 * out)


def test_iso_c_of_a_rank_deficient_sum_stays_in_its_row_and_column_spaces():
    u, v = orthonormal(8, 1), orthonormal(6, 2)
    taus = [low_rank(u[:, :1], [3.0], v[:, :1]), low_rank(u[:, 1:2], [1.0], v[:, 1:2])]  # sum has rank 2
    out = merge("iso_c", taus, alpha=1.0)
    s = torch.linalg.svdvals(out)
    close(s[:2], [2.0, 2.0])  # two equal singular values, the mean of 3 and 1, and nothing else
    assert s[2:].abs().max() < 1e-12
    col, row = u[:, :2] @ u[:, :2].T, v[:, :2] @ v[:, :2].T
    close(col @ out, out)
    close(out @ row, out)


def test_iso_c_of_one_task_is_that_task_made_isotropic():
    u, v = orthonormal(7, 3), orthonormal(5, 4)
    tau = low_rank(u[:, :5], [5.0, 4.0, 2.0, 0.5, 0.5], v)
    close(merge("iso_c", [tau], alpha=1.0), 2.4 * u[:, :5] @ v.T)
    # identical fine-tunes: the sum is T tau, so Iso-C gives alpha * T * isotropic(tau)
    close(merge("iso_c", [tau, tau, tau], alpha=0.5), 0.5 * 3 * 2.4 * u[:, :5] @ v.T)


def test_iso_cts_is_isotropic_and_equals_iso_c_for_one_full_rank_task():
    tau = rand(9, 7, seed=5)
    close(merge("iso_cts", [tau], alpha=1.0), isotropic(tau))
    taus = [rand(12, 10, seed=10 + i) for i in range(2)]
    out = merge("iso_cts", taus, alpha=1.0, common_fraction=0.6)
    s = torch.linalg.svdvals(out)
    close(s, torch.full_like(s, s.mean().item()))
    assert not torch.allclose(out, merge("iso_c", taus, alpha=1.0))  # the task-specific directions differ


def test_iso_cts_keeps_a_task_that_the_sums_top_directions_miss():
    # one task with a large update in two directions, another with a small one elsewhere: the common
    # subspace (top 2 of 4 directions of the 4x4 sum) holds only the large task, Iso-CTS adds the small one
    u, v = orthonormal(4, 6), orthonormal(4, 7)
    big = low_rank(u[:, :2], [10.0, 9.0], v[:, :2])
    small = low_rank(u[:, 2:3], [0.1], v[:, 2:3])
    out = merge("iso_cts", [big, small], alpha=1.0, common_fraction=0.5)
    assert (u[:, 2] @ out @ v[:, 2]).item() > 1.0  # the small task's direction got the common singular value


# ---------------------------------------------------------------- TSV-M


def test_tsv_m_on_mutually_orthogonal_task_subspaces_is_their_sum():
    u, v = orthonormal(8, 8), orthonormal(6, 9)
    t1 = low_rank(u[:, :3], [4.0, 2.0, 1.0], v[:, :3])
    t2 = low_rank(u[:, 3:6], [3.0, 0.5, 0.2], v[:, 3:6])
    close(merge("tsv_m", [t1, t2]), t1 + t2)
    close(merge("tsv_m", [t1, t2], alpha=0.4), 0.4 * (t1 + t2))


def test_tsv_m_decorrelated_bases_are_orthonormal_and_keep_the_singular_values():
    taus = [rand(10, 9, seed=20 + i) for i in range(3)]  # k = 9 // 3 = 3 directions per task
    out = merge("tsv_m", taus)
    kept = torch.cat([torch.linalg.svdvals(t)[:3] for t in taus])
    # U_perp diag(kept) V_perp^T has exactly the kept singular values iff U_perp and V_perp are orthonormal
    close(torch.linalg.svdvals(out), kept.sort(descending=True).values)
    # interfering tasks are changed by the decorrelation (it is not the plain truncated sum)
    svds = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    trunc = sum(low_rank(u[:, :3], s[:3], vh[:3].T) for u, s, vh in svds)
    assert (out - trunc).abs().max() > 1e-3


def test_tsv_m_of_one_task_returns_it_and_rank_fraction_truncates():
    u, v = orthonormal(6, 11), orthonormal(5, 12)
    tau = low_rank(u[:, :5], [5.0, 3.0, 2.0, 1.0, 0.5], v)
    close(merge("tsv_m", [tau], alpha=0.7), 0.7 * tau)
    close(merge("tsv_m", [tau], rank_fraction=0.4), low_rank(u[:, :2], [5.0, 3.0], v[:, :2]))


# ---------------------------------------------------------------- WUDI


def _wudi_loss(tm, taus):
    return sum(((tm - t) @ t.T).pow(2).sum() / t.pow(2).sum() for t in taus).item()


def _wudi_loss_grad(tm, taus):
    return sum(2 * (tm - t) @ t.T @ t / t.pow(2).sum() for t in taus)


def test_wudi_on_disjoint_input_subspaces_is_the_sum():
    v = orthonormal(8, 13)
    t1 = rand(5, 3, seed=1) @ v[:, :3].T
    t2 = rand(5, 4, seed=2) @ v[:, 3:7].T
    close(merge("wudi", [t1, t2]), t1 + t2)


def test_wudi_solves_the_normal_equations_and_matches_gradient_descent_from_the_sum():
    taus = [rand(6, 5, seed=30 + i) for i in range(3)]
    out = merge("wudi", taus, ridge=0.0)
    a = sum(t.T @ t / t.pow(2).sum() for t in taus)
    b = sum(t @ t.T @ t / t.pow(2).sum() for t in taus)
    close(out @ a, b, tol=1e-8)
    # a rank-deficient A (4 x 10 task vectors, rank-8 A): the paper's descent from the sum reaches our answer
    taus = [rand(4, 10, seed=40 + i) for i in range(2)]
    a = sum(t.T @ t / t.pow(2).sum() for t in taus)
    tm = sum(taus).clone()
    lr = 0.5 / torch.linalg.eigvalsh(a).max()
    for _ in range(4000):
        tm -= lr * _wudi_loss_grad(tm, taus)
    assert _wudi_loss_grad(tm, taus).abs().max() < 1e-8
    close(merge("wudi", taus, ridge=0.0), tm, tol=1e-6)
    # a ridge damps the step but it still lowers the paper's loss from the sum's, monotonically in the ridge
    losses = [_wudi_loss(merge("wudi", taus, ridge=r), taus) for r in (0.0, 0.1, 1.0, 10.0)]
    assert losses == sorted(losses) and losses[-1] < _wudi_loss(sum(taus), taus)


def test_wudi_of_identical_fine_tunes_is_base_plus_alpha_tau():
    tau = rand(6, 9, seed=50)
    close(merge("wudi", [tau, tau, tau], ridge=0.0, alpha=0.8), 0.8 * tau, tol=1e-8)
    close(merge("wudi", [tau, tau], ridge=1e-6), tau, tol=1e-5)
    assert wudi_matrix([torch.zeros(3, 4, dtype=torch.float64)] * 2).abs().max() == 0


# ---------------------------------------------------------------- all four


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "wudi"])
def test_non_matrix_tensors_get_task_arithmetic_with_the_methods_scale(name):
    base, taus = rand(7, seed=60), [rand(7, seed=61), rand(7, seed=62)]
    out = run_method(name, MergeInputs("b", [base + t for t in taus], [{"weight": 1.0}, {"weight": 0.5}],
                                       {"alpha": 0.3}, base=base))
    close(out, base + 0.3 * (taus[0] + 0.5 * taus[1]))


def test_parameter_ranges_are_enforced():
    x, base = torch.ones(3, 3), torch.zeros(3, 3)
    with pytest.raises(ParameterError, match=r"'rank_fraction' of merge method 'tsv_m' must be in \(0, 1\]"):
        run_method("tsv_m", MergeInputs("w", [x], [{}], {"rank_fraction": 0.0}, base=base))
    with pytest.raises(ParameterError, match=r"'common_fraction' .* must be in \[0, 1\]"):
        run_method("iso_cts", MergeInputs("w", [x], [{}], {"common_fraction": 1.5}, base=base))
    with pytest.raises(ParameterError, match="'ridge' .* must be >= 0"):
        run_method("wudi", MergeInputs("w", [x], [{}], {"ridge": -1.0}, base=base))


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "wudi"])
def test_runs_from_a_recipe_on_the_demo_fine_tunes(name, tmp_path, capsys):
    recipe = {
        "merge_method": name,
        "base_model": "demo:base",
        "models": [{"model": "demo:finetune-0-4"}, {"model": "demo:finetune-5-9"}],
        "parameters": {"alpha": 1.0},
        "dtype": "float32",
        "evaluate": {"data": "sklearn:digits"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["run", str(path), str(tmp_path / "out"), "-q"]) == 0
    accuracy = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]["merged"]["accuracy"]
    with capsys.disabled():
        print(f"\n{name} (alpha 1.0) on the demo digits fine-tunes: merged accuracy {accuracy:.3f}")
    assert accuracy > 0.5  # ten classes: chance is 0.1
