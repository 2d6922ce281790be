"""Merge methods against hand-computed expectations (values derived from the formulas in the tests)."""

from __future__ import annotations

import math

import pytest
import torch

from suture.merge.errors import InputError, ParameterError
from suture.merge.methods import MergeInputs, get_method, list_methods, run_method
from suture.merge.methods.sparsify import magnitude, magnitude_outliers
from suture.merge.methods.task_arithmetic import sign_consensus_mask

T = torch.tensor
ALL_METHODS = {
    "tsv_m", "iso_c", "iso_cts", "wudi", "regmean", "regmean_plusplus", "fisher",
    "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
    "nearswap", "passthrough", "arcee_fusion", "ram", "ramplus_tl",
} | {"adamerging", "atlas"}  # task-arithmetic weights learned from data (tests/test_coefficients*.py)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run(name, tensors, model_params=None, base=None, generator=None, **params):
    """Run a method on float64 inputs (so comparisons can be tight)."""
    tensors = [torch.as_tensor(t, dtype=torch.float64) for t in tensors]
    if model_params is None:
        model_params = [{} for _ in tensors]
    base_t = torch.as_tensor(base, dtype=torch.float64) if base is not None else None
    inputs = MergeInputs("w", tensors, model_params, params, base=base_t, generator=generator)
    return run_method(name, inputs)


def close(actual, expected, tol=1e-9):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), f"{actual} != {expected}"


# ---------------------------------------------------------------- registry


def test_registry_lists_every_method_with_docs():
    assert set(list_methods()) == ALL_METHODS
    for name in ALL_METHODS:
        m = get_method(name)
        assert m.name == name and "http" in m.paper and m.summary
        assert m.fn.__doc__


def test_unknown_method_lists_known_names():
    with pytest.raises(ParameterError) as err:
        get_method("tis")
    assert "tis" in str(err.value) and "ties" in str(err.value) and "slerp" in str(err.value)


@pytest.mark.parametrize(
    "name,normalize,rescale,randomized",
    [
        ("task_arithmetic", False, False, False),
        ("ties", True, False, False),
        ("dare_ties", False, True, True),
        ("dare_linear", False, True, True),
        ("breadcrumbs", False, False, False),
        ("breadcrumbs_ties", False, False, False),
        ("della", True, True, True),
        ("della_linear", False, True, True),
    ],
)
def test_task_arithmetic_family_defaults(name, normalize, rescale, randomized):
    m = get_method(name)
    assert m.global_param("normalize").default is normalize
    assert m.global_param("rescale").default is rescale
    assert m.global_param("lambda").default == 1.0
    assert m.global_param("int8_mask").default is False
    assert m.model_param("weight").required and m.model_param("density").default == 1.0
    assert m.randomized is randomized and m.uses_base and m.requires_base
    assert (m.model_param("gamma") is not None) == name.startswith("breadcrumbs")
    if name.startswith("breadcrumbs"):
        assert m.model_param("gamma").default == 0.01
    assert (m.model_param("epsilon") is not None) == name.startswith("della")
    if name.startswith("della"):
        assert m.model_param("epsilon").default == 0.15


def test_other_defaults():
    assert get_method("linear").global_param("normalize").default is True
    assert get_method("slerp").global_param("t").required
    assert get_method("nearswap").global_param("t").required
    assert get_method("nuslerp").global_param("nuslerp_flatten").default is True
    assert get_method("nuslerp").global_param("nuslerp_row_wise").default is False
    assert get_method("multislerp").global_param("normalize_weights").default is True
    assert get_method("karcher").global_param("max_iter").default == 10
    assert get_method("model_stock").global_param("filter_wise").default is False
    assert get_method("sce").global_param("select_topk").default == 1.0
    assert get_method("passthrough").model_param("scale").default is None
    assert not get_method("linear").uses_base and not get_method("karcher").uses_base
    assert get_method("multislerp").uses_base and not get_method("multislerp").requires_base


