"""Definition tests for the pruning rules (magnitude, Wanda, SparseGPT) on synthetic weights and statistics."""

import math

import pytest
import torch

import losa.pruners as pruners
from losa.patterns import Pattern
from losa.pruners import get_rule, magnitude_mask, sparsegpt_prune, wanda_mask
from losa.pruners._select import kept_count

NM_PATTERNS = ["2:4", "4:8", "2:8", "1:4"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_weight(d_out, d_in, seed=0):
    return torch.randn(d_out, d_in, generator=_gen(seed))


def correlated_inputs(n, d_in, seed=1):
    """(n, d_in) inputs with correlated columns of different scales: X = Z A, A a random mixing matrix."""
    g = _gen(seed)
    z = torch.randn(n, d_in, generator=g)
    a = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in) + 0.5 * torch.eye(d_in)
    a = a + 0.3 * torch.randn(1, d_in, generator=g)  # a shared component: strongly correlated columns
    scale = torch.exp(0.7 * torch.randn(d_in, generator=g))
    return (z @ a) * scale


def hessian_of(x):
    return 2.0 * x.T @ x / x.shape[0]


def output_error(w, w_hat, x):
    return torch.linalg.norm(x @ w.T - x @ w_hat.T).item()


def groups(t, m):
    """(d_out, d_in) -> (d_out * d_in / m, m)."""
    return t.reshape(-1, m)


# --------------------------------------------------------------------------------------------------------------------
# kept_count


@pytest.mark.parametrize("size,s,expected", [(40, 0.65, 14), (64, 0.65, 22), (64, 0.7, 19), (40, 0.3, 28), (64, 0.5, 32), (10, 0.0, 10)])
def test_kept_count(size, s, expected):
    assert kept_count(size, s) == expected == round((1 - s) * size)


# --------------------------------------------------------------------------------------------------------------------
# Wanda


@pytest.mark.parametrize("d_in", [40, 64])
@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.65])
def test_wanda_keeps_top_scores_per_row(s, d_in):
    w = rand_weight(24, d_in, seed=3)
    act_sq = torch.exp(2 * torch.randn(d_in, generator=_gen(4)))  # very uneven input norms
    mask = wanda_mask(w, act_sq, s)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    keep = round((1 - s) * d_in)
    assert (mask.sum(1) == keep).all()
    score = w.abs() * act_sq.sqrt()
    for r in range(w.shape[0]):
        assert score[r][mask[r]].min() >= score[r][~mask[r]].max()
    # the activation norm matters: this is not the magnitude mask of the rows
    assert not torch.equal(mask, magnitude_mask(w, s, per="row"))


def test_wanda_ignores_per_row_constant_scale_of_act_sq():
    w, act_sq = rand_weight(16, 32, 5), torch.rand(32, generator=_gen(6)) + 0.1
    assert torch.equal(wanda_mask(w, act_sq, 0.5), wanda_mask(w, act_sq / 1000.0, 0.5))


# --------------------------------------------------------------------------------------------------------------------
# magnitude


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7, 0.65])
def test_magnitude_matrix_is_global_top(s):
    w = rand_weight(24, 40, seed=7)
    mask = magnitude_mask(w, s)  # per="matrix" by default
    assert mask.sum().item() == round((1 - s) * w.numel())
    assert w.abs()[mask].min() >= w.abs()[~mask].max()
    # one threshold per matrix: rows do not all keep the same count (they would with per="row")
    assert mask.sum(1).unique().numel() > 1


@pytest.mark.parametrize("s", [0.3, 0.65])
def test_magnitude_per_row(s):
    w = rand_weight(24, 40, seed=8)
    mask = magnitude_mask(w, s, per="row")
    assert (mask.sum(1) == round((1 - s) * 40)).all()
    for r in range(w.shape[0]):
        assert w[r].abs()[mask[r]].min() >= w[r].abs()[~mask[r]].max()


def test_magnitude_rejects_bad_per():
    with pytest.raises(ValueError, match="per"):
        magnitude_mask(rand_weight(4, 8), 0.5, per="column")


# --------------------------------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize("pat", NM_PATTERNS)
def test_nm_magnitude_and_wanda(pat):
    p = Pattern.parse(pat)
    w = rand_weight(16, 64, seed=9)
    act_sq = torch.exp(torch.randn(64, generator=_gen(10)))
    for mask, score in [(magnitude_mask(w, None, p), w.abs()), (wanda_mask(w, act_sq, None, p), w.abs() * act_sq.sqrt())]:
        pruned = torch.where(mask, w, torch.zeros(()))
        assert ((groups(pruned, p.m) != 0).sum(1) == p.n).all()
        assert (groups(mask, p.m).sum(1) == p.n).all()
        sg, mg = groups(score, p.m), groups(mask, p.m)
        kept_min = torch.where(mg, sg, torch.full_like(sg, float("inf"))).min(1).values
        pruned_max = torch.where(~mg, sg, torch.full_like(sg, -float("inf"))).max(1).values
        assert (kept_min >= pruned_max).all()  # the top N of every group


