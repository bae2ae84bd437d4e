"""losa.prune_model end to end on tiny random-init models: sparsity, patterns, propagation, errors, report."""

import copy
import json

import pytest
import torch

from losa import Pattern, prune_model
from losa.models import get_adapter
from losa.pruners import sparsegpt_prune, wanda_mask
from tiny_models import BUILDERS, LAYERS, calibration_ids, tiny_llama_gqa

METHODS = ["magnitude", "wanda", "sparsegpt"]
ALL_FAMILIES = sorted(BUILDERS)
TWO_FAMILIES = ["llama_gqa", "opt"]


def prunable(model) -> dict:
    """(block, name) -> the linear's weight (live tensor)."""
    return {(b, n): lin.weight for b, n, lin in get_adapter(model).iter_linears(model)}


def other_params(model) -> dict:
    """Every parameter that is not a prunable linear's weight (embeddings, lm_head, norms, biases), cloned."""
    skip = {id(w) for w in prunable(model).values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in skip}


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def zero_fraction(w) -> float:
    return (w == 0).sum().item() / w.numel()


# --------------------------------------------------------------------------------------------------------------------
# achieved sparsity


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_sparsity(method, family, calib8):
    s = 0.6
    model = BUILDERS[family]()
    before = other_params(model)
    use_cache = model.config.use_cache
    report = prune_model(model, calib8, method, s)
    weights = prunable(model)
    assert len(report.layers) == len(weights) == LAYERS * len(get_adapter(model).linears)
    for rec in report.layers:
        w = weights[(rec.block, rec.name)]
        assert rec.shape == tuple(w.shape)
        assert rec.target == s and rec.pattern == "unstructured"
        assert rec.sparsity == pytest.approx(zero_fraction(w), abs=1e-12)
        d_in = w.shape[1]
        assert abs(rec.sparsity - s) <= 1.0 / d_in
        if method == "wanda":  # exact per row
            assert ((w == 0).sum(1) == d_in - round((1 - s) * d_in)).all()
        else:  # one count per matrix (per 128-column block for sparsegpt; every d_in here is <= 128)
            assert (w != 0).sum().item() == round((1 - s) * w.numel())
    assert abs(report.sparsity - s) < 0.01
    assert report.targets == [s] * LAYERS and report.method == method and report.propagation == "pruned"
    assert report.n_samples == 8 and report.seqlen == 16
    assert len(report.block_errors) == LAYERS and all(e > 0 for e in report.block_errors)
    assert_same(before, other_params(model))  # embeddings, lm_head, norms, biases untouched
    assert model.config.use_cache == use_cache


def test_per_block_rates(calib8):
    model = BUILDERS["llama_gqa"]()
    report = prune_model(model, calib8, "wanda", [0.3, 0.7])
    assert report.targets == [0.3, 0.7]
    assert report.block_sparsity == pytest.approx([0.3, 0.7], abs=1 / 32)
    for (b, _), w in prunable(model).items():
        d_in = w.shape[1]
        assert ((w == 0).sum(1) == d_in - round((1 - [0.3, 0.7][b]) * d_in)).all()
    assert report.sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("kwargs", [
    dict(sparsity=[0.5]),
    dict(sparsity=[0.3, 0.5, 0.7]),
    dict(sparsity=None, pattern=["2:4"]),
    dict(sparsity=None, pattern=["2:4", "2:4", "2:4"]),
    dict(sparsity=[0.5, 1.0]),
    dict(sparsity=0.6, pattern="2:4"),      # contradicts the pattern
    dict(sparsity=None, pattern="2:64"),    # in_features 32 is not a multiple of 64
])
def test_bad_per_block_values_raise_before_any_change(kwargs, calib8):
    model = BUILDERS["llama_gqa"]()
    before = snapshot(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError):
        prune_model(model, calib8, "sparsegpt", **kwargs)
    assert calls == []  # no forward pass was run
    assert_same(before, snapshot(model))


# --------------------------------------------------------------------------------------------------------------------
# N:M