def test_missing_required_parameter():
    with pytest.raises(ParameterError, match="'weight'"):
        run("linear", [[1.0], [2.0]], [{"weight": 1.0}, {}])
    with pytest.raises(ParameterError, match="'t'"):
        run("slerp", [[1.0, 0.0]], base=[0.0, 1.0])


def test_missing_base_and_misplaced_base():
    with pytest.raises(InputError, match="base"):
        run("ties", [[1.0], [2.0]], [{"weight": 1}, {"weight": 1}])
    with pytest.raises(InputError, match="base"):
        run("linear", [[1.0]], [{"weight": 1}], base=[0.0])


def test_shape_mismatch_names_tensor_and_shapes():
    inputs = MergeInputs("model.layers.0.mlp.up_proj.weight", [torch.zeros(2, 3), torch.zeros(3, 2)],
                         [{"weight": 1}, {"weight": 1}], {})
    with pytest.raises(InputError) as err:
        run_method("linear", inputs)
    msg = str(err.value)
    assert "up_proj" in msg and "(3, 2)" in msg and "(2, 3)" in msg


def test_bad_parameter_types_and_model_counts():
    with pytest.raises(ParameterError, match="normalize"):
        run("linear", [[1.0]], [{"weight": 1}], normalize="yes")
    with pytest.raises(ParameterError, match="number"):
        run("linear", [[1.0]], [{"weight": "one"}])
    with pytest.raises(InputError, match="exactly one"):
        run("slerp", [[1.0], [2.0]], base=[0.0], t=0.5)
    with pytest.raises(InputError, match="at least two"):
        run("model_stock", [[1.0]], base=[0.0])


def test_no_other_model_returns_base():
    out = run("ties", [], [], base=[1.0, 2.0])
    close(out, [1.0, 2.0])


# ---------------------------------------------------------------- linear / passthrough