@pytest.mark.parametrize("pat", NM_PATTERNS)
def test_nm_sparsegpt(pat):
    p = Pattern.parse(pat)
    x = correlated_inputs(512, 64)
    w = rand_weight(16, 64, seed=11)
    new_w, mask = sparsegpt_prune(w, hessian_of(x), None, p)
    assert ((groups(new_w, p.m) != 0).sum(1) == p.n).all()
    assert (groups(mask, p.m).sum(1) == p.n).all()
    assert torch.equal(new_w != 0, mask)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_rule_interface_nm(method):
    """The driver's view: rule.prune returns a weight that is zero exactly off the mask."""
    rule = get_rule(method)
    w = rand_weight(16, 32, seed=12)
    x = correlated_inputs(256, 32)
    stat = {None: None, "act_sq": (x**2).sum(0), "hessian": hessian_of(x)}[rule.statistic]
    info = {}
    new_w, mask = rule.prune(w, stat, None, Pattern.nm(2, 4), info)
    assert new_w.shape == w.shape and mask.dtype == torch.bool
    assert ((groups(new_w, 4) != 0).sum(1) == 2).all()
    assert (new_w[~mask] == 0).all()
    if method != "sparsegpt":
        assert torch.equal(new_w[mask], w[mask])
    else:
        assert info["cholesky_retries"] == 0


# --------------------------------------------------------------------------------------------------------------------
# SparseGPT quality and exactness


@pytest.mark.parametrize("setting", [0.5, 0.7, "2:4"])
def test_sparsegpt_error_below_wanda_and_magnitude(setting):
    d_out, d_in, n = 32, 64, 2048
    x = correlated_inputs(n, d_in, seed=13)
    w = rand_weight(d_out, d_in, seed=14)
    p = Pattern.parse(setting) if isinstance(setting, str) else Pattern()
    s = None if p.is_nm else setting
    w_sgpt, _ = sparsegpt_prune(w, hessian_of(x), s, p)
    w_wanda = w * wanda_mask(w, (x**2).sum(0), s, p)
    w_mag = w * magnitude_mask(w, s, p)
    e_sgpt, e_wanda, e_mag = (output_error(w, v, x) for v in (w_sgpt, w_wanda, w_mag))
    assert e_sgpt < e_wanda
    assert e_sgpt < e_mag
    assert e_sgpt < 0.8 * min(e_wanda, e_mag)  # clearly better on correlated inputs, not by rounding


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_sparsegpt_update_beats_its_own_mask_alone(s):
    x = correlated_inputs(1024, 48, seed=15)
    w = rand_weight(8, 48, seed=16)
    new_w, mask = sparsegpt_prune(w, hessian_of(x), s)
    assert not torch.equal(new_w[mask], w[mask])  # kept weights were updated
    assert output_error(w, new_w, x) < output_error(w, w * mask, x)


@pytest.mark.parametrize("s", [0.5, 0.3])
def test_sparsegpt_exact_zeros_and_per_block_counts(s):
    d_out, d_in = 8, 320  # blocks of 128, 128, 64 columns
    x = correlated_inputs(1024, d_in, seed=17)
    w = rand_weight(d_out, d_in, seed=18)
    new_w, mask = sparsegpt_prune(w, hessian_of(x), s)
    assert new_w.dtype == w.dtype
    assert (new_w[~mask] == 0).all()
    assert (new_w[mask] != 0).all()
    for i1 in range(0, d_in, 128):
        block = mask[:, i1 : i1 + 128]
        assert block.sum().item() == round((1 - s) * block.numel())
    assert mask[:, 256:].numel() == d_out * 64


@pytest.mark.parametrize("pat", ["2:4", "1:8"])
def test_sparsegpt_nm_independent_of_blocksize(pat):
    """N:M groups are chosen inside the column sweep, so lazy batching (any blocksize) must not change the result:
    this checks the updates carried from one 128-column block to the next."""
    p = Pattern.parse(pat)
    d_in = 320
    x = correlated_inputs(1024, d_in, seed=28)
    w = rand_weight(8, d_in, seed=29)
    h = hessian_of(x)
    ref_w, ref_m = sparsegpt_prune(w, h, None, p, blocksize=512)  # one block: no lazy batching at all
    for bs in (128, 64, 32):
        new_w, mask = sparsegpt_prune(w, h, None, p, blocksize=bs)
        assert torch.equal(mask, ref_m), bs
        torch.testing.assert_close(new_w, ref_w, atol=1e-4, rtol=1e-4)


