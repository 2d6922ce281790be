"""merge.measure: hook capture against a manual forward, streaming moments against numpy, CKA against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from suture.merge.errors import AlignmentError, InputError
from suture.merge.measure import (
    DEAD,
    DeadUnits,
    PairedMoments,
    RunningMoments,
    Site,
    capture,
    eval_mode,
    flatten_items,
    hsic_unbiased_gram,
    linear_cka,
    pool_items,
    unit_features,
)


class _Twice(nn.Module):
    """Runs one Linear twice in a forward pass and returns a tuple, as shared blocks and HF layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(self.lin(x)), x


def test_capture_equals_manual_forward() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 4)
    sites = {"pre": Site("0", "output"), "mid": Site("2", "input"), "out": Site("2", "output", flatten_items)}
    with torch.no_grad(), capture(net, sites) as got:
        net(x)
        hidden = net[0](x)
        assert torch.equal(got["pre"], hidden)
        assert torch.equal(got["mid"], torch.relu(hidden))
        assert torch.equal(got["out"], net[2](torch.relu(hidden)))
    assert not net[0]._forward_hooks and not net[2]._forward_pre_hooks  # removed on exit


def test_capture_conv_units_pooling_and_token_masks() -> None:
    torch.manual_seed(1)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(2, 3, 5, 5)
    sites = {"units": Site("0", transform=lambda t: unit_features(t, 1)), "pooled": Site("0", transform=pool_items)}
    with torch.no_grad(), capture(conv, sites) as got:
        y = conv(x)
    # every pixel of every item is a sample of a channel; pooling gives one row per item
    assert got["units"].shape == (2 * 25, 4)
    assert torch.equal(got["units"][:, 1], y[:, 1].reshape(-1))
    torch.testing.assert_close(got["pooled"], y.mean(dim=(2, 3)))
    tokens = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = pool_items(tokens, mask, channel_axis=-1)
    torch.testing.assert_close(pooled[0], tokens[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], tokens[1].mean(0))


def test_capture_keeps_every_call_unwraps_tuples_and_names_bad_sites() -> None:
    net = _Twice().eval()
    x = torch.randn(2, 3)
    with torch.no_grad(), capture(net, {"lin": Site("lin")}, keep="all") as got, capture(net, {"top": Site("")}, unwrap=True) as top:
        out, _ = net(x)
    assert len(got["lin"]) == 2 and torch.equal(got["lin"][1], out)
    assert torch.equal(top["top"], out)
    with pytest.raises(InputError, match="not a tensor"), capture(net, {"top": Site("", label="top")}) as _:
        net(x)
    assert not net._forward_hooks  # removed even though the block raised
    with pytest.raises(AlignmentError, match="no module 'nope'"), capture(net, {"n": Site("nope")}, error=AlignmentError):
        pass


def test_eval_mode_restores_each_module() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    net[0].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[1].training and not net[0].training


