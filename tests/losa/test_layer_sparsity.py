"""LSR (method.md §2): linear CKA, importance, the delta band table, the exact rate LP, and mixed N:M (§1)."""

import math
import random

import pytest
import torch

import losa.layer_sparsity as ls
from losa.layer_sparsity import (
    DEFAULT_DELTA_BANDS,
    OFFICIAL_DELTA_BANDS,
    allocate_layer_sparsity,
    delta_for,
    layer_importance,
    linear_cka,
    mixed_nm,
    official_delta,
)
from losa.patterns import Pattern


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _direct_cka(x, y):
    """Normalised HSIC with explicit kernel and centring matrices: trace(K H L H) / (n - 1)^2."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def hsic(k, l):
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = x @ x.T, y @ y.T
    return (hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))).item()


# ---------------------------------------------------------------- CKA


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(10, 4, 6, generator=_gen(0))
    c = linear_cka([x, x.clone(), torch.randn(10, 4, 6, generator=_gen(1))])
    assert c.shape == (3, 3) and c.dtype == torch.float64
    assert torch.allclose(c.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert abs(c[0, 1].item() - 1.0) < 1e-12
    assert c[0, 2].item() < 0.99  # an unrelated representation is not similar


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    n, s, d = 12, 3, 5
    x = torch.randn(n, s, d, generator=_gen(2), dtype=torch.float64)
    z = torch.randn(n, s, d, generator=_gen(3), dtype=torch.float64) + 0.5 * x
    q, _ = torch.linalg.qr(torch.randn(s * d, s * d, generator=_gen(4), dtype=torch.float64))
    x_rot = (x.reshape(n, -1) @ q) * 3.7  # orthogonal transform of the flattened features, then scaling
    base = linear_cka([x, z])[0, 1].item()
    moved = linear_cka([x_rot, 0.25 * z])[0, 1].item()
    assert 0.05 < base < 0.99  # a non-trivial value, so the invariance is tested
    assert abs(base - moved) < 1e-10
    # a non-orthogonal transform does change it
    stretched = x.reshape(n, -1) * torch.linspace(0.1, 5.0, s * d, dtype=torch.float64)
    assert abs(linear_cka([stretched, z])[0, 1].item() - base) > 1e-3


def test_cka_is_symmetric_and_matches_direct_hsic():
    feats = [torch.randn(9, 2, 4, generator=_gen(10 + i)) for i in range(4)]
    feats[1] = feats[0] + 0.3 * feats[1]  # some genuinely related pairs
    c = linear_cka(feats)
    assert torch.allclose(c, c.T, atol=1e-14, rtol=0)
    for i in range(4):
        for j in range(4):
            assert abs(c[i, j].item() - _direct_cka(feats[i], feats[j])) < 1e-10
    assert c.min().item() >= 0.0 and c.max().item() <= 1.0 + 1e-12


def test_cka_handles_different_widths_per_layer():
    n = 8
    a = torch.randn(n, 4, 8, generator=_gen(20))
    b = torch.randn(n, 3, 5, generator=_gen(21))
    c_ = torch.randn(n, 20, generator=_gen(22))
    c = linear_cka([a, b, c_])
    assert c.shape == (3, 3)
    assert abs(c[0, 1].item() - _direct_cka(a, b)) < 1e-10
    assert abs(c[1, 2].item() - _direct_cka(b, c_)) < 1e-10


def test_gram_chunking_gives_the_same_result(monkeypatch):
    x = torch.randn(6, 7, 11, generator=_gen(30))
    whole = ls.gram(x)
    monkeypatch.setattr(ls, "_GRAM_CHUNK_ELEMENTS", 6 * 5)  # 5 feature columns per chunk, a ragged last chunk
    chunked = ls.gram(x)
    flat = x.reshape(6, -1).double()
    assert torch.allclose(chunked, flat @ flat.T, atol=1e-10)
    assert torch.allclose(chunked, whole, atol=1e-10)
    assert ls._GRAM_CHUNK_ELEMENTS // 6 < flat.shape[1]  # really chunked


@pytest.mark.parametrize(
    "feats,match",
    [
        ([torch.randn(5, 3), torch.randn(6, 3)], "same number of examples"),
        ([torch.randn(1, 3), torch.randn(1, 3)], "at least 2"),
        ([], "at least one block"),
        ([torch.randn(5, 3), torch.ones(5, 3)], "same representation"),
    ],
)
def test_cka_rejects_bad_inputs(feats, match):
    with pytest.raises(ValueError, match=match):
        linear_cka(feats)


# ---------------------------------------------------------------- importance


def test_more_redundant_layers_get_lower_importance():
    cka = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]], dtype=torch.float64)
    imp = layer_importance(cka, beta=2.0)
    row = torch.tensor([1.0, 1.1, 0.3], dtype=torch.float64)  # S_l
    assert torch.allclose(imp, torch.exp(-2.0 * row / row.sum()), atol=1e-15)
    assert imp[1] < imp[0] < imp[2]  # layer 1 most redundant, layer 2 least


def test_importance_beta_zero_is_all_ones_and_bad_args_raise():
    cka = linear_cka([torch.randn(6, 4, generator=_gen(40 + i)) for i in range(5)])
    assert torch.equal(layer_importance(cka, 0.0), torch.ones(5, dtype=torch.float64))
    assert not torch.equal(layer_importance(cka, 1.0), torch.ones(5, dtype=torch.float64))
    uniform = layer_importance(torch.eye(4, dtype=torch.float64), 1.0)  # no similarity at all: all equal
    assert torch.allclose(uniform, torch.full((4,), math.exp(-0.25), dtype=torch.float64))
    with pytest.raises(ValueError, match="beta"):
        layer_importance(cka, -1.0)
    with pytest.raises(ValueError, match="square"):
        layer_importance(torch.ones(2, 3), 1.0)


# ---------------------------------------------------------------- delta bands


def test_delta_bands_official_values_and_extension():
    assert OFFICIAL_DELTA_BANDS == ((0.5, 0.01), (0.6, 0.02), (0.7, 0.03))
    assert DEFAULT_DELTA_BANDS[: len(OFFICIAL_DELTA_BANDS)] == OFFICIAL_DELTA_BANDS
    for target, delta in [(0.3, 0.01), (0.5, 0.01), (0.55, 0.02), (0.6, 0.02), (0.65, 0.03), (0.7, 0.03)]:
        assert delta_for(target) == delta
        assert official_delta(target) == delta
    assert delta_for(0.8) == 0.03  # covered by the extension: no crash
    assert delta_for(0.9) == 0.03
    with pytest.raises(ValueError, match="no delta"):
        official_delta(0.8)


def test_delta_band_outside_the_table_raises():
    with pytest.raises(ValueError, match="no delta band covers"):
        delta_for(0.8, OFFICIAL_DELTA_BANDS)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        delta_for(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        delta_for(-0.1)
    with pytest.raises(ValueError, match="increasing"):
        delta_for(0.5, ((0.6, 0.01), (0.5, 0.02)))


def test_delta_is_clipped_to_keep_rates_in_range():
    assert delta_for(0.005) == 0.005  # band says 0.01: rates would go negative
    assert delta_for(0.0) == 0.0
    assert abs(delta_for(0.98) - 0.01) < 1e-15  # band says 0.03: rates would reach 1
    for target in (0.0, 0.005, 0.98, 0.995):
        rates = allocate_layer_sparsity([0.3, 0.1, 0.2, 0.5], target, delta_for(target))
        assert min(rates) >= 0.0 and max(rates) < 1.0


# ---------------------------------------------------------------- rate LP


def test_allocation_small_case_by_hand():
    assert allocate_layer_sparsity([0.3, 0.1, 0.2], 0.5, 0.01) == pytest.approx([0.49, 0.51, 0.5], abs=1e-15)
    # ties: the later block counts as less important and takes the higher rate
    assert allocate_layer_sparsity([1.0, 1.0], 0.5, 0.02) == pytest.approx([0.48, 0.52], abs=1e-15)
    assert allocate_layer_sparsity(torch.tensor([0.7]), 0.4, 0.01) == [0.4]
    assert allocate_layer_sparsity([0.2, 0.1], 0.4, 0.0) == [0.4, 0.4]


def _random_cases(n_cases, seed):
    rng = random.Random(seed)
    for _ in range(n_cases):
        n_layers = rng.randint(2, 40)
        target = rng.uniform(0.3, 0.9)
        if rng.random() < 0.3:  # ties
            imp = [rng.choice([0.5, 0.7, 0.9]) for _ in range(n_layers)]
        else:
            imp = [math.exp(-rng.uniform(0, 3)) for _ in range(n_layers)]
        yield imp, target, delta_for(target)


def test_allocation_random_mean_bounds_and_order():
    for imp, target, delta in _random_cases(200, seed=0):
        rates = allocate_layer_sparsity(imp, target, delta)
        assert len(rates) == len(imp)
        assert abs(sum(rates) / len(rates) - target) < 1e-12
        assert all(target - delta - 1e-12 <= s <= target + delta + 1e-12 for s in rates)
        for i in range(len(imp)):
            for j in range(len(imp)):
                if imp[i] < imp[j]:
                    assert rates[i] >= rates[j]


def test_allocation_matches_linprog_optimum():
    from scipy import optimize  # a dev dependency (pyproject.toml): this test must not skip silently

    for imp, target, delta in _random_cases(60, seed=1):
        n_layers = len(imp)
        res = optimize.linprog(
            c=imp,
            A_eq=[[1.0 / n_layers] * n_layers],
            b_eq=[target],
            bounds=[(target - delta, target + delta)] * n_layers,
            method="highs",
        )
        assert res.status == 0
        ours = sum(s * i for s, i in zip(allocate_layer_sparsity(imp, target, delta), imp))
        assert abs(ours - res.fun) < 1e-9


@pytest.mark.parametrize(
    "imp,target,delta,match",
    [
        ([0.1, 0.2], 0.98, 0.03, r"\[0, 1\)"),
        ([0.1, 0.2], 0.005, 0.01, r"\[0, 1\)"),
        ([0.1, 0.2], 0.5, -0.01, "delta"),
        ([], 0.5, 0.01, "non-empty"),
        ([0.1, float("nan")], 0.5, 0.01, "non-finite"),
    ],
)
def test_allocation_rejects_bad_inputs(imp, target, delta, match):
    with pytest.raises(ValueError, match=match):
        allocate_layer_sparsity(imp, target, delta)


# ---------------------------------------------------------------- mixed N:M


def test_mixed_nm_by_hand():
    imp = [0.1, 0.9, 0.5, 0.3]
    assert [p.n for p in mixed_nm(imp, 0.75, 8)] == [1, 3, 3, 1]  # mean 2 of 8, moved by one
    assert [p.n for p in mixed_nm(imp, 0.75, 8, spread=0)] == [2, 2, 2, 2]
    assert [p.n for p in mixed_nm(imp, 0.75, 8, spread=2)] == [1, 4, 2, 1]  # band [0, 4] clipped to n_min=1
    # mean 2.25: floor/ceil only with spread <= 1
    assert [p.n for p in mixed_nm(imp, 1 - 9 / 32, 8)] == [2, 3, 2, 2]
    assert mixed_nm(imp, 0.5, 4) == [Pattern.nm(1, 4), Pattern.nm(3, 4), Pattern.nm(3, 4), Pattern.nm(1, 4)]


def test_mixed_nm_random_exact_mean_bounds_and_order():
    rng = random.Random(2)
    for _ in range(200):
        n_layers = rng.randint(1, 32)
        m = rng.choice([4, 8, 16])
        n_min = rng.randint(1, m - 1)
        n_max = rng.randint(n_min, m - 1)
        total = rng.randint(n_layers * n_min, n_layers * n_max)
        target = 1 - total / (n_layers * m)
        spread = rng.randint(0, 3)
        imp = [rng.choice([0.2, 0.4, rng.random()]) for _ in range(n_layers)]
        pats = mixed_nm(imp, target, m, n_min=n_min, n_max=n_max, spread=spread)
        ns = [p.n for p in pats]
        assert all(p.m == m for p in pats)
        assert sum(ns) == total
        assert abs(sum(ns) / n_layers / m - (1 - target)) < 1e-12
        assert all(n_min <= n <= n_max for n in ns)
        mean = total / n_layers
        assert all(abs(n - mean) <= spread or n in (math.floor(mean), math.ceil(mean)) for n in ns)
        for i in range(n_layers):
            for j in range(n_layers):
                if imp[i] > imp[j]:
                    assert ns[i] >= ns[j]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(target_sparsity=0.7, m=8), "not reachable"),  # 4 * 8 * 0.3 = 9.6 kept
        (dict(target_sparsity=0.75, m=8, n_min=3), "outside"),
        (dict(target_sparsity=0.75, m=8, n_max=8), "n_max"),
        (dict(target_sparsity=0.75, m=8, n_min=0), "n_min"),
        (dict(target_sparsity=0.75, m=8, spread=-1), "spread"),
        (dict(target_sparsity=1.0, m=8), r"\[0, 1\)"),
    ],
)
def test_mixed_nm_rejects_unreachable_targets_and_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixed_nm([0.1, 0.9, 0.5, 0.3], **kwargs)
