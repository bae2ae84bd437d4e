"""The compact sparse form (losa/export.py) and the speed measurement (losa/speed.py) on tiny models."""

from __future__ import annotations

import math

import pytest
import torch

from losa import export
from losa.speed import measure


def _sparse(model, fraction: float = 0.7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in export.prunable_weights(model):
        w = params[name]
        w.data[torch.rand(w.shape, generator=gen) < fraction] = 0
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 13), (16, 64), (1, 7)])
def test_bitmask_round_trip_is_exact_and_sized_by_the_non_zeros(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen).to(dtype)
    w[torch.rand(shape, generator=gen) < 0.6] = 0
    parts = export.bitmask_compress(w)
    assert torch.equal(export.bitmask_decompress(parts), w) and export.bitmask_decompress(parts).dtype == dtype
    rows, cols = shape
    assert parts["compressed"].numel() == int((w != 0).sum())
    assert tuple(parts["bitmask"].shape) == (rows, math.ceil(cols / 8)) and parts["bitmask"].dtype == torch.uint8
    assert parts["row_offsets"].tolist() == [int((w[:r] != 0).sum()) for r in range(rows)]
    with pytest.raises(ValueError, match="2-D"):
        export.bitmask_compress(torch.zeros(3))


def test_sparse_form_restores_the_model_exactly(tmp_path):
    from tiny_models import tiny_llama

    model = _sparse(tiny_llama(tie_word_embeddings=True))
    meta = export.save_sparse(model, None, tmp_path / "fp16", "float16")
    restored, _ = export.load_sparse(tmp_path / "fp16")
    ref = {k: v.half() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in restored.state_dict().items())
    assert restored.lm_head.weight.data_ptr() == restored.model.embed_tokens.weight.data_ptr()  # tied, stored once
    nnz = sum(int((dict(model.named_parameters())[n] != 0).sum()) for n in export.prunable_weights(model))
    assert meta["nnz"] == nnz and 0.6 < meta["sparsity_config"]["global_sparsity"] < 0.8
    assert meta["bytes_sparse"] < meta["bytes_dense"] and meta["ratio_prunable"] < 0.5
    # fp32 in, fp32 out: the original weights themselves
    export.save_sparse(model, None, tmp_path / "fp32", "float32")
    again, _ = export.load_sparse(tmp_path / "fp32")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_speed_reports_finite_figures_and_agreeing_logits(monkeypatch):
    from tiny_models import tiny_llama_gqa

    monkeypatch.delenv("LOSA_DEEPSPARSE_PYTHON", raising=False)
    dense = tiny_llama_gqa()  # grouped-query attention, as SmolLM2 and LLaMA-3 (exported with eager attention)
    sparse = _sparse(tiny_llama_gqa())
    r = measure(sparse, dense, prefill=8, decode=2, repeats=1,
                engines=("torch", "csr", "onnxruntime", "deepsparse", "cuda", "cuda_2:4"))
    for engine in ("torch", "csr", "onnxruntime"):
        e = r["engines"][engine]
        assert e["available"] and e["prefill_ms"] > 0 and math.isfinite(e["decode_ms"]) and e["decode_ms"] > 0
        assert e["max_abs_diff"] < 1e-3  # the same model, whatever runs it
    assert r["engines"]["deepsparse"] == {"available": False, "reason": r["engines"]["deepsparse"]["reason"]}
    assert "csr" not in r["dense"] and set(r["dense"]) == {"torch", "onnxruntime", "deepsparse", "cuda"}
    if not torch.cuda.is_available():
        assert r["engines"]["cuda_2:4"] == {"available": False, "reason": "needs a CUDA device"}
    assert all(math.isfinite(v) and v > 0 for s in r["speedup"].values() for v in s.values())
    assert set(r["speedup"]) == {"torch", "csr", "onnxruntime"}
    with pytest.raises(ValueError, match="context"):
        measure(sparse, prefill=60, decode=8)  # the tiny model's context is 64
    with pytest.raises(ValueError, match="unknown engine"):
        measure(sparse, prefill=8, decode=2, engines=("tensorrt",))
