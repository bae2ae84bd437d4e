"""tasks/store.py: the content-addressed artifact store (safetensors + manifest) and its stage keys."""

import json
from pathlib import Path

import pytest
import torch

from tasks.store import ArtifactStore, Ref, digest, stage_key


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def test_put_then_get_and_tensors_round_trip(store):
    tensors = {"w.0.q": torch.arange(6, dtype=torch.float32).reshape(2, 3), "ranks": torch.tensor([1, 2])}
    ref = store.put("prune", "ab" * 32, {"sparsity": (0.5, 0.7)}, tensors, {"adapter": "none"}, seconds=lambda: 1.5)
    assert ref.info == {"sparsity": [0.5, 0.7]}  # JSON types, as a reader will see them
    assert store.get(ref.key) == ref
    got, meta = store.tensors(ref)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert meta == {"adapter": "none"}
    size = Path(store._dir(ref.key), "tensors.safetensors").stat().st_size
    assert store.computed() == [{"stage": "prune", "key": ref.key, "seconds": 1.5, "time": store.computed()[0]["time"],
                                 "bytes": size}]


def test_content_hash_is_of_the_bytes_and_of_the_info_without_tensors(store):
    a = store.put("x", "a" * 64, {}, {"t": torch.ones(3)})
    b = store.put("x", "b" * 64, {"other": "info"}, {"t": torch.ones(3)})
    assert a.sha256 == b.sha256  # same tensors, same content hash, whatever the key or info
    c = store.put("perplexity", "c" * 64, {"ppl": 12.5})
    assert c.sha256 == digest({"ppl": 12.5})


def test_missing_or_uncommitted_artifacts_read_as_absent(store, tmp_path):
    assert store.get("d" * 64) is None
    folder = tmp_path / "artifacts" / "ee" / ("e" * 64)
    folder.mkdir(parents=True)
    (folder / "tensors.safetensors").write_bytes(b"partial write")  # no manifest: never committed
    assert store.get("e" * 64) is None


def test_a_corrupt_tensor_file_is_refused(store, tmp_path):
    ref = store.put("x", "f" * 64, {}, {"t": torch.ones(4)})
    path = tmp_path / "artifacts" / "ff" / ("f" * 64) / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="corrupt"):
        store.tensors(ref)


def test_manifest_records_what_the_reader_needs(store, tmp_path):
    ref = store.put("calibration", "12" * 32, {"shape": [8, 64]}, {"ids": torch.zeros(8, 64, dtype=torch.int64)})
    manifest = json.loads((tmp_path / "artifacts" / "12" / ("12" * 32) / "manifest.json").read_text())
    assert (manifest["stage"], manifest["key"], manifest["sha256"], manifest["has_tensors"]) == \
        ("calibration", ref.key, ref.sha256, True)


def test_stage_key_reads_input_content_not_location():
    one = Ref(stage="prune", key="k1", sha256="s" * 64)
    moved = Ref(stage="prune", key="k2", sha256="s" * 64, info={"more": 1})
    other = Ref(stage="prune", key="k1", sha256="t" * 64)
    key = stage_key("merge", "0.1.0/1", {"a": 1}, {"state": one})
    assert key == stage_key("merge", "0.1.0/1", {"a": 1}, {"state": moved})
    assert key != stage_key("merge", "0.1.0/1", {"a": 1}, {"state": other})
    assert key != stage_key("merge", "0.1.0/2", {"a": 1}, {"state": one})
    assert key != stage_key("merge", "0.1.0/1", {"a": 2}, {"state": one})
    assert key != stage_key("finalize", "0.1.0/1", {"a": 1}, {"state": one})


def test_sparse_tensors_are_stored_compactly_and_restored_bit_for_bit(tmp_path):
    """The stored form (tasks.store.encode): a sparse 2-D weight as values + bitmask, a bool mask as bits; reads
    give back the exact tensors (−0.0 included), and the file shrinks with the sparsity."""
    import torch

    from tasks.store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 96, generator=gen)
    w[torch.rand(w.shape, generator=gen) < 0.7] = 0.0
    w[0, :3] = -0.0  # a pruned negative weight multiplied by 0 keeps its sign bit
    tensors = {"w.0.q_proj": w, "w.0.half": w.half(), "m.0.q_proj": w != 0, "dense": torch.randn(64, 64),
               "ids": torch.arange(100).reshape(10, 10), "ranks": torch.tensor([1, 2])}
    ref = store.put("prune", "k" * 64, {}, tensors, {"adapter": "none"})
    got, meta = store.tensors(ref)
    assert meta == {"adapter": "none"} and set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape
        same = torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)) if t.is_floating_point() else \
            torch.equal(got[k], t)
        assert same, k
    assert torch.signbit(got["w.0.q_proj"][0, :3]).all()
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert store.size(ref.key) < 0.6 * dense_bytes


def test_the_compact_form_is_byte_identical_across_processes(tmp_path):
    """An artifact's bytes are a function of its tensors and metadata alone (its sha256 is its identity):
    the same put in two fresh processes writes the same file (safetensors orders several metadata keys at random
    per process, so the store writes one)."""
    import subprocess
    import sys

    code = ("import torch, sys; from tasks.store import ArtifactStore; g = torch.Generator().manual_seed(0); "
            "w = torch.randn(64, 64, generator=g); w[w.abs() < 1] = 0; "
            "r = ArtifactStore(sys.argv[1]).put('prune', 'k' * 64, {}, {'w.0.q': w, 'm.0.q': w != 0}, "
            "{'adapter': 'masked', 'other': 'x'}); print(r.sha256)")
    shas = {subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{i}")], capture_output=True, text=True,
                           check=True).stdout.strip() for i in range(3)}
    assert len(shas) == 1, shas