def test_sparsegpt_zero_sparsity_is_identity():
    x = correlated_inputs(256, 32)
    w = rand_weight(8, 32)
    new_w, mask = sparsegpt_prune(w, hessian_of(x), 0.0)
    assert mask.all()
    assert torch.equal(new_w, w)


def test_sparsegpt_keeps_dtype():
    x = correlated_inputs(256, 32)
    w = rand_weight(8, 32).to(torch.bfloat16)
    new_w, mask = sparsegpt_prune(w, hessian_of(x), 0.5)
    assert new_w.dtype == torch.bfloat16
    assert (new_w[~mask] == 0).all() and mask.sum().item() == 128


# --------------------------------------------------------------------------------------------------------------------
# nesting and zeros


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_masks_nested_as_sparsity_grows(method):
    w = rand_weight(16, 40, seed=19)
    act_sq = torch.exp(torch.randn(40, generator=_gen(20)))

    def mask_at(weight, s, p=Pattern()):
        return magnitude_mask(weight, s, p) if method == "magnitude" else wanda_mask(weight, act_sq, s, p)

    masks = [mask_at(w, s) for s in (0.0, 0.3, 0.5, 0.7, 0.9)]
    for lo, hi in zip(masks, masks[1:]):
        assert not (hi & ~lo).any()  # kept at the higher sparsity => kept at the lower one
        assert hi.sum() < lo.sum()
    assert not (mask_at(w, None, Pattern.nm(1, 4)) & ~mask_at(w, None, Pattern.nm(2, 4))).any()

    # pruning the pruned weight again at a higher sparsity only removes more
    m05 = mask_at(w, 0.5)
    m06 = mask_at(w * m05, 0.6)
    assert not (m06 & ~m05).any()
    assert torch.equal(m06, mask_at(w, 0.6))  # zeros go first, then the same ranking


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_zero_weights_pruned_first(method):
    d_out, d_in = 16, 40
    w = rand_weight(d_out, d_in, seed=21)
    g = _gen(22)
    for r in range(d_out):  # 16 of 40 (40%) exact zeros in every row
        w[r, torch.randperm(d_in, generator=g)[:16]] = 0.0
    zero = w == 0
    act_sq = torch.exp(torch.randn(d_in, generator=_gen(23)))

    def mask_at(s):
        return magnitude_mask(w, s) if method == "magnitude" else wanda_mask(w, act_sq, s)

    assert not (mask_at(0.5) & zero).any()  # sparsity above the zeros' share: every zero is pruned
    m = mask_at(0.25)  # below it: only zeros are pruned
    assert not (~m & ~zero).any()
    assert (~m).sum().item() == round(0.25 * w.numel())


# --------------------------------------------------------------------------------------------------------------------
# dead inputs and Cholesky


@pytest.mark.parametrize("setting", [0.5, 0.2, "2:4"])
def test_sparsegpt_dead_inputs(setting):
    d_in = 32
    x = correlated_inputs(512, d_in, seed=24)
    dead = [3, 10, 11, 31]
    x[:, dead] = 0.0
    h = hessian_of(x)
    assert (torch.diag(h)[dead] == 0).all()
    w = rand_weight(8, d_in, seed=25)
    p = Pattern.parse(setting) if isinstance(setting, str) else Pattern()
    new_w, mask = sparsegpt_prune(w, h, None if p.is_nm else setting, p)
    assert torch.isfinite(new_w).all()
    assert (new_w[:, dead] == 0).all()
    alive = [j for j in range(d_in) if j not in dead]
    assert (new_w[:, alive] != 0).any()
    # the dead columns cost nothing: pruning them is free in the output error
    assert output_error(w, new_w, x) < output_error(w, w * magnitude_mask(w, 0.5), x)


def _indefinite_hessian(d, neg_eig, seed=26):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed)))
    eig = torch.ones(d)
    eig[0] = neg_eig
    return (q * eig) @ q.T


