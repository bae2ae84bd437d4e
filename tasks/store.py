"""Content-addressed artifact store: safetensors + a JSON manifest per artifact, on any fsspec filesystem.

An artifact's key is the sha256 of (stage, stage version, parameters, input content hashes): the same computation
on the same inputs always lands on the same key, so the key doubles as the stage's cache key. Its manifest records
the sha256 of its tensor file, which is the *content* hash later stages key on. The manifest is written last (after
the tensors, each via a temporary name and a rename), so an interrupted write leaves no artifact behind.

An artifact can also be *spilled* (:meth:`ArtifactStore.spill`): its tensors are deleted while its manifest (its key,
content hash and info) stays, with the recipe its stage left to recompute it. A cache lookup still finds it, so the
stages after it are not recomputed; reading its tensors raises :class:`Spilled`, and the recomputed tensors come back
only if they hash to the content hash it had (:meth:`ArtifactStore.unspill`).

Corruption is caught at three depths: :meth:`ArtifactStore.get` checks the manifest's own checksum and the tensor
file's size (cheap: every cache lookup does it), :meth:`ArtifactStore.tensors` checks the content hash of what it
reads, and :meth:`ArtifactStore.verify` re-hashes everything (``losa check --verify``). A corrupt artifact is logged
and removed, so the stage that wrote it runs again on its next lookup and rebuilds it from its inputs.

Default root: ``$LOSA_ARTIFACTS`` (any fsspec URL, e.g. ``s3://bucket/losa`` when a grid spans machines), else
``<state>/artifacts`` with ``<state>`` = ``$LOSA_HOME`` or ``<repo>/.state``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .state import PROJECT_ROOT, artifacts_url, state_dir  # noqa: F401 - re-exported

log = logging.getLogger("losa.store")


_REMOVED: dict[str, dict[str, str]] = {}


class CorruptArtifact(RuntimeError):
    """An artifact failed its checks; it has been removed, so recomputing its stage rebuilds it."""


class Spilled(LookupError):
    """The tensors of a spilled artifact (:meth:`ArtifactStore.spill`) were asked for: ``recipe`` (what its stage
    wrote as ``redo``) recomputes them, and :meth:`ArtifactStore.unspill` takes them back."""

    def __init__(self, ref: "Ref", recipe: str):
        super().__init__(f"artifact {ref.stage} {ref.key[:12]} is spilled: its tensors must be recomputed")
        self.ref, self.recipe = ref, recipe


class Ref(BaseModel):
    """What a stage returns and Prefect persists: a pointer to an artifact plus its small JSON info."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str  # where it lives (the stage's cache key)
    sha256: str  # content hash of the tensors (or of the info when there are none)
    info: dict[str, Any] = {}