def test_streaming_moments_equal_numpy_on_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(301, 5)) * [1.0, 3.0, 0.5, 2.0, 1.0] + [5.0, -1.0, 0.0, 100.0, 2.0]
    x[:, 4] = x[:, 0] * 2 - x[:, 1]
    y = np.concatenate([x[:, :2] @ rng.normal(size=(2, 3)), rng.normal(size=(301, 4))], axis=1)
    mom = RunningMoments(5, gram=True)
    pair = PairedMoments(5, 7)
    for i in range(0, 301, 64):  # uneven last block: the sums must not care
        mom.update(torch.tensor(x[i : i + 64], dtype=torch.float32))
        pair.update(torch.tensor(x[i : i + 64]), torch.tensor(y[i : i + 64]))
    x32 = x.astype(np.float32).astype(np.float64)  # what float32 features hold, accumulated in float64
    assert mom.count == 301 and mom.gram is not None and mom.gram.dtype == torch.float64
    np.testing.assert_allclose(mom.mean.numpy(), x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(mom.var.numpy(), x32.var(0), rtol=1e-9)
    np.testing.assert_allclose(mom.cov().numpy(), np.cov(x32, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(mom.second_moment().numpy(), x32.T @ x32 / 301, rtol=1e-12)
    np.testing.assert_allclose(mom.corr().numpy(), np.corrcoef(x32, rowvar=False), rtol=1e-9, atol=1e-10)
    joint = np.cov(np.concatenate([x, y], axis=1), rowvar=False, bias=True)
    np.testing.assert_allclose(pair.cross_cov().numpy(), joint[:5, 5:], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pair.cross_second_moment().numpy(), x.T @ y / 301, rtol=1e-12)
    full = np.corrcoef(np.concatenate([x, y], axis=1), rowvar=False)
    np.testing.assert_allclose(pair.cross_corr().numpy(), full[:5, 5:], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(pair.b.rms.numpy(), np.sqrt((y**2).mean(0)), rtol=1e-12)


def test_constant_units_follow_one_documented_rule() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(200, 2)), np.full((200, 1), 7.0), np.full((200, 1), 3.0)], axis=1)
    x[:, 1] *= 1e-7  # varies, but little next to unit 0
    mom = RunningMoments(4, gram=True)
    for i in range(0, 200, 50):
        mom.update(torch.tensor(x[i : i + 50]))
    assert mom.constant().tolist() == [False, False, True, True]
    assert DEAD == DeadUnits(rel_mean=1e-6, floor=1e-12, rel_peak=0.0)
    peak = DeadUnits(rel_mean=0.0, rel_peak=1e-12)  # judged against the most varying unit instead
    assert mom.constant(peak).tolist() == [False, True, True, True]
    corr = mom.corr()
    assert (corr[2:] == 0).all() and (corr[:, 2:] == 0).all()  # no spurious correlation from rounding noise
    zipped = mom.corr(dead=peak, dead_with_dead=1.0)
    assert zipped[1:, 1:].eq(1.0).all() and zipped[0, 1:].eq(0.0).all() and zipped[0, 0] == pytest.approx(1.0)


def test_moments_refuse_what_they_cannot_give() -> None:
    mom = RunningMoments(3)
    with pytest.raises(InputError, match="no calibration samples"):
        _ = mom.mean
    with pytest.raises(InputError, match=r"expected \(samples, 3\)"):
        mom.update(torch.zeros(4, 2))
    mom.update(torch.randn(4, 3))
    with pytest.raises(InputError, match="gram=False"):
        mom.cov()
    single = PairedMoments(3)
    single.update(torch.randn(4, 3))
    with pytest.raises(InputError, match="not paired"):
        single.cross_corr()
    with pytest.raises(InputError, match="same samples"):
        PairedMoments(3, 2).update(torch.randn(4, 3), torch.randn(5, 2))


def _cka_formula(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _hsic_u(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out term by term."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return float(np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def test_cka_equals_the_formula_on_known_cases() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 1))
    b = 0.5 * a + rng.normal(size=(40, 1))
    # one feature per side: CKA is the squared Pearson correlation
    assert linear_cka(torch.tensor(a), torch.tensor(b)) == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1] ** 2, rel=1e-12)
    x = rng.normal(size=(60, 8))
    y = np.tanh(x @ rng.normal(size=(8, 5))) + 0.3 * rng.normal(size=(60, 5))
    assert linear_cka(x, y) == pytest.approx(_cka_formula(x, y), rel=1e-12)
    wide_x, wide_y = rng.normal(size=(12, 50)), rng.normal(size=(12, 40))  # the n x n Gram path
    assert linear_cka(wide_x, wide_y) == pytest.approx(_cka_formula(wide_x, wide_y), rel=1e-10)
    xc, yc = x - x.mean(0), y - y.mean(0)
    kx, ly = xc @ xc.T, yc @ yc.T
    expected = _hsic_u(kx, ly) / np.sqrt(_hsic_u(kx, kx) * _hsic_u(ly, ly))
    assert linear_cka(x, y, unbiased=True) == pytest.approx(expected, rel=1e-9)
    assert linear_cka(wide_x, wide_y, unbiased=True) == pytest.approx(
        _hsic_u(wide_x @ wide_x.T, wide_y @ wide_y.T)
        / np.sqrt(_hsic_u(wide_x @ wide_x.T, wide_x @ wide_x.T) * _hsic_u(wide_y @ wide_y.T, wide_y @ wide_y.T)),
        rel=1e-9,
    )
    assert hsic_unbiased_gram(torch.tensor(kx), torch.tensor(ly)) == pytest.approx(_hsic_u(kx, ly), rel=1e-10)


def test_cka_invariances_and_degenerate_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(200, 4, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    for unbiased in (False, True):
        base = linear_cka(x, y, unbiased=unbiased)
        assert 0.2 < base < 1.0
        assert linear_cka(x, y @ q, unbiased=unbiased) == pytest.approx(base, rel=1e-10)  # orthogonal map
        assert linear_cka(7.5 * x, y - 3.0, unbiased=unbiased) == pytest.approx(base, rel=1e-10)  # scale, shift
        assert linear_cka(x, x @ torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))[0], unbiased=unbiased) == pytest.approx(1.0)
    assert linear_cka(x, torch.zeros(200, 3)) == 0.0
    with pytest.raises(InputError, match="same samples"):
        linear_cka(x, y[:10])
    with pytest.raises(InputError, match="at least 4 samples, got 3"):
        linear_cka(x[:3], y[:3], unbiased=True)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        linear_cka(bad, y)


def test_unbiased_cka_is_near_zero_on_independent_inputs() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    z = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    biased, unbiased = linear_cka(x, z), linear_cka(x, z, unbiased=True)
    assert biased > 0.08  # the biased estimator sees structure in finite samples of independent features
    assert abs(unbiased) < 0.02
