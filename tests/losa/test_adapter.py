"""Masked LoRA on stock peft (losa/adapter.py): hook in use, mask invariants, active ranks, DSA unmerge, save/load."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import tiny_llama_gqa, tiny_opt
from torch import nn

from losa.adapter import (
    MaskedLoraConfig,
    MaskedLoraLinear,
    MaskedLoraVariant,
    load_masked_adapter,
    make_masked_lora,
    masked_delta,
    masked_layers,
    merge_into_base,
    set_active_ranks,
    unmerge_with_new_mask,
    verify_merged,
    weight_masks,
)
from losa.models import get_adapter

BUILDERS = {"llama_gqa": tiny_llama_gqa, "opt": tiny_opt}
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def pruned_model(family="llama_gqa", rate=0.5, seed=0):
    """A tiny model whose prunable linears lose ``rate`` of their weights at random; deterministic in ``seed``."""
    model = BUILDERS[family]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, lin in get_adapter(model).iter_linears(model):
            lin.weight.mul_(torch.rand(lin.weight.shape, generator=g) >= rate)
    return model


def randomize(pm, seed=1, std=0.3):
    """peft initialises B = 0 (a no-op adapter); give A and B random values so every check has something to see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in masked_layers(pm):
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=g) * std)
    return pm


def masked_pm(family="llama_gqa", **kwargs):
    model = pruned_model(family)
    masks = weight_masks(model)
    return randomize(make_masked_lora(model, **kwargs)).eval(), masks


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_every_prunable_linear_gets_the_masked_variant_and_lm_head_is_untouched():
    pm, masks = masked_pm()
    base = pm.get_base_model()
    layers = list(get_adapter(base).iter_linears(base, unwrap=False))
    assert len(layers) == 2 * 7
    for i, name, layer in layers:
        assert type(layer) is MaskedLoraLinear, f"peft did not use the registered layer for {i} {name}"
        assert isinstance(layer.lora_variant["default"], MaskedLoraVariant)
        assert layer.active_rank["default"] == 8 == layer.r["default"]
        assert torch.equal(layer.sparsity_mask["default"], masks[(i, name)])
    assert type(base.lm_head) is nn.Linear
    assert sum(isinstance(m, BaseTunerLayer) for m in pm.modules()) == len(layers)
    assert not any("sparsity_mask" in k for k in pm.state_dict())  # a non-persistent buffer, never saved


def test_plain_lora_in_the_same_process_stays_vanilla():
    make_masked_lora(pruned_model())  # registers the custom layer on its own config first
    plain = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    assert plain._custom_modules is None
    pm = get_peft_model(tiny_llama_gqa(seed=1), plain)
    lora_layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer)]
    assert len(lora_layers) == 2 * 2
    for m in lora_layers:
        assert type(m) is PeftLoraLinear and m.lora_variant == {} and not hasattr(m, "sparsity_mask")


