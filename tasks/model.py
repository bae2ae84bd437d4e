"""Load-model stage: resolve a grid's model name to local files and their content hash (the root of every key)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefect import task

from .store import state_dir

_MODEL_FILES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken")


def model_path(name: str) -> Path:
    """``testbed`` -> the committed testbed; a packaged name (``smollm2-135m``, see :mod:`losa.zoo`) -> its
    converted folder; an existing folder -> itself; else a hub id (downloaded when online).

    Raises:
        FileNotFoundError: a packaged model whose wheel is missing, or a hub id that is not in the local cache while
            ``HF_HUB_OFFLINE`` is set.
    """
    from losa import zoo  # heavy package (torch): only when a model is actually resolved

    local = zoo.model_folder(name)
    if Path(local).is_dir():
        return Path(local)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub id (owner/name)
        raise FileNotFoundError(f"model path {name} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                      local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; one clear message for all
        raise FileNotFoundError(f"model {name!r} is neither 'testbed', a packaged model ({', '.join(zoo.PACKAGED)}), "
                                f"a local folder, nor reachable on the hub "
                                f"({type(err).__name__}: {err})") from err


def content_hash(path: Path) -> str:
    """sha256 over the model's files (names and bytes), memoised by (path, size, mtime) under the state folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _MODEL_FILES)
    stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    memo_path = state_dir() / "model-hashes.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    tag = hashlib.sha256(json.dumps([str(path), stamp]).encode()).hexdigest()
    if tag not in memo:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(path)).encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        memo[tag] = h.hexdigest()
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return memo[tag]


@task(name="load-model", cache_policy=None)
def resolve_model(name: str) -> tuple[str, str]:
    """(local path, content sha256) of a grid's model entry."""
    path = model_path(name)
    return str(path), content_hash(path)
