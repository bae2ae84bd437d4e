"""Stage locks tied to live holders, corruption caught and removed, retention plans, divergence as failure."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from tasks.locks import LiveLockManager, holder_alive
from tasks.store import ArtifactStore, CorruptArtifact

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------- locks


def test_lock_records_its_live_holder_and_a_lease(tmp_path):
    locks = LiveLockManager(tmp_path, lease=60)
    assert locks.acquire_lock("k", holder="me")
    record = json.loads((tmp_path / "k.lock").read_text())
    assert record["pid"] == os.getpid() and record["expiration"] is not None and holder_alive(record) is True
    assert locks.is_locked("k") and locks.is_lock_holder("k", "me")
    other = LiveLockManager(tmp_path, lease=60)  # another actor in a live process: it waits
    assert not other.acquire_lock("k", holder="you", acquire_timeout=0.3)
    locks.release_lock("k", "me")
    assert not (tmp_path / "k.lock").exists() and other.acquire_lock("k", holder="you", acquire_timeout=1)


def test_lease_is_renewed_while_held(tmp_path):
    locks = LiveLockManager(tmp_path, lease=0.3)
    locks.acquire_lock("k", holder="me")
    first = json.loads((tmp_path / "k.lock").read_text())["expiration"]
    time.sleep(0.5)  # past the first lease: the heartbeat moved it on
    assert json.loads((tmp_path / "k.lock").read_text())["expiration"] > first
    assert LiveLockManager(tmp_path).is_locked("k")
    locks.release_lock("k", "me")


def test_a_killed_holders_lock_is_broken_and_logged(tmp_path, caplog):
    code = ("import sys, time; from pathlib import Path; from tasks.locks import LiveLockManager; "
            "m = LiveLockManager(Path(sys.argv[1]), lease=3600); m.acquire_lock('k', holder='dead'); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / "k.lock").read_text())["pid"] == proc.pid  # left behind, lease an hour away
    with caplog.at_level(logging.WARNING, logger="losa.locks"):
        locks = LiveLockManager(tmp_path)
        start = time.perf_counter()
        assert locks.acquire_lock("k", holder="me", acquire_timeout=5)
    assert time.perf_counter() - start < 2
    assert any("its holder" in r.message and str(proc.pid) in r.message for r in caplog.records)
    locks.release_lock("k", "me")


def test_a_lock_from_another_host_waits_for_its_lease(tmp_path):
    from prefect.types._datetime import now

    def write(expires_in: float):
        (tmp_path / "k.lock").write_text(json.dumps({
            "holder": "x", "host": "elsewhere", "pid": 1, "started": 0.0,
            "expiration": str(now("UTC") + timedelta(seconds=expires_in))}))

    write(3600)
    assert LiveLockManager(tmp_path).is_locked("k")  # its holder cannot be checked from here: the lease rules
    write(-1)
    assert not LiveLockManager(tmp_path).is_locked("k") and not (tmp_path / "k.lock").exists()


# --------------------------------------------------------------------------------------------- corruption


def _artifact(store: ArtifactStore, key: str = "a" * 64):
    return store.put("prune", key, {"n": 1}, {"w": torch.arange(1000, dtype=torch.float32)})


def _tensor_file(store, ref) -> Path:
    return Path(store._dir(ref.key)) / "tensors.safetensors"


def test_a_truncated_artifact_is_removed_on_lookup(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = _artifact(store)
    path = _tensor_file(store, ref)
    path.write_bytes(path.read_bytes()[:-100])
    assert store.get(ref.key) is None  # a miss: the stage runs again
    assert not path.parent.exists()
    assert json.loads((tmp_path / "removed.jsonl").read_text())["key"] == ref.key


def test_a_byte_flip_is_found_by_verify_and_on_read(tmp_path):
    store = ArtifactStore(tmp_path)
    ref, other = _artifact(store), _artifact(store, "b" * 64)
    path = _tensor_file(store, ref)
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(payload))
    assert store.get(ref.key) is not None
    assert store.verify() == {ref.key: "content hash mismatch"}
    assert store.get(ref.key) is None and store.get(other.key) is not None and store.verify() == {}
    ref = _artifact(store)  # rebuilt; flip it again and read it
    path.write_bytes(bytes(payload))
    with pytest.raises(CorruptArtifact, match="removed"):
        store.tensors(ref)
    assert store.get(ref.key) is None


def test_an_edited_manifest_fails_its_checksum(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = _artifact(store)
    manifest = Path(store._dir(ref.key)) / "manifest.json"
    body = json.loads(manifest.read_text())
    body["info"]["n"] = 2
    manifest.write_text(json.dumps(body))
    assert store.get(ref.key) is None
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text("{not json")
    assert store.get(ref.key) is None


# --------------------------------------------------------------------------------------------- retention


def test_retention_plans_keep_finals_shared_and_pending(tmp_path):
    from tasks import retention
    from tasks.store import Ref

    store = ArtifactStore(tmp_path)
    t = {"w": torch.zeros(10)}
    keys = {name: store.put(stage, name * 64, {}, t).key for name, stage in
            [("c", "calibration"), ("p", "prune"), ("f", "finetune"), ("m", "merge"), ("z", "finalize"),
             ("q", "prune"), ("s", "prune")]}
    refs = lambda *names: [Ref(stage=store.manifest(keys[n])["stage"], key=keys[n], sha256="") for n in names]  # noqa
    a = retention.record_cell(store, "cellA", refs("c", "p", "f", "m", "z"), "run-a")
    b = retention.record_cell(store, "cellB", refs("c", "p", "q"), "run-b")  # shares the prune "p"; final "q"
    assert a.info["final"] == keys["z"] and b.info["final"] == keys["q"]
    finished = {"cellA": a, "cellB": b}
    pending = {"cellC": [keys["c"], keys["f"]]}  # an unfinished cell that already reached "f"
    assert retention.plan(store, finished, pending, "all") == {}
    assert set(retention.plan(store, finished, pending, "shared")) == {keys["m"]}
    assert set(retention.plan(store, finished, pending, "final")) == {keys["m"], keys["p"]}
    freed = retention.collect(store, retention.plan(store, finished, {}, "final"))
    assert freed > 0 and {k for k in keys.values() if store.get(k) is not None} == \
        {keys["c"], keys["z"], keys["q"], keys["s"]}  # calibration kept; "s" belongs to no cell
    with pytest.raises(ValueError, match="retain must be one of"):
        retention.plan(store, finished, {}, "none")
    # orphans: "s" belongs to no cell; a final stored as a recipe keeps what it is rebuilt from
    assert set(retention.orphans(store, finished, {})) == {keys["s"]}
    base = store.put("lora", "l" * 64, {}, t, needs=[keys["s"]])
    recipe = store.put("finalize", "r" * 64, {}, {}, needs=[base.key])
    c = retention.record_cell(store, "cellC", refs("c") + [base, recipe], "run-c")
    assert c.info["final"] == recipe.key and retention.orphans(store, {**finished, "cellC": c}, {}) == {}
    assert retention.plan(store, {"cellC": c}, {}, "final") == {}  # the final's base (and its base) stay
    assert retention.done(store, "cellC") is not None
    store.delete(keys["s"])  # what the final is rebuilt from is gone: the cell has to run again
    assert retention.done(store, "cellC") is None


# --------------------------------------------------------------------------------------------- divergence


def test_divergence_rule():
    from losa.finetune import diverged

    uniform = math.log(8192)
    assert diverged([5.0, 7.0, 9.01], uniform)  # started well below uniform guessing, ended there
    assert not diverged([9.0, 9.3, 9.2], uniform)  # a random-init model around ln |V|, even if it got worse
    assert not diverged([12.5, 11.1], uniform)  # pruned beyond repair, and training still helped
    assert not diverged([8.0, 6.0], uniform) and not diverged([5.0, 9.5], None)


def test_a_non_finite_loss_stops_training(tiny_family):
    from losa.finetune import Diverged, FinetuneConfig, finetune

    _, model = tiny_family
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(float("nan"))
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "labels": torch.randint(0, 100, (2, 8))}
    with pytest.raises(Diverged, match="training loss is nan at optimiser step 1 of 3"):
        finetune(model, iter([batch] * 3), 3, FinetuneConfig(), progress=False)