def test_masked_config_without_registration_fails_loudly():
    with pytest.raises(ValueError, match="masked"):
        get_peft_model(pruned_model(), MaskedLoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_output_equals_merged_output_and_merge_keeps_the_zero_pattern(family):
    pm, masks = masked_pm(family)
    y = logits(pm)
    with pm.disable_adapter():
        assert not torch.allclose(logits(pm), y, atol=1e-3)  # the adapter does change the output
    merged = pm.merge_and_unload()
    assert torch.allclose(logits(merged), y, atol=1e-5, rtol=1e-5)
    after = weight_masks(merged)
    for key, mask in masks.items():
        assert torch.equal(after[key], mask), key
    verify_merged(merged, masks)


def test_verify_merged_reports_weights_outside_the_mask():
    model = pruned_model()
    masks = weight_masks(model)
    verify_merged(model, masks)
    lin = get_adapter(model).get_blocks(model)[1].mlp.down_proj
    i, j = (~masks[(1, "mlp.down_proj")]).nonzero()[0].tolist()
    with torch.no_grad():
        lin.weight[i, j] = 1.0
    with pytest.raises(ValueError, match="block 1 mlp.down_proj"):
        verify_merged(model, masks)


def test_lora_gradients_only_see_the_masked_product():
    pm, masks = masked_pm(dropout=0.0)
    set_active_ranks(pm, [5, 8])
    layer = get_adapter(pm.get_base_model()).get_blocks(pm.get_base_model())[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    r, s, M = 5, layer.scaling["default"], masks[(0, "self_attn.q_proj")]
    x = torch.randn(6, A.shape[1], generator=torch.Generator().manual_seed(2))
    out = layer(x)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    gA, gB = torch.autograd.grad((out * gy).sum(), [A, B])
    G = gy.T @ x  # (d_out, d_in): dL/dW for a weight used as F.linear(x, W)
    grad_product = s * G * M  # dL/d(B_r A_r): zero outside the mask
    assert torch.allclose(gB[:, :r], grad_product @ A[:r].T.detach(), atol=1e-5)
    assert torch.allclose(gA[:r], B[:, :r].T.detach() @ grad_product, atol=1e-5)
    assert not torch.allclose(gB[:, :r], (s * G) @ A[:r].T.detach(), atol=1e-3)  # an unmasked update would differ
    assert gB[:, r:].abs().max() == 0 and gA[r:].abs().max() == 0


def test_training_steps_keep_the_merged_update_inside_the_mask():
    pm, masks = masked_pm()
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        pm(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    merged = pm.eval().merge_and_unload()
    verify_merged(merged, masks)
    assert all(torch.equal(m, masks[k]) for k, m in weight_masks(merged).items())


def test_merge_then_unmerge_restores_the_base_weights():
    pm, masks = masked_pm()
    before = {k: w.clone() for k, w in _weights(pm).items()}
    merge_into_base(pm)
    assert all(not torch.equal(w, before[k]) for k, w in _weights(pm).items())
    verify_merged(pm, masks)
    pm.unmerge_adapter()
    for k, w in _weights(pm).items():
        assert torch.allclose(w, before[k], atol=1e-6) and torch.equal(w == 0, before[k] == 0), k


def _weights(pm):
    return {(i, n): layer.get_base_layer().weight.detach() for i, n, layer in masked_layers(pm)}


def test_rank_slices_beyond_the_active_rank_are_ignored():
    pm, _ = masked_pm()
    set_active_ranks(pm, [3, 5])
    y = logits(pm)
    with torch.no_grad():
        for i, _, layer in masked_layers(pm):
            r = [3, 5][i]
            layer.lora_B["default"].weight[:, r:].normal_()
            layer.lora_A["default"].weight[r:, :].normal_()
    assert torch.allclose(logits(pm), y, atol=1e-6)
    with torch.no_grad():
        for _, _, layer in masked_layers(pm):
            layer.lora_B["default"].weight[:, :1].normal_()
    assert not torch.allclose(logits(pm), y, atol=1e-3)
    set_active_ranks(pm, {0: 0})  # rank 0: block 0 adds nothing
    for i, _, layer in masked_layers(pm):
        assert (masked_delta(layer, "default") == 0).all() == (i == 0)


def test_ranks_above_the_physical_rank_raise_or_are_clipped_and_reported():
    pm, _ = masked_pm()
    with pytest.raises(ValueError, match="physical rank"):
        set_active_ranks(pm, [9, 2])
    assert all(layer.active_rank["default"] == 8 for _, _, layer in masked_layers(pm))  # nothing half-applied
    for bad in ([-1, 2], [2], {5: 2}):
        with pytest.raises(ValueError):
            set_active_ranks(pm, bad)
    assert set_active_ranks(pm, [12, 2], clip=True) == {0: (12, 8)}
    assert {i: layer.active_rank["default"] for i, _, layer in masked_layers(pm)} == {0: 8, 1: 2}
    assert pm.peft_config["default"].active_ranks == {0: 8, 1: 2}
    merge_into_base(pm)
    with pytest.raises(RuntimeError, match="merged"):
        set_active_ranks(pm, [1, 1])
    pm16, _ = masked_pm(r_max=16)
    assert set_active_ranks(pm16, [12, 2]) == {}
    assert {i: layer.active_rank["default"] for i, _, layer in masked_layers(pm16)} == {0: 12, 1: 2}


def test_dsa_merge_prune_unmerge_keeps_pruned_entries_zero_and_the_function_unchanged():
    pm, _ = masked_pm()
    merge_into_base(pm)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # DSA step 4 stand-in: prune 30% more of the merged weights (old zeros stay zero)
        for _, _, layer in masked_layers(pm):
            w = layer.get_base_layer().weight
            w.mul_(torch.rand(w.shape, generator=g) >= 0.3)
    new_masks = weight_masks(pm)
    pruned_merged = {k: w.clone() for k, w in _weights(pm).items()}
    y_pruned_merged = logits(pm)  # merged layers run the base weight only
    assert unmerge_with_new_mask(pm, ranks=[4, 6]) == {}
    for i, name, layer in masked_layers(pm):
        w, m = layer.get_base_layer().weight, new_masks[(i, name)]
        assert not layer.merged and torch.equal(layer.sparsity_mask["default"], m)
        assert (w[~m] == 0).all() and not torch.allclose(w, pruned_merged[(i, name)])
        assert layer.active_rank["default"] == [4, 6][i]
    assert torch.allclose(logits(pm), y_pruned_merged, atol=1e-5, rtol=1e-5)
    merged = pm.merge_and_unload()
    verify_merged(merged, new_masks)
    for k, w in weight_masks(merged).items():
        assert torch.equal(w, new_masks[k])


def test_save_and_load_round_trip(tmp_path):
    pm, _ = masked_pm()
    set_active_ranks(pm, [3, 7])
    y = logits(pm)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["masked"] is True and saved["active_ranks"] == {"0": 3, "1": 7}
    loaded = load_masked_adapter(pruned_model(), tmp_path).eval()
    assert all(type(layer) is MaskedLoraLinear for _, _, layer in get_adapter(pruned_model()).iter_linears(
        loaded.get_base_model(), unwrap=False))
    assert [layer.active_rank["default"] for _, _, layer in masked_layers(loaded)] == [3] * 7 + [7] * 7
    assert torch.allclose(logits(loaded), y, atol=1e-6)
    vanilla = PeftModel.from_pretrained(pruned_model(), tmp_path).eval()  # without re-registration: plain LoRA
    assert not list(masked_layers(vanilla)) and not torch.allclose(logits(vanilla), y, atol=1e-3)


def test_masked_delta_in_half_precision_on_cpu_keeps_dtype_and_exact_zeros():
    model = pruned_model().to(torch.bfloat16)
    masks = weight_masks(model)
    pm = randomize(make_masked_lora(model)).to(torch.bfloat16).eval()  # peft upcasts adapters to fp32: undo that
    i, name, layer = next(iter(masked_layers(pm)))
    assert layer.lora_B["default"].weight.dtype == torch.bfloat16 and layer.sparsity_mask["default"].dtype == torch.bool
    delta = masked_delta(layer, "default")
    A, B = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    expected = (B @ A) * masks[(i, name)] * layer.scaling["default"]
    assert delta.dtype == torch.bfloat16 and torch.allclose(delta.float(), expected, rtol=1e-2, atol=1e-3)
    assert (delta[~masks[(i, name)]] == 0).all()
    x = torch.randn(3, A.shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        ref = F.linear(x, layer.get_base_layer().weight) + F.linear(x, delta)
    assert torch.allclose(out.float(), ref.float(), atol=5e-2)


def test_masked_product_gradients_match_autograd():
    from losa.adapter import _MaskedLoraProduct

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 12, generator=g) > 0.5
    assert torch.autograd.gradcheck(lambda x, a, b: _MaskedLoraProduct.apply(x, a, b, mask, 2.0), (x, a, b))
    y = _MaskedLoraProduct.apply(x, a, b, mask, 2.0)
    ref = x @ (2.0 * torch.where(mask, b @ a, 0.0)).T
    assert torch.allclose(y, ref)