@pytest.mark.parametrize("neg_eig,retries", [(-0.05, 1), (-0.5, 2)])
def test_sparsegpt_cholesky_retry(neg_eig, retries):
    h = _indefinite_hessian(32, neg_eig)
    damp = 0.01 * torch.diag(h).mean()
    assert torch.linalg.cholesky_ex(h + damp * torch.eye(32)).info.item() != 0  # 1% damping is not enough
    w = rand_weight(8, 32, seed=27)
    stats = {}
    new_w, mask = sparsegpt_prune(w, h, 0.5, stats=stats)
    assert stats["cholesky_retries"] == retries >= 1
    assert stats["damp"] == pytest.approx(float(damp) * 10**retries, rel=1e-5)
    assert torch.isfinite(new_w).all()
    assert mask.sum().item() == 128 and (new_w[~mask] == 0).all()


def test_sparsegpt_healthy_hessian_no_retry_and_stats_accumulate():
    x = correlated_inputs(512, 32)
    w = rand_weight(8, 32)
    stats = {}
    sparsegpt_prune(w, hessian_of(x), 0.5, stats=stats)
    assert stats["cholesky_retries"] == 0
    stats = {"cholesky_retries": 3}
    sparsegpt_prune(w, _indefinite_hessian(32, -0.05), 0.5, stats=stats)
    assert stats["cholesky_retries"] == 4  # added to the value present


# --------------------------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("setting", [0.6, "2:4"])
def test_determinism(setting):
    p = Pattern.parse(setting) if isinstance(setting, str) else Pattern()
    s = None if p.is_nm else setting
    x = correlated_inputs(512, 64)
    w = rand_weight(16, 64)
    act_sq, h = (x**2).sum(0), hessian_of(x)
    a, b = sparsegpt_prune(w, h, s, p), sparsegpt_prune(w.clone(), h.clone(), s, p)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(wanda_mask(w, act_sq, s, p), wanda_mask(w.clone(), act_sq.clone(), s, p))
    assert torch.equal(magnitude_mask(w, s, p), magnitude_mask(w.clone(), s, p))


def test_ties_broken_by_position():
    w = torch.ones(2, 8)
    assert torch.equal(magnitude_mask(w, 0.5, per="row"), torch.tensor([[True] * 4 + [False] * 4] * 2))
    assert torch.equal(wanda_mask(w, torch.ones(8), None, Pattern.nm(2, 4)), torch.tensor([[True, True, False, False] * 2] * 2))


# --------------------------------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_bad_sparsity(s):
    w, x = rand_weight(8, 16), correlated_inputs(64, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        magnitude_mask(w, s)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        wanda_mask(w, (x**2).sum(0), s)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        sparsegpt_prune(w, hessian_of(x), s)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_bad_nm(method):
    rule = get_rule(method)
    x = correlated_inputs(64, 16)
    stat = {None: None, "act_sq": (x**2).sum(0), "hessian": hessian_of(x)}[rule.statistic]
    with pytest.raises(ValueError, match="0 < N < M"):
        rule.prune(rand_weight(8, 16), stat, None, Pattern.parse("4:4"), {})
    with pytest.raises(ValueError, match="contradicts"):
        rule.prune(rand_weight(8, 16), stat, 0.3, Pattern.nm(2, 4), {})
    # in_features not a multiple of M
    x = correlated_inputs(64, 30)
    stat = {None: None, "act_sq": (x**2).sum(0), "hessian": hessian_of(x)}[rule.statistic]
    with pytest.raises(ValueError, match="multiple of M=4"):
        rule.prune(rand_weight(8, 30), stat, None, Pattern.nm(2, 4), {})


def test_unknown_method():
    with pytest.raises(ValueError, match="foo") as e:
        get_rule("foo")
    for name in ("magnitude", "sparsegpt", "wanda"):
        assert name in str(e.value)
    assert set(pruners.METHODS) == {"magnitude", "wanda", "sparsegpt"}
    assert {n: r.statistic for n, r in pruners.METHODS.items()} == {"magnitude": None, "wanda": "act_sq", "sparsegpt": "hessian"}


@pytest.mark.parametrize("shape", [(17,), (1, 16), (15,), ()])
def test_wanda_act_sq_shape(shape):
    with pytest.raises(ValueError, match="act_sq"):
        wanda_mask(rand_weight(8, 16), torch.ones(shape), 0.5)


@pytest.mark.parametrize("shape", [(15, 15), (16, 17), (16,)])
def test_sparsegpt_hessian_shape(shape):
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(rand_weight(8, 16), torch.ones(shape), 0.5)


def test_sparsegpt_blocksize_multiple_of_m():
    x = correlated_inputs(64, 16)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(rand_weight(8, 16), hessian_of(x), None, Pattern.nm(2, 8), blocksize=12)