def digest(obj: Any) -> str:
    """sha256 of canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_key(stage: str, version: str, params: Mapping[str, Any], inputs: Mapping[str, Ref | str | None]) -> str:
    """The cache key of one stage run: its name and version, its parameters, and the content hash of each input."""
    hashes = {k: (v.sha256 if isinstance(v, Ref) else v) for k, v in inputs.items()}
    return digest({"stage": stage, "version": version, "params": params, "inputs": hashes})


class ArtifactStore:
    """Artifacts under ``root/<key[:2]>/<key>/`` (``manifest.json`` + optional ``tensors.safetensors``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        root = root or artifacts_url()
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        # corrupt artifacts removed in this process, by any instance on this root: key -> reason
        self.removed: dict[str, str] = _REMOVED.setdefault(self.root, {})
        self.fs.makedirs(self.root, exist_ok=True)

    def _dir(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}"

    def _write(self, path: str, payload: bytes) -> None:
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(payload)
        self.fs.mv(tmp, path)

    def manifest(self, key: str) -> dict | None:
        """The manifest under ``key`` if it is committed and passes the cheap checks; a corrupt one is removed."""
        path = f"{self._dir(key)}/manifest.json"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            raw = f.read()
        try:
            manifest = json.loads(raw)
            problem = _manifest_problem(manifest)
        except (ValueError, TypeError, AttributeError):
            problem = "manifest is not valid JSON"
        if problem is None and manifest.get("has_tensors"):
            tensors = f"{self._dir(key)}/tensors.safetensors"
            if not self.fs.exists(tensors):
                problem = "tensor file is missing"
            elif "bytes" in manifest and self.fs.size(tensors) != manifest["bytes"]:
                problem = f"tensor file has {self.fs.size(tensors)} bytes, its manifest says {manifest['bytes']}"
        if problem is not None:
            self.remove(key, problem)
            return None
        return manifest

    def get(self, key: str) -> Ref | None:
        """The committed artifact under ``key``, or None (also when it was corrupt: it is then removed)."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        return Ref(stage=manifest["stage"], key=key, sha256=manifest["sha256"], info=manifest["info"])

    def closure(self, keys) -> set[str]:
        """``keys`` and every artifact that reading them reads, transitively (manifests' ``needs``)."""
        seen, todo = set(), list(keys)
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            manifest = self.manifest(key)
            todo.extend(manifest.get("needs", []) if manifest else [])
        return seen

    def size(self, key: str) -> int:
        """Bytes on disk of an artifact (manifest and tensors)."""
        return sum(self.fs.size(p) for p in self.fs.find(self._dir(key)))

    def delete(self, key: str) -> None:
        """Remove an artifact that nothing needs any more (retention; see :mod:`tasks.retention`)."""
        try:
            self.fs.rm(self._dir(key), recursive=True)
        except FileNotFoundError:  # removed concurrently
            pass

    def remove(self, key: str, reason: str) -> None:
        """Delete an artifact (logged with ``reason``); its stage rebuilds it when next asked."""
        log.warning("artifact %s is corrupt (%s): removed, its stage will rebuild it", key[:12], reason)
        self.removed[key] = reason
        self.delete(key)
        with self.fs.open(f"{self.root}/removed.jsonl", "ab") as f:
            f.write((json.dumps({"key": key, "reason": reason, "time": time.time()}) + "\n").encode())

    def keys(self) -> list[str]:
        """Every key with a committed manifest."""
        return sorted(p.rstrip("/").split("/")[-2] for p in self.fs.glob(f"{self.root}/*/*/manifest.json"))

    def verify(self, keys: list[str] | None = None) -> dict[str, str]:
        """Re-hash every artifact in ``keys`` (default: all); the corrupt ones are removed. {key: problem}."""
        bad = {}
        for key in keys if keys is not None else self.keys():
            present = self.fs.exists(f"{self._dir(key)}/manifest.json")
            manifest = self.manifest(key)
            if manifest is None:
                if present:  # failed the cheap checks and was removed
                    bad[key] = "manifest or tensor file damaged"
                continue
            if manifest.get("has_tensors"):
                with self.fs.open(f"{self._dir(key)}/tensors.safetensors", "rb") as f:
                    sha = hashlib.sha256(f.read()).hexdigest()
                if sha != manifest["sha256"]:
                    bad[key] = "content hash mismatch"
                    self.remove(key, bad[key])
        return bad

    def put(self, stage: str, key: str, info: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
            metadata: Mapping[str, str] | None = None, seconds: float | Callable[[], float] | None = None,
            needs: list[str] = (), redo: tuple[str, list[str]] | None = None) -> Ref:
        """Store an artifact; tensors are written first, the manifest commits it. Logs the computation.

        ``seconds``: the stage's time, or a clock read after the tensors are written (writing is part of a stage).
        ``needs``: the keys of the artifacts that reading this one also reads (an adapter's base state, ...).
        ``redo``: (recipe, the keys it reads): how its stage recomputes these tensors, which makes it spillable.
        """
        self.fs.makedirs(self._dir(key), exist_ok=True)
        info = json.loads(json.dumps(dict(info)))  # JSON types only (tuples -> lists), as a reader will see them
        size = 0
        if tensors is not None:
            payload = _payload(tensors, metadata)
            sha, size = hashlib.sha256(payload).hexdigest(), len(payload)
            self._write(f"{self._dir(key)}/tensors.safetensors", payload)
        else:
            sha = digest(info)
        if callable(seconds):
            seconds = seconds()
        manifest = {"stage": stage, "key": key, "sha256": sha, "info": info, "has_tensors": tensors is not None,
                    "bytes": size, "created": time.time(), "seconds": seconds, "needs": list(needs)}
        if redo is not None:
            manifest["redo"] = {"recipe": redo[0], "needs": list(redo[1])}
        self._commit(key, manifest)
        self._log("computed", {"stage": stage, "key": key, "seconds": seconds, "bytes": size})
        return Ref(stage=stage, key=key, sha256=sha, info=info)

    def _commit(self, key: str, manifest: dict) -> None:
        manifest = {k: v for k, v in manifest.items() if k != "checksum"}
        manifest["checksum"] = digest(manifest)
        self._write(f"{self._dir(key)}/manifest.json", json.dumps(manifest, indent=1).encode())

    def _log(self, what: str, line: dict) -> None:
        """``computed.jsonl``: what actually ran (and how big it was), for the benchmarks; ``spilled.jsonl``: what
        was spilled."""
        with self.fs.open(f"{self.root}/{what}.jsonl", "ab") as f:
            f.write((json.dumps({**line, "time": time.time()}) + "\n").encode())

    def spill(self, ref: Ref) -> int:
        """Delete an artifact's tensors but keep its manifest and the recipe its stage left (``redo``); bytes freed.

        For a state that only a crash or a corrupt later artifact would read again (SparseGPT's pruned weights of a
        step the next step has pruned further): a cache lookup still finds it, its content hash still keys what was
        computed from it, and reading it raises :class:`Spilled` (its reader recomputes it)."""
        manifest = self.manifest(ref.key)
        if manifest is None or not manifest.get("has_tensors"):
            return 0
        if "redo" not in manifest:
            raise ValueError(f"artifact {ref.stage} {ref.key[:12]} has no recipe to recompute it: it cannot be spilled")
        freed = manifest["bytes"]
        # the manifest first: a crash before the tensor file is gone leaves a spilled artifact with a stray file
        self._commit(ref.key, {**manifest, "has_tensors": False, "bytes": 0, "spilled": manifest["needs"],
                               "needs": manifest["redo"]["needs"]})
        try:
            self.fs.rm(f"{self._dir(ref.key)}/tensors.safetensors")
        except FileNotFoundError:  # spilled concurrently by another cell that shares it
            return 0
        self._log("spilled", {"stage": ref.stage, "key": ref.key, "bytes": freed})
        return freed

    def unspill(self, ref: Ref, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                seconds: float | None = None) -> None:
        """Take back a spilled artifact's recomputed tensors, which must be the very tensors it had (its content
        hash); otherwise it is removed (CorruptArtifact), so its stage runs again and what follows it is recomputed
        from what the stage gives now."""
        manifest = self.manifest(ref.key)
        if manifest is None or "spilled" not in manifest:
            return  # taken back meanwhile (another cell recomputed it too), or removed
        payload = _payload(tensors, metadata)
        if hashlib.sha256(payload).hexdigest() != manifest["sha256"]:
            self.remove(ref.key, "recomputed tensors differ from the spilled ones")
            raise CorruptArtifact(f"artifact {ref.stage} {ref.key[:12]} recomputed to other tensors than it had "
                                  "(non-deterministic kernels?): removed; rerunning the cell recomputes what follows")
        self._write(f"{self._dir(ref.key)}/tensors.safetensors", payload)
        live = {k: v for k, v in manifest.items() if k != "spilled"}
        self._commit(ref.key, {**live, "has_tensors": True, "bytes": len(payload), "needs": manifest["spilled"]})
        self._log("computed", {"stage": ref.stage, "key": ref.key, "seconds": seconds, "bytes": len(payload),
                               "recomputed": True})

    def tensors(self, ref: Ref) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, safetensors metadata) of an artifact, checked against its content hash."""
        try:
            with self.fs.open(f"{self._dir(ref.key)}/tensors.safetensors", "rb") as f:
                payload = f.read()
        except FileNotFoundError:
            manifest = self.manifest(ref.key)  # (a committed one whose file is missing is removed by this check)
            if manifest is not None and "spilled" in manifest:
                raise Spilled(ref, manifest["redo"]["recipe"]) from None
            if manifest is not None:
                self.remove(ref.key, "tensor file missing on read")
            raise CorruptArtifact(f"artifact {ref.stage} {ref.key[:12]} lost its tensor file: removed; rerunning the "
                                  "cell rebuilds it") from None
        if hashlib.sha256(payload).hexdigest() != ref.sha256:
            self.remove(ref.key, "content hash mismatch on read")
            raise CorruptArtifact(f"artifact {ref.stage} {ref.key[:12]} was corrupt (content hash mismatch): removed; "
                                  "rerunning the cell rebuilds it")
        meta = _metadata(payload)  # load() drops the metadata
        if ENCODED not in meta:
            return st_load(payload), meta
        packed = json.loads(meta[ENCODED])
        return decode(st_load(payload), packed["encoded"]), packed["metadata"]

    def computed(self) -> list[dict]:
        """Every stage computation logged in this store (one line per artifact written)."""
        return self._read_log("computed")

    def spilled(self) -> list[dict]:
        """Every spill logged in this store (one line per :meth:`spill` that freed bytes)."""
        return self._read_log("spilled")

    def _read_log(self, what: str) -> list[dict]:
        path = f"{self.root}/{what}.jsonl"
        if not self.fs.exists(path):
            return []
        with self.fs.open(path, "rb") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- the stored form

ENCODED = "losa.encoded"  # safetensors metadata: {"metadata": the caller's, "encoded": {tensor: how}}
_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def encode(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The compact stored form: a 2-D float tensor whose exact zeros make it smaller is kept as its non-zero values
    (in its own dtype) plus a bitmask (``bitmask``: the sparse-bitmask layout of :mod:`losa.export`, bit-exact); a
    2-D bool tensor (a mask) as packed bits (``bits``). Everything else as it is. Returns the tensors and
    {name: how}. :func:`decode` restores the original tensors bit for bit."""
    import numpy as np

    from losa.export import bitmask_compress

    out: dict[str, torch.Tensor] = {}
    how: dict[str, str] = {}
    for name, t in tensors.items():
        if t.dim() == 2 and t.dtype == torch.bool and t.numel() >= 64:
            out[f"{name}.bits"] = torch.from_numpy(np.packbits(t.numpy(), axis=-1, bitorder="little"))
            out[f"{name}.shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            how[name] = "bits"
        elif t.dim() == 2 and t.is_floating_point() and t.numel() >= 64:
            parts = bitmask_compress(t, exact=True)
            if sum(p.numel() * p.element_size() for p in parts.values()) < 0.9 * t.numel() * t.element_size():
                out.update({f"{name}.{k}": v for k, v in parts.items()})
                how[name] = "bitmask"
                continue
            out[name] = t
        else:
            out[name] = t
    return out, how


def decode(stored: Mapping[str, torch.Tensor], how: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`."""
    import numpy as np

    from losa.export import bitmask_decompress

    parts = {f"{n}.{p}" for n, kind in how.items() for p in (("bits", "shape") if kind == "bits" else _PARTS)}
    out = {k: v for k, v in stored.items() if k not in parts}
    for name, kind in how.items():
        rows, cols = (int(x) for x in stored[f"{name}.shape"])
        if kind == "bits":
            bits = np.unpackbits(stored[f"{name}.bits"].numpy(), axis=-1, count=cols, bitorder="little")
            out[name] = torch.from_numpy(bits.astype(bool))
        else:
            out[name] = bitmask_decompress({k: stored[f"{name}.{k}"] for k in _PARTS})
    return out


def _payload(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> bytes:
    """The tensor file's bytes: the compact stored form (:func:`encode`), the metadata in one key."""
    packed, encoded = encode({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    meta = dict(metadata or {})
    if encoded or len(meta) > 1:  # one key: safetensors writes several in a per-process random order
        meta = {ENCODED: json.dumps({"metadata": meta, "encoded": encoded}, sort_keys=True)}
    return st_save(packed, meta)


def _manifest_problem(manifest: dict) -> str | None:
    if not isinstance(manifest, dict) or not {"stage", "sha256", "info"} <= manifest.keys():
        return "manifest lacks its fields"
    if "checksum" in manifest:  # manifests written before checksums were added have none
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        if digest(body) != manifest["checksum"]:
            return "manifest checksum mismatch"
    return None


def _metadata(payload: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then the JSON header holding "__metadata__"
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n]).get("__metadata__", {}) or {}