@pytest.mark.parametrize("family", TWO_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_nm_2_4(method, family, calib8):
    model = BUILDERS[family]()
    report = prune_model(model, calib8, method, None, "2:4")
    for w in prunable(model).values():
        assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all()
    assert report.patterns == ["2:4"] * LAYERS and report.targets == [0.5] * LAYERS
    assert report.sparsity == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_nm_per_block(method, calib8):
    model = BUILDERS["llama_gqa"]()
    report = prune_model(model, calib8, method, None, ["2:8", "4:8"])
    kept = {0: 2, 1: 4}
    for (b, _), w in prunable(model).items():
        assert ((w.reshape(-1, 8) != 0).sum(1) == kept[b]).all()
    assert report.patterns == ["2:8", "4:8"]
    assert report.targets == [0.75, 0.5]
    assert report.block_sparsity == pytest.approx([0.75, 0.5], abs=1e-12)


def test_nm_accepts_agreeing_sparsity_and_pattern_objects(calib8):
    model = BUILDERS["opt"]()
    report = prune_model(model, calib8, "wanda", 0.5, Pattern.nm(2, 4))
    assert report.patterns == ["2:4"] * LAYERS
    for w in prunable(model).values():
        assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all()


# --------------------------------------------------------------------------------------------------------------------
# propagation


def _act_sq_of_block(model, calib, block: int) -> dict:
    """Sum over tokens of x^2 at the inputs of one block's linears, from a plain forward of ``model``."""
    acc, hooks = {}, []
    adapter = get_adapter(model)
    for name, lin in adapter.get_linears(adapter.get_blocks(model)[block]).items():
        def hook(mod, inp, out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).float()
            acc[name] = acc.get(name, 0) + (x * x).sum(0)
        hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    return acc


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_propagation_modes(family, calib8):
    s = 0.7
    dense = BUILDERS[family]()
    m_pruned, m_dense = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(m_pruned, calib8, "wanda", s, propagation="pruned")
    r_dense = prune_model(m_dense, calib8, "wanda", s, propagation="dense")
    assert r_dense.propagation == "dense"
    wp, wd, w0 = prunable(m_pruned), prunable(m_dense), prunable(dense)
    for key in wp:
        if key[0] == 0:  # block 0 sees the same inputs in both modes
            assert torch.equal(wp[key], wd[key]), key
    assert any(not torch.equal(wp[k], wd[k]) for k in wp if k[0] == 1)

    # dense mode: block 1's masks are Wanda's masks from the dense model's own block-1 inputs
    act = _act_sq_of_block(dense, calib8, 1)
    for (b, name), w in wd.items():
        if b == 1:
            assert torch.equal(w != 0, wanda_mask(w0[(b, name)], act[name], s)), name

    # pruned mode: block 1's masks come from its inputs with block 0 pruned (and block 1 itself still dense)
    half = copy.deepcopy(dense)
    for (b, name), w in prunable(half).items():
        if b == 0:
            w.data.copy_(wp[(b, name)])
    act = _act_sq_of_block(half, calib8, 1)
    for (b, name), w in wp.items():
        if b == 1:
            assert torch.equal(w != 0, wanda_mask(w0[(b, name)], act[name], s)), name


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_sparsegpt_uses_the_block_hessian(family, calib8):
    """Block 0 (and block 1 in dense mode): the driver's result is SparseGPT on H = 2 X^T X / n of the layer inputs."""
    dense = BUILDERS[family]()
    model = copy.deepcopy(dense)
    prune_model(model, calib8, "sparsegpt", 0.6, propagation="dense")
    xs, hooks = {}, []

    def keep_input(key):
        def hook(mod, inp, out):
            xs[key] = inp[0].reshape(-1, inp[0].shape[-1]).float()
        return hook

    for b, name, lin in get_adapter(dense).iter_linears(dense):
        hooks.append(lin.register_forward_hook(keep_input((b, name))))
    with torch.no_grad():
        dense(calib8, use_cache=False)
    for h in hooks:
        h.remove()
    w0, w1 = prunable(dense), prunable(model)
    for key, x in xs.items():
        assert x.shape[0] == 8 * 16
        expected, mask = sparsegpt_prune(w0[key], 2.0 * x.T @ x / x.shape[0], 0.6)
        assert torch.equal(w1[key] != 0, mask), key
        torch.testing.assert_close(w1[key], expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# reconstruction error


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_zero_error(method, calib8):
    model = BUILDERS["llama_gqa"]()
    before = snapshot(model)
    report = prune_model(model, calib8, method, 0.0)
    assert all(abs(e) < 1e-10 for e in report.block_errors)
    assert report.sparsity == 0.0
    assert_same(before, snapshot(model))  # nothing pruned, nothing updated


def _block_outputs(model, calib) -> list:
    outs, hooks = [], []
    for block in get_adapter(model).get_blocks(model):
        hooks.append(block.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_block_errors_match_definition(family, calib8):
    """Pruned propagation: L_l = mean_c sum_{n,s} (Y_dense - Y_sparse)^2 / sum_{n,s} Y_dense^2 at every block."""
    dense = BUILDERS[family]()
    model = copy.deepcopy(dense)
    report = prune_model(model, calib8, "wanda", 0.5, batch_size=3)
    for l, (ref, out) in enumerate(zip(_block_outputs(dense, calib8), _block_outputs(model, calib8))):
        ref, out = ref.double(), out.double()
        expected = (((ref - out) ** 2).sum((0, 1)) / (ref**2).sum((0, 1))).mean().item()
        assert report.block_errors[l] == pytest.approx(expected, rel=1e-3)
        assert expected > 1e-4


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_sparsegpt_error_below_magnitude(family, calib8):
    r = {m: prune_model(BUILDERS[family](), calib8, m, 0.7) for m in ("magnitude", "sparsegpt")}
    assert r["sparsegpt"].block_errors[0] < r["magnitude"].block_errors[0]  # identical inputs in block 0
    assert sum(r["sparsegpt"].block_errors) < sum(r["magnitude"].block_errors)


# --------------------------------------------------------------------------------------------------------------------
# batching, determinism


@pytest.mark.parametrize("family", TWO_FAMILIES)
def test_batch_size_invariance(family, calib8):
    a, b = BUILDERS[family](), BUILDERS[family]()
    ra = prune_model(a, calib8, "wanda", 0.6, batch_size=3)  # batches of 3, 3, 2
    rb = prune_model(b, calib8, "wanda", 0.6, batch_size=8)
    wa, wb = prunable(a), prunable(b)
    for k in wa:
        assert torch.equal(wa[k] == 0, wb[k] == 0), k
    assert ra.sparsity == rb.sparsity
    assert ra.block_errors == pytest.approx(rb.block_errors, rel=1e-4)


def test_determinism_sparsegpt(calib8):
    dense = BUILDERS["llama_gqa"]()
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    ra = prune_model(a, calib8, "sparsegpt", 0.6, batch_size=4)
    rb = prune_model(b, calib8, "sparsegpt", 0.6, batch_size=4)
    assert_same(snapshot(a), snapshot(b))
    assert ra.block_errors == rb.block_errors
    assert not torch.equal(prunable(a)[(0, "mlp.up_proj")], prunable(dense)[(0, "mlp.up_proj")])


# --------------------------------------------------------------------------------------------------------------------
# arguments and report


@pytest.mark.parametrize("method,sparsity,kwargs,calib_shape,match", [
    ("foo", 0.5, {}, (8, 16), "unknown pruning method"),
    ("wanda", 0.5, {"propagation": "foo"}, (8, 16), "propagation"),
    ("wanda", 1.2, {}, (8, 16), r"\[0, 1\)"),
    ("wanda", -0.1, {}, (8, 16), r"\[0, 1\)"),
    ("wanda", None, {}, (8, 16), r"\[0, 1\)"),
    ("wanda", 0.5, {}, (16,), "calibration"),
    ("wanda", 0.5, {}, (2, 8, 16), "calibration"),
    ("wanda", 0.5, {}, (0, 16), "calibration"),
    ("wanda", 0.5, {"batch_size": 0}, (8, 16), "batch_size"),
])
def test_bad_arguments_raise_before_compute(method, sparsity, kwargs, calib_shape, match):
    model = BUILDERS["llama_gqa"]()
    before = snapshot(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    calib = torch.zeros(calib_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        prune_model(model, calib, method, sparsity, **kwargs)
    assert calls == []
    assert_same(before, snapshot(model))


def test_unsupported_model_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="unsupported model_type"):
        prune_model(model, calibration_ids(2, 8) % 64, "wanda", 0.5)


def test_report_to_dict_is_json(calib8):
    report = prune_model(BUILDERS["opt"](), calib8, "sparsegpt", 0.5, batch_size=4)
    d = report.to_dict()
    back = json.loads(json.dumps(d))
    for key in ("sparsity", "block_errors", "timings", "cholesky_retries", "block_sparsity", "layers", "targets"):
        assert key in back
    assert back["sparsity"] == pytest.approx(report.sparsity) == pytest.approx(0.5, abs=0.01)
    assert back["block_errors"] == pytest.approx(report.block_errors) and len(back["block_errors"]) == LAYERS
    assert back["cholesky_retries"] == 0
    assert back["timings"]["total"] >= back["timings"]["prune"] > 0
    assert len(back["layers"]) == len(report.layers)
    assert back["layers"][0]["shape"] == list(report.layers[0].shape)


# ---- what LoSA needs from the engine: a fixed dense reference and per-block Gram matrices


def _hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states


def test_dense_block_outputs_are_the_models_hidden_states():
    from losa.calibration import dense_block_outputs

    model = tiny_llama_gqa()
    ids = calibration_ids(6, 16)
    outs = dense_block_outputs(model, ids, batch_size=4)
    hidden = _hidden_states(model, ids)
    assert len(outs) == 2 and [o.shape[0] for o in outs[0]] == [4, 2]
    assert torch.allclose(torch.cat(outs[0]), hidden[1], atol=1e-5)


def test_reference_replaces_the_models_own_unpruned_outputs():
    from losa.calibration import dense_block_outputs

    ids = calibration_ids(8, 16)
    original = tiny_llama_gqa()
    reference = dense_block_outputs(original, ids, batch_size=4)
    # a model that differs from the reference (as LoSA's merged model at step t > 1 does)
    a, b = tiny_llama_gqa(), tiny_llama_gqa()
    for m in (a, b):
        with torch.no_grad():
            m.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    own = prune_model(a, ids, "wanda", 0.5, batch_size=4)
    ref = prune_model(b, ids, "wanda", 0.5, batch_size=4, reference=reference)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # same pruning
    assert ref.block_errors[0] > own.block_errors[0]  # measured against the original, the change itself counts
    with pytest.raises(ValueError, match="reference"):
        prune_model(tiny_llama_gqa(), ids, "wanda", 0.5, batch_size=3, reference=reference)


def test_block_input_grams_match_the_hidden_states():
    from losa.calibration import block_input_grams

    model = tiny_llama_gqa()
    ids = calibration_ids(6, 16)
    grams = block_input_grams(model, ids, batch_size=4)
    hidden = _hidden_states(model, ids)
    for layer, g in enumerate(grams):
        x = hidden[layer].reshape(6, -1).double()
        assert torch.allclose(g, x @ x.T, rtol=1e-6, atol=1e-6)


def test_skipping_reconstruction_errors_prunes_identically():
    ids = calibration_ids(8, 16)
    a, b = tiny_llama_gqa(), tiny_llama_gqa()
    with_err = prune_model(a, ids, "sparsegpt", 0.6, batch_size=4)
    without = prune_model(b, ids, "sparsegpt", 0.6, batch_size=4, reconstruction_error=False)
    assert len(with_err.block_errors) == 2 and without.block_errors == []
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
