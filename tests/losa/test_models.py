"""Model adapters: family selection, block/linear discovery, and replaying blocks one at a time."""

import pytest
import torch
from torch import nn

from losa.models import ADAPTERS, capture_first_block_inputs, get_adapter, run_block
from tiny_models import FAMILY, LAYERS, MODEL_TYPE, calibration_ids, tiny_llama, tiny_opt

EXPECTED_LINEARS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
}


def test_adapter_discovery(tiny_family):
    name, model = tiny_family
    assert model.config.model_type == MODEL_TYPE[name]
    adapter = get_adapter(model)
    assert adapter.family == FAMILY[name]
    blocks = adapter.get_blocks(model)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == model.config.num_hidden_layers == LAYERS
    for block in blocks:
        linears = adapter.get_linears(block)
        assert set(linears) == EXPECTED_LINEARS[adapter.family]
        for lin in linears.values():
            assert isinstance(lin, nn.Linear)
    found = list(adapter.iter_linears(model))
    assert len(found) == LAYERS * len(EXPECTED_LINEARS[adapter.family])
    # every nn.Linear inside the blocks is a prunable one (nothing missed), and lm_head is not among them
    in_blocks = {id(m) for m in blocks.modules() if isinstance(m, nn.Linear)}
    assert in_blocks == {id(lin) for _, _, lin in found}
    assert id(model.lm_head) not in in_blocks
    assert adapter.get_embeddings(model)  # at least the token embedding


def test_gqa_shapes():
    model = tiny_llama(kv_heads=2)
    adapter = get_adapter(model)
    lin = adapter.get_linears(adapter.get_blocks(model)[0])
    assert lin["self_attn.k_proj"].out_features == lin["self_attn.q_proj"].out_features // 2


@torch.no_grad()
def test_block_replay_matches_model(tiny_family):
    name, model = tiny_family
    adapter = get_adapter(model)
    ids = calibration_ids(3, 16)
    hidden, kwargs = capture_first_block_inputs(model, ids, torch.device("cpu"))
    assert hidden.shape == (3, 16, model.config.hidden_size)
    assert not any(k in kwargs for k in ("past_key_value", "past_key_values", "use_cache", "hidden_states"))
    ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states  # (embeddings, block 0, ..., final norm)
    assert len(ref) == LAYERS + 1
    torch.testing.assert_close(hidden, ref[0], atol=1e-6, rtol=0)
    inputs, outs = [hidden], []
    for block in adapter.get_blocks(model):
        hidden = run_block(block, hidden, kwargs)
        outs.append(hidden)
        inputs.append(hidden)
    for i in range(LAYERS - 1):  # HF applies the final norm to the last element, so compare intermediate ones
        torch.testing.assert_close(outs[i], ref[i + 1], atol=1e-5, rtol=0)
    for i in range(LAYERS):
        assert not torch.allclose(outs[i], inputs[i], atol=1e-3)  # every block changes the stream
    final_norm = model.model.decoder.final_layer_norm if FAMILY[name] == "opt" else model.model.norm
    torch.testing.assert_close(final_norm(outs[-1]), ref[-1], atol=1e-5, rtol=0)


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="gpt2") as e:
        get_adapter(model)
    for t in ADAPTERS:
        assert t in str(e.value)
    with pytest.raises(ValueError, match="unsupported"):
        get_adapter(nn.Linear(4, 4))  # no config at all


def test_selection_by_model_type_not_name():
    model = tiny_llama()
    model.config.name_or_path = "facebook/opt-foo"
    model.config._name_or_path = "facebook/opt-foo"
    assert get_adapter(model).family == "llama"
    opt = tiny_opt()
    opt.config._name_or_path = "meta-llama/Llama-2-7b"
    assert get_adapter(opt).family == "opt"