def test_linear_weighted_average_and_unnormalized():
    a, b = [1.0, 2.0, -4.0], [3.0, 0.0, 8.0]
    out = run("linear", [a, b], [{"weight": 1.0}, {"weight": 3.0}])
    close(out, [(1 + 9) / 4, (2 + 0) / 4, (-4 + 24) / 4])
    out = run("linear", [a, b], [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    close(out, [10.0, 2.0, 20.0])
    with pytest.raises(ParameterError, match="sum to 0"):
        run("linear", [a, b], [{"weight": 1.0}, {"weight": -1.0}])


def test_linear_keeps_input_dtype():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    out = run_method("linear", MergeInputs("w", [a, b], [{"weight": 1}, {"weight": 1}], {}))
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [2.0, 3.0]


def test_passthrough():
    close(run("passthrough", [[1.0, -2.0]]), [1.0, -2.0])
    close(run("passthrough", [[1.0, -2.0]], [{"scale": 0.5}]), [0.5, -1.0])
    with pytest.raises(InputError, match="exactly one"):
        run("passthrough", [[1.0], [2.0]])


# ---------------------------------------------------------------- spherical


def test_slerp_endpoints():
    base, other = [2.0, 0.5, -1.0], [0.3, 1.0, 4.0]
    close(run("slerp", [other], base=base, t=0.0), base, 1e-12)
    close(run("slerp", [other], base=base, t=1.0), other, 1e-12)


def test_slerp_orthogonal_vectors():
    # angle pi/2, sin = 1: s0 = sin((1 - t) pi/2), s1 = sin(t pi/2)
    out = run("slerp", [[0.0, 1.0]], base=[2.0, 0.0], t=0.5)
    close(out, [2 * math.sqrt(0.5), math.sqrt(0.5)])
    out = run("slerp", [[0.0, 1.0]], base=[2.0, 0.0], t=0.3)
    close(out, [2 * math.sin(0.7 * math.pi / 2), math.sin(0.3 * math.pi / 2)])


def test_slerp_colinear_falls_back_to_lerp():
    close(run("slerp", [[3.0, 6.0]], base=[1.0, 2.0], t=0.25), [1.5, 3.0])
    close(run("slerp", [[-2.0, -4.0]], base=[1.0, 2.0], t=0.25), [0.25, 0.5])
    # cos = 1/sqrt(1.0001) > 0.9995: still treated as colinear
    close(run("slerp", [[1.0, 0.01]], base=[1.0, 0.0], t=0.5), [1.0, 0.005])
    # cos = 1/sqrt(1.0016) < 0.9995: true slerp, which differs from lerp
    theta = math.acos(1 / math.sqrt(1.0016))
    s = math.sin(theta / 2) / math.sin(theta)
    out = run("slerp", [[1.0, 0.04]], base=[1.0, 0.0], t=0.5)
    close(out, [2 * s, 0.04 * s])
    assert abs(out[0].item() - 1.0) > 1e-5


def test_nuslerp_flattened_weights():
    # t = 3 / (1 + 3) = 0.75 on orthogonal vectors
    out = run("nuslerp", [[2.0, 0.0], [0.0, 1.0]], [{"weight": 1.0}, {"weight": 3.0}])
    close(out, [2 * math.sin(math.pi / 8), math.sin(3 * math.pi / 8)], 1e-7)
    # weights cancelling out -> t = 0.5
    out = run("nuslerp", [[2.0, 0.0], [0.0, 1.0]], [{"weight": 1.0}, {"weight": -1.0}])
    close(out, [2 * math.sqrt(0.5), math.sqrt(0.5)], 1e-7)


def test_nuslerp_rows_columns_and_whole():
    a = [[1.0, 0.0], [1.0, 0.0]]
    b = [[0.0, 1.0], [2.0, 0.0]]
    mp = [{"weight": 1.0}, {"weight": 1.0}]
    # per row: row 0 orthogonal, row 1 colinear -> lerp
    out = run("nuslerp", [a, b], mp, nuslerp_flatten=False)
    r = math.sqrt(0.5)
    close(out, [[r, r], [1.5, 0.0]], 1e-7)
    # whole tensor: cos = 2 / sqrt(2 * 5)
    theta = math.acos(2 / math.sqrt(10))
    s = math.sin(theta / 2) / math.sin(theta)
    out = run("nuslerp", [a, b], mp)
    close(out, [[s, s], [3 * s, 0.0]], 1e-7)
    # "row_wise" interpolates the vectors along axis 0 (columns here): col0 (1,1)->(0,2) at pi/4,
    # col1 (0,0)->(1,0) has no direction so cos = 0
    out = run("nuslerp", [a, b], mp, nuslerp_flatten=False, nuslerp_row_wise=True)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(out, [[c, r], [3 * c, 0.0]], 1e-7)


def test_nuslerp_on_task_vectors_and_single_model():
    base = [1.0, 1.0]
    out = run("nuslerp", [[2.0, 1.0], [1.0, 2.0]], [{"weight": 1.0}, {"weight": 1.0}], base=base)
    r = math.sqrt(0.5)
    close(out, [1 + r, 1 + r], 1e-7)
    close(run("nuslerp", [[4.0, 5.0]], [{"weight": 1.0}]), [4.0, 5.0])


def test_multislerp_zero_task_vectors_keep_the_base():
    base = [[1.0, -2.0], [0.5, 3.0]]
    # two models equal to the base: mergekit 0.1.5's linear fallback returns the base; so does Suture
    close(run("multislerp", [base, base], [{"weight": 1.0}, {"weight": 2.0}], base=base), base)
    # four (mergekit raises its "antipodal vectors" ValueError from three on): the base, the merge every model agrees on
    close(run("multislerp", [base] * 4, [{"weight": 1.0}] * 4, base=base), base)
    # one zero task vector among others adds nothing to the direction but its norm 0 to the weighted norm (as mergekit)
    out = run("multislerp", [[2.0, 0.0], [0.0, 0.0]], [{"weight": 1.0}, {"weight": 1.0}], base=[0.0, 0.0])
    close(out, [1.0, 0.0], 1e-6)
    # directions that really cancel out still fail with the one-line error (mergekit raises too)
    with pytest.raises(InputError, match="cancel out"):
        run("multislerp", [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], [{"weight": 1.0}] * 3)


def test_multislerp():
    # barycentre of directions (3/4 e1 + 1/4 e2 normalized) times the weighted norm 3/4*2 + 1/4*1
    out = run("multislerp", [[2.0, 0.0], [0.0, 1.0]], [{"weight": 3.0}, {"weight": 1.0}])
    close(out, [1.75 * 3 / math.sqrt(10), 1.75 * 1 / math.sqrt(10)], 1e-6)
    out = run("multislerp", [[3.0, 1.0, 1.0], [1.0, 2.0, 1.0]], [{"weight": 1.0}, {"weight": 1.0}],
              base=[1.0, 1.0, 1.0])
    r = math.sqrt(0.5)
    close(out, [1 + 1.5 * r, 1 + 1.5 * r, 1.0], 1e-6)
    # unnormalized weights scale the result
    out = run("multislerp", [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1.0}, {"weight": 1.0}],
              normalize_weights=False)
    close(out, [2 * r, 2 * r], 1e-6)


def test_multislerp_antipodal():
    out = run("multislerp", [[1.0, 2.0], [-1.0, -2.0]], [{"weight": 1.0}, {"weight": 1.0}])
    close(out, [0.0, 0.0])
    with pytest.raises(InputError, match="cancel"):
        run("multislerp", [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]],
            [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}])


def test_karcher_mean():
    out = run("karcher", [[2.0, 0.0], [0.0, 1.0]])
    close(out, [1.5 * math.sqrt(0.5), 1.5 * math.sqrt(0.5)], 1e-6)
    # directions at 0, 0 and 90 degrees: the intrinsic mean sits at 30 degrees (the Euclidean one at 26.6)
    out = run("karcher", [[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    close(out, [2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)], 1e-6)
    close(run("karcher", [[0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0])
    # a zero tensor adds no direction but still counts in the mean norm
    out = run("karcher", [[0.0, 0.0], [0.0, 3.0]])
    close(out, [0.0, 1.5], 1e-6)


# ---------------------------------------------------------------- task arithmetic family

BASE = [0.5, -0.5, 1.0, 2.0]
TV = [[1.0, -2.0, 0.5, 0.1], [2.0, 1.0, -0.5, 0.0], [-0.5, 1.5, -1.0, 0.2]]


def models(tvs=TV, base=BASE):
    return [[b + d for b, d in zip(base, tv)] for tv in tvs]


def test_task_arithmetic():
    mp = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]
    expected_delta = [1 + 1 - 1, -2 + 0.5 + 3, 0.5 - 0.25 - 2, 0.1 + 0 + 0.4]
    out = run("task_arithmetic", models(), mp, base=BASE)
    close(out, [b + d for b, d in zip(BASE, expected_delta)], 1e-12)
    out = run("task_arithmetic", models(), mp, base=BASE, normalize=True, **{"lambda": 2.0})
    close(out, [b + 2 * d / 3.5 for b, d in zip(BASE, expected_delta)], 1e-12)


def test_sign_consensus_sum_vs_count():
    deltas = T([[-3.0, 1.0], [1.0, 1.0], [1.0, -0.5]])
    # column 0: sum = -1 elects "-", but two of three are "+"
    assert sign_consensus_mask(deltas, "sum")[:, 0].tolist() == [True, False, False]
    assert sign_consensus_mask(deltas, "count")[:, 0].tolist() == [False, True, True]
    assert sign_consensus_mask(deltas, "sum")[:, 1].tolist() == [True, True, False]
    # ties elect +, zeros never agree
    z = T([[0.0], [0.0]])
    assert not sign_consensus_mask(z, "sum").any()


def test_ties_sign_election():
    mp = [{"weight": 1.0}] * 3
    out = run("ties", models(), mp, base=BASE)
    close(out, [b + d for b, d in zip(BASE, [1.5, 1.25, -0.75, 0.15])], 1e-12)
    # weights enter both the election and the divisor
    mp = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]
    out = run("ties", models(), mp, base=BASE)
    close(out, [b + d for b, d in zip(BASE, [2 / 1.5, 3.5 / 2.5, -2.25 / 2.5, 0.5 / 3])], 1e-12)


def test_ties_elects_by_mass_not_by_count():
    # one large negative delta outweighs two small positive ones
    base = [0.0, 1.0]
    mp = [{"weight": 1.0}] * 3
    out = run("ties", models([[-3.0, 1.0], [1.0, 1.0], [1.0, -0.5]], base), mp, base=base)
    close(out, [-3.0, 2.0], 1e-12)


def test_ties_trim_by_magnitude():
    # density 0.5 keeps the 2 largest |delta| of each task vector:
    # [1, -2, 0, 0], [2, 1, 0, 0], [0, 1.5, -1, 0]
    mp = [{"weight": 1.0, "density": 0.5}] * 3
    out = run("ties", models(), mp, base=BASE)
    close(out, [b + d for b, d in zip(BASE, [1.5, 1.25, -1.0, 0.0])], 1e-12)


def test_dare_density_one_equals_task_arithmetic_and_ties():
    mp = [{"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0}]
    g = torch.Generator().manual_seed(0)
    ta = run("task_arithmetic", models(), mp, base=BASE)
    close(run("dare_linear", models(), mp, base=BASE, generator=g), ta, 1e-12)
    ties = run("ties", models(), mp, base=BASE, normalize=False)
    close(run("dare_ties", models(), mp, base=BASE, generator=g), ties, 1e-12)
    close(run("della_linear", models(), mp, base=BASE, generator=g), ta, 1e-12)
    close(run("della", models(), mp, base=BASE, generator=g), run("ties", models(), mp, base=BASE), 1e-12)
    close(run("breadcrumbs", models(), mp, base=BASE), ta, 1e-12)


def _dare_delta(seed, density, rescale, n=200_000, dtype=torch.float64):
    delta = torch.linspace(0.5, 1.5, n, dtype=torch.float64)
    base = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    inputs = MergeInputs("w", [(base + delta).to(dtype)], [{"weight": 1.0, "density": density}],
                         {"rescale": rescale}, base=base.to(dtype), generator=g)
    return run_method("dare_linear", inputs).double() - base, delta


def test_dare_keep_rate_rescale_and_reproducibility():
    out, delta = _dare_delta(1, 0.3, False)
    kept = out.abs() > 1e-9
    n = delta.numel()
    assert abs(kept.double().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    torch.testing.assert_close(out[kept], delta[kept])
    # rescaled: same L1 norm as the task vector, kept entries blown up by ~1/density
    out_r, _ = _dare_delta(1, 0.3, True)
    assert torch.equal(out_r.abs() > 1e-9, kept)  # same seed, same mask
    assert abs(out_r.abs().sum().item() / delta.abs().sum().item() - 1) < 1e-9
    ratio = (out_r[kept] / delta[kept]).mean().item()
    assert abs(ratio - 1 / 0.3) < 0.05
    # same seed -> identical result; different seed -> different mask; dtype does not change the mask
    again, _ = _dare_delta(1, 0.3, True)
    assert torch.equal(again, out_r)
    other, _ = _dare_delta(2, 0.3, True)
    assert not torch.equal(other, out_r)
    f32, _ = _dare_delta(1, 0.3, True, dtype=torch.float32)
    assert torch.equal(f32.abs() > 1e-3, kept)


def test_dare_ties_seeded():
    mp = [{"weight": 1.0, "density": 0.5}] * 3
    tvs = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)).tolist()
    base = [0.0] * 64
    a = run("dare_ties", models(tvs, base), mp, base=base, generator=torch.Generator().manual_seed(3))
    b = run("dare_ties", models(tvs, base), mp, base=base, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_breadcrumbs_mask():
    vals = T([3.0, -1.0, 10.0, -7.0, 2.0, 5.0, -9.0, 4.0, -6.0, 8.0])
    # n=10, density 0.5 -> keep 5; gamma 0.2 -> drop the 2 largest (10, 9), then the 3 smallest (1, 2, 3)
    out = magnitude_outliers(vals, 0.5, gamma=0.2)
    assert sorted(out[out != 0].abs().tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    # gamma * n < 1 removes no outlier: plain top-k
    out = magnitude_outliers(vals, 0.3, gamma=0.01)
    assert sorted(out[out != 0].abs().tolist()) == [8.0, 9.0, 10.0]
    # density + gamma > 1: fewer outliers are removed so that 9 entries remain
    out = magnitude_outliers(vals, 0.9, gamma=0.2)
    assert sorted(out[out != 0].abs().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert torch.equal(out[out != 0], vals[vals.abs() != 10])  # values (and signs) unchanged


def test_breadcrumbs_merge_and_ties_variant():
    base = [0.0] * 10
    tv1 = [3.0, -1.0, 10.0, -7.0, 2.0, 5.0, -9.0, 4.0, -6.0, 8.0]
    tv2 = [-1.0] * 10
    mp = [{"weight": 1.0, "density": 0.5, "gamma": 0.2}, {"weight": 1.0, "density": 1.0}]
    kept1 = [0.0, 0.0, 0.0, -7.0, 0.0, 5.0, 0.0, 4.0, -6.0, 8.0]
    out = run("breadcrumbs", models([tv1, tv2], base), mp, base=base)
    close(out, [k - 1 for k in kept1])
    # with sign election: + wins where the kept value is > 1, - elsewhere (only tv2 = -1 remains there)
    out = run("breadcrumbs_ties", models([tv1, tv2], base), mp, base=base, normalize=True)
    close(out, [5.0 if k == 5 else 4.0 if k == 4 else 8.0 if k == 8 else (k - 1) / 2 if k < 0 else -1.0
                for k in kept1])


def test_magnitude_edge_cases():
    x = T([1.0, -4.0, 2.0, -3.0])
    assert magnitude(x, 0.5).tolist() == [0.0, -4.0, 0.0, -3.0]
    # rescale keeps the L1 norm: 10 / 7
    close(magnitude(x, 0.5, rescale=True), [0.0, -40 / 7, 0.0, -30 / 7], 1e-6)
    # int(0.4) = 0, but a positive density keeps at least the largest entry (mergekit 0.1.5)
    assert magnitude(x, 0.1).tolist() == [0.0, -4.0, 0.0, 0.0]
    assert magnitude(x, 0.0).abs().sum() == 0
    assert torch.equal(magnitude(x, 1.0), x)


def test_della_keep_probability_follows_magnitude_rank():
    rows, cols = 20_000, 10
    mags = torch.arange(1, cols + 1, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0] * 5, dtype=torch.float64)
    # shuffle column order per row so rank, not position, must drive the probability
    perm = torch.argsort(torch.rand(rows, cols, generator=torch.Generator().manual_seed(0)), dim=1)
    delta = (mags * signs)[perm]
    base = torch.zeros(rows, cols, dtype=torch.float64)
    inputs = MergeInputs("w", [delta], [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}], {"rescale": False},
                         base=base, generator=torch.Generator().manual_seed(1))
    out = run_method("della_linear", inputs)
    kept = out != 0
    for rank in range(cols):
        rate = kept[delta.abs() == rank + 1].double().mean().item()
        expected = 0.3 + 0.4 * rank / (cols - 1)
        assert abs(rate - expected) < 0.02, (rank, rate, expected)
    assert torch.equal(out[kept], delta[kept])


def test_della_rescale_and_epsilon_check():
    delta = torch.randn(8, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = torch.zeros_like(delta)
    inputs = MergeInputs("w", [delta], [{"weight": 1.0, "density": 0.4}], {},
                         base=base, generator=torch.Generator().manual_seed(3))
    out = run_method("della_linear", inputs)  # rescale defaults on
    assert (out == 0).any()
    close(out.abs().sum(), delta.abs().sum(), 1e-9)
    bad = MergeInputs("w", [delta], [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}], {}, base=base)
    with pytest.raises(ParameterError, match="epsilon"):
        run_method("della", bad)
    # a 1-D tensor is ranked as one row
    vec = MergeInputs("b", [delta[0]], [{"weight": 1.0, "density": 0.5}], {}, base=base[0],
                      generator=torch.Generator().manual_seed(4))
    assert run_method("della", vec).shape == (32,)


# ---------------------------------------------------------------- model stock / sce / nearswap


def test_model_stock_known_angle():
    # task vectors of length 2 at 60 degrees: cos = 1/2, N = 2 -> t = 2 * 0.5 / 1.5 = 2/3
    base = [1.0, 1.0]
    w1 = [3.0, 1.0]
    w2 = [2.0, 1.0 + math.sqrt(3)]
    avg = [(a + b) / 2 for a, b in zip(w1, w2)]
    out = run("model_stock", [w1, w2], base=base)
    close(out, [2 / 3 * a + 1 / 3 * b for a, b in zip(avg, base)], 1e-9)


def test_model_stock_three_models_and_filter_wise():
    base = [0.0, 0.0, 0.0]
    ws = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    cos = (0 + 2 * math.sqrt(0.5)) / 3  # mean of pairwise cosines
    t = 3 * cos / (1 + 2 * cos)
    close(run("model_stock", ws, base=base), [t * 2 / 3, t * 2 / 3, 0.0], 1e-9)
    # per row: row 0 orthogonal (t = 0 -> base), row 1 identical directions (t = 1 -> average)
    out = run("model_stock", [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]],
              base=[[0.0, 0.0], [0.0, 0.0]], filter_wise=True)
    close(out, [[0.0, 0.0], [1.0, 0.0]], 1e-9)


def test_sce():
    base = [1.0, 2.0, 3.0, 4.0]
    tv1, tv2 = [1.0, -2.0, 3.0, 0.0], [2.0, 2.0, -2.0, 0.0]
    w1, w2 = 14 / 4, 12 / 4  # mean squares (normalization cancels in the weighted average)
    expected = [(w1 * 1 + w2 * 2) / (w1 + w2), 2.0, 3.0, 0.0]
    out = run("sce", models([tv1, tv2], base), base=base)
    close(out, [b + d for b, d in zip(base, expected)], 1e-9)
    # variances 0.25, 4, 6.25, 0 -> of the 3 nonzero, select_topk 0.5 keeps int(1.5) = 1 (entry 2)
    out = run("sce", models([tv1, tv2], base), base=base, select_topk=0.5)
    close(out, [1.0, 2.0, 6.0, 4.0], 1e-9)
    out = run("sce", models([tv1, tv2], base), base=base, select_topk=0.7)
    close(out, [1.0, 4.0, 6.0, 4.0], 1e-9)


def test_nearswap():
    base = [0.0, 0.0, 0.0, 1.0]
    other = [0.25, 1.0, 4.0, 1.0]
    # |diff| = .25, 1, 4, 0 -> weights min(1, .5/|diff|) = 1, .5, .125, 1
    out = run("nearswap", [other], base=base, t=0.5)
    close(out, [0.25, 0.5, 0.5, 1.0])
    with pytest.raises(ParameterError, match="'t' of merge method 'nearswap' must be > 0"):
        run("nearswap", [other], base=base, t=0.0)


# ---------------------------------------------------------------- devices and dtypes


def _all_method_inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    base = torch.randn(6, 5, generator=g).to(device=device, dtype=dtype)
    return xs, base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_every_method_runs_on_device_and_keeps_dtype(name, device):
    m = get_method(name)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        xs, base = _all_method_inputs(device, dtype)
        n = 1 if m.max_models == 1 else 2 if m.max_models == 2 else 3
        tensors = xs[:n]
        params = {"t": 0.3} if m.global_param("t") else {}
        mp = [{"weight": w, "density": 0.6} for w in (1.0, 0.5, 0.8)[:n]]
        if name == "passthrough":
            mp = [{"scale": 2.0}]
        inputs = MergeInputs("w", tensors, mp, params, base=base if m.uses_base else None,
                             generator=torch.Generator().manual_seed(7), stats=_stats(m, tensors, mp))
        out = run_method(m, inputs)
        assert out.dtype == dtype and out.device.type == device and out.shape == (6, 5)
        assert torch.isfinite(out.float()).all()
        results[dtype] = out.float()
    if not m.randomized or name.startswith("dare"):
        # bf16 inputs are merged in float32: same result up to bf16 input/output rounding
        torch.testing.assert_close(results[torch.bfloat16], results[torch.float32], atol=0.1, rtol=0.05)
    if device != "cpu":
        # the same seeded CPU generator drives the masks wherever the tensors live: GPU == CPU
        xs, base = _all_method_inputs("cpu", torch.float32)
        inputs = MergeInputs("w", xs[:n], mp, params, base=base if m.uses_base else None,
                             generator=torch.Generator().manual_seed(7), stats=_stats(m, xs[:n], mp))
        torch.testing.assert_close(results[torch.float32].cpu(), run_method(m, inputs), atol=1e-5, rtol=1e-5)


def _stats(m, tensors, mp):
    """Statistics a data-driven method reads (a Gram matrix per weight, a Fisher per entry, or a learned
    coefficient per model: here each model's weight); None for the rest."""
    if m.needs_data is None:
        return None
    if m.needs_data == "coefficients":
        return [{"coefficient": p["weight"]} for p in mp]
    g = torch.Generator().manual_seed(3)
    out = []
    for t in tensors:
        if m.needs_data == "gram":
            x = torch.randn(20, t.shape[1], generator=g, dtype=torch.float64)
            out.append({"gram": (x.T @ x / 20).to(t.device), "count": 20})
        else:
            out.append({"fisher": torch.rand(t.shape, generator=g).to(t.device), "norm": 1.0})
    return out


def test_parameter_ranges_are_checked_before_the_kernel_runs():
    x, base = torch.ones(4), torch.zeros(4)
    bad_density = MergeInputs("w", [x, x], [{"weight": 1}, {"weight": 1, "density": 1.5}], {}, base=base)
    with pytest.raises(ParameterError, match=r"tensor 'w', model 1: parameter 'density' .* must be in \[0, 1\], got 1.5"):
        run_method("ties", bad_density)
    with pytest.raises(ParameterError, match=r"'select_topk' .* must be in \[0, 1\]"):
        run("sce", [[1.0], [2.0]], base=[0.0], select_topk=-0.5)
    with pytest.raises(ParameterError, match=r"'epsilon' of merge method 'ram' must be >= 0"):
        run("ram", [[1.0], [2.0]], base=[0.0], epsilon=-1.0)
    with pytest.raises(ParameterError, match="'lambda' .* must be finite"):
        run("task_arithmetic", [[1.0]], [{"weight": 1}], base=[0.0], **{"lambda": float("inf")})
    # a tensor holding one value counts as that value; integers are numbers, booleans are not
    close(run("linear", [[1.0], [3.0]], [{"weight": torch.tensor(1.0)}, {"weight": 1}]), [2.0])
    with pytest.raises(ParameterError, match="number"):
        run("linear", [[1.0]], [{"weight": True}])
