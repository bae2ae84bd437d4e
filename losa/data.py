"""Data layer: where the shipped data lives and how the pruning papers read it. No compute, no writes.

Every file is looked up, in order, under ``$LOSA_DATA_DIR``, then ``<project>/../shared/data``; data sets that
exist on the Hugging Face hub fall back to it for users who are online (unless ``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1``). When nothing is found, :class:`DataNotFoundError` names every place that was looked.
Call :func:`require` at the start of a command so that missing data is reported before any compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "LOSA_DATA_DIR"

WIKITEXT2_TEST = "wikitext-2-raw-v1/wiki.test.raw"
C4_CALIBRATION = "c4/c4-en-train-first1000.jsonl"  # first documents of C4 en train shard 00000, as Wanda/SparseGPT
C4_EXTRA = "c4/c4-en-llamafactory-demo300.jsonl"  # 300 more C4 en documents (plain-text fine-tuning data)
ALPACA = "alpaca/alpaca_en_demo.json"
# Training prose for the testbed (MANIFEST §4 and §7). C4 is left out: it is the calibration set.
TESTBED_CORPUS = (
    "gutenberg/gutenberg.zip",
    "state_union/state_union.zip",
    "wikipedia/wiki_demo.txt",
    "nltk-extra/abc.zip",
    "nltk-extra/movie_reviews.zip",
    "nltk-extra/inaugural.zip",
)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class DataNotFoundError(FileNotFoundError):
    """A data file was found nowhere; the message lists every place looked."""


def data_roots() -> list[Path]:
    """The local data folders, in lookup order: ``$LOSA_DATA_DIR``, then ``../shared/data`` beside the project."""
    roots = []
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser())
    roots.append(PROJECT_ROOT.parent / "shared" / "data")
    return roots


def hub_allowed() -> bool:
    return not any(os.environ.get(v, "0") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _places(relpath: str, hub: str | None) -> list[str]:
    places = [str(root / relpath) for root in data_roots()]
    if hub:
        places.append(f"hub: {hub}" + ("" if hub_allowed() else " (skipped: offline mode)"))
    return places


def find(relpath: str) -> Path | None:
    """The first local copy of ``relpath`` under :func:`data_roots`, or None."""
    for root in data_roots():
        if (root / relpath).is_file():
            return root / relpath
    return None


# hub identifiers for the data sets that exist there (used only when no local copy is found)
_HUB = {
    WIKITEXT2_TEST: "wikitext / wikitext-2-raw-v1 / test",
    C4_CALIBRATION: "allenai/c4 / en/c4-train.00000-of-01024.json.gz",
    ALPACA: "vicgalle/alpaca-gpt4 / train",
}


def require(*relpaths: str) -> None:
    """Raise one :class:`DataNotFoundError` listing every missing file and every place looked for it.

    Files with a hub fallback count as present when the hub is allowed (the download happens on first use).
    """
    missing = [p for p in relpaths if find(p) is None and not (_HUB.get(p) and hub_allowed())]
    if missing:
        lines = [f"  {p}: looked in\n" + "\n".join(f"    - {where}" for where in _places(p, _HUB.get(p))) for p in missing]
        raise DataNotFoundError(
            "data not found (set LOSA_DATA_DIR to the folder holding the shipped data):\n" + "\n".join(lines)
        )


def _load_local_or_hub(relpath: str, read: Callable[[Path], object], hub: Callable[[], object] | None):
    path = find(relpath)
    if path is not None:
        return read(path)
    if hub is not None and hub_allowed():
        try:
            return hub()
        except Exception as err:  # offline, gated, renamed: report it with the local places
            raise DataNotFoundError(
                f"{relpath} not found locally and the hub failed ({type(err).__name__}: {err}); looked in:\n"
                + "\n".join(f"  - {w}" for w in _places(relpath, _HUB.get(relpath)))
            ) from err
    require(relpath)  # raises with the full list
    raise AssertionError("unreachable")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- WikiText-2


def _wikitext_rows_from_raw(path: Path) -> list[str]:
    # MANIFEST §1: one HF row per line; blank lines (a single space) become "", the rest keep their "\n".
    text = path.read_text(encoding="utf-8")
    return [line + "\n" if line.strip() else "" for line in text.split("\n")[:-1]]


@lru_cache(maxsize=1)
def wikitext2_test_text() -> str:
    """The WikiText-2 raw test split joined with ``"\\n\\n"``, exactly as Wanda/SparseGPT build it (1,294,336 chars)."""

    def hub() -> list[str]:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])

    rows = _load_local_or_hub(WIKITEXT2_TEST, _wikitext_rows_from_raw, hub)
    return "\n\n".join(rows)


# --------------------------------------------------------------------------------------------- C4 calibration


def _read_jsonl_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@lru_cache(maxsize=1)
def c4_documents() -> tuple[str, ...]:
    """The C4 ``en`` train documents used for calibration (the first 1,000 of shard 00000 when read locally)."""

    def hub() -> list[str]:
        import datasets

        ds = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        return list(ds["text"])

    return tuple(_load_local_or_hub(C4_CALIBRATION, _read_jsonl_texts, hub))


def finetune_documents() -> list[str]:
    """Plain-text fine-tuning data for recovery: the shipped C4 documents (the testbed never saw C4 in training)."""
    docs = list(c4_documents())
    if find(C4_EXTRA) is not None:
        docs += _read_jsonl_texts(find(C4_EXTRA))
    return docs


def calibration_windows(tokenizer, n_samples: int, seqlen: int, seed: int = 0, documents: Sequence[str] | None = None) -> torch.Tensor:
    """Draw calibration windows as Wanda's and SparseGPT's ``get_c4`` do (method.md §1).

    For each sample: pick random documents until one is longer than ``seqlen`` tokens, then take ``seqlen`` tokens at a
    random offset. ``random.Random(seed)`` replays the same sequence of draws as the papers' ``random.seed(seed)``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        n_samples: number of windows N.
        seqlen: tokens per window S (explicit: never derived from the model's context length).
        seed: seed of the draw (Wanda and SparseGPT default to 0; LoSA uses 4, method.md §1).
        documents: texts to draw from; defaults to :func:`c4_documents`.

    Returns:
        LongTensor of shape (n_samples, seqlen).
    """
    if n_samples < 1 or seqlen < 2:
        raise ValueError(f"need n_samples >= 1 and seqlen >= 2, got {n_samples}, {seqlen}")
    docs = list(documents) if documents is not None else list(c4_documents())
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}

    def ids(i: int) -> list[int]:
        if i not in encoded:
            encoded[i] = tokenizer(docs[i])["input_ids"]
        return encoded[i]

    # A draw that can never succeed would loop forever: check that some document is long enough first.
    if not any(len(d) > seqlen for d in docs) or not any(len(ids(i)) > seqlen for i in range(len(docs))):
        raise ValueError(f"no calibration document is longer than seqlen={seqlen} tokens")
    out = torch.empty(n_samples, seqlen, dtype=torch.long)
    for k in range(n_samples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            if len(ids(i)) > seqlen:
                break
        start = rng.randint(0, len(ids(i)) - seqlen - 1)
        out[k] = torch.tensor(ids(i)[start : start + seqlen])
    return out


# --------------------------------------------------------------------------------------------- plain-text LM data


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def _read_zip(path: Path) -> list[Document]:
    docs = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            if name.endswith("/") or name.rsplit("/", 1)[-1].upper().startswith("README"):
                continue
            # MANIFEST §4/§7: a few files hold Latin-1 or mis-encoded bytes
            docs.append(Document(f"{path.name}:{name}", z.read(name).decode("utf-8", errors="replace")))
    return docs


def read_corpus(relpaths: Sequence[str] = TESTBED_CORPUS) -> list[Document]:
    """Read the shipped prose files (zip members, or one document per line of a .txt) into documents."""
    require(*relpaths)
    docs: list[Document] = []
    for rel in relpaths:
        path = find(rel)
        if path.suffix == ".zip":
            docs.extend(_read_zip(path))
        else:
            lines = path.read_text(encoding="utf-8").split("\n")
            docs.extend(Document(f"{path.name}:{i}", t) for i, t in enumerate(lines) if t.strip())
    return docs


def lm_batch(token_stream: torch.Tensor, seqlen: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Batch ``step`` of random ``seqlen``-token windows from a 1-D token stream (plain-text LM training).

    Each batch depends only on (seed, step), so a resumed run draws exactly the batches an uninterrupted one would.

    Returns:
        LongTensor of shape (batch_size, seqlen).
    """
    if token_stream.numel() <= seqlen:
        raise ValueError(f"token stream of {token_stream.numel()} tokens is too short for seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, token_stream.numel() - seqlen, (batch_size,), generator=gen)
    return token_stream[starts[:, None] + torch.arange(seqlen)].long()


# --------------------------------------------------------------------------------------------- Alpaca


def alpaca_examples(limit: int | None = None) -> list[dict]:
    """Alpaca-format records ``{"instruction", "input", "output"}`` (local demo sample, else vicgalle/alpaca-gpt4)."""

    def read(path: Path) -> list[dict]:
        return json.loads(path.read_text(encoding="utf-8"))

    def hub() -> list[dict]:
        import datasets

        ds = datasets.load_dataset("vicgalle/alpaca-gpt4", split="train")
        return [{k: r[k] for k in ("instruction", "input", "output")} for r in ds]

    records = _load_local_or_hub(ALPACA, read, hub)
    return records[:limit] if limit is not None else records


def render_alpaca(example: dict) -> tuple[str, str]:
    """The (prompt, response) pair of an Alpaca record with the Stanford Alpaca template."""
    template = ALPACA_PROMPT_INPUT if example.get("input") else ALPACA_PROMPT
    return template.format(instruction=example["instruction"], input=example.get("input", "")), example["output"]


# --------------------------------------------------------------------------------------------- zero-shot tasks

# task -> (shipped file(s), the split lm-eval's standard task scores, hub id of the standard task's data set)
ZEROSHOT_FILES: dict[str, tuple[tuple[str, ...], str]] = {
    "boolq": (("boolq/dev.jsonl",), "validation"),
    "rte": (("rte/dev.tsv",), "validation"),
    "hellaswag": (("hellaswag/hellaswag_val_full.txt.bz2",), "validation"),
    "winogrande": (("winogrande/dev.jsonl",), "validation"),
    "arc_easy": (("arc/ARC-Easy-test.jsonl",), "test"),
    "arc_challenge": (("arc/ARC-Challenge-test.jsonl",), "test"),
    "openbookqa": (("openbookqa/test.jsonl",), "test"),
    "piqa": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation"),
}


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hellaswag(path: Path) -> list[dict]:
    # MANIFEST §3: 6 lines per item, "activity_label: ctx", the gold index, 4 endings
    import bz2

    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [{"ctx": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2 : i + 6]}
            for i in range(0, len(lines) - 5, 6)]


def zeroshot_docs(task: str) -> list[dict]:
    """The shipped copy of a zero-shot task's evaluation split (:data:`ZEROSHOT_FILES`) as records with the field
    names of the data set lm-eval's standard task reads (method.md §6):

    - ``boolq``: ``passage``, ``question``, ``label`` (int of ``answer``: SuperGLUE's form of the same 3,270 items);
    - ``rte``: GLUE's ``sentence1``, ``sentence2``, ``label`` (0 = entailment);
    - ``hellaswag``: ``ctx`` ("activity_label: ctx_a ctx_b" as one string: the shipped copy is converted text, so
      ``ctx_b`` cannot be capitalised as lm-eval does), ``endings``, ``label``;
    - ``winogrande``: ``sentence``, ``option1``, ``option2``, ``answer`` ("1"/"2");
    - ``arc_*``: ``question``, ``choices`` {``text``, ``label``}, ``answerKey``;
    - ``openbookqa``: HF's flat ``question_stem``, ``choices``, ``answerKey``;
    - ``piqa``: ``goal``, ``sol1``, ``sol2``, ``label`` (from ``valid-labels.lst``).

    Raises:
        KeyError: an unknown task. DataNotFoundError: its file is nowhere (every place looked is listed).
    """
    import csv

    files, _ = ZEROSHOT_FILES[task]
    require(*files)
    path = find(files[0])
    if task == "boolq":
        return [{"passage": r["passage"], "question": r["question"], "label": int(r["answer"])} for r in _jsonl(path)]
    if task == "rte":
        with open(path, encoding="utf-8", newline="") as f:
            return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"]),
                     "idx": int(r["idx"])} for r in csv.DictReader(f, delimiter="\t")]
    if task == "hellaswag":
        return _hellaswag(path)
    if task == "openbookqa":
        return [{"id": r["id"], "question_stem": r["question"]["stem"], "answerKey": r["answerKey"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]}} for r in _jsonl(path)]
    if task == "piqa":
        labels = find(files[1]).read_text(encoding="utf-8").split()
        records = _jsonl(path)
        if len(labels) != len(records):
            raise ValueError(f"{files[1]} has {len(labels)} labels for {len(records)} records in {files[0]}")
        return [{**r, "label": int(y)} for r, y in zip(records, labels)]
    return _jsonl(path)  # winogrande, arc_*: already in the standard task's fields


def files_sha256(relpaths: Sequence[str]) -> dict[str, str]:
    """{relpath: content sha256} of the local copies (``hub: <id>`` for a file read from the hub instead): what a
    cached result computed from these files depends on."""
    out = {}
    for rel in relpaths:
        if (path := find(rel)) is None:
            out[rel] = f"hub: {_HUB.get(rel, 'none')}"
        else:
            stat = path.stat()
            out[rel] = _file_sha256(path, stat.st_mtime_ns, stat.st_size)
    return out


@lru_cache(maxsize=None)
def _file_sha256(path: Path, mtime_ns: int, size: int) -> str:
    # every stage key hashes the files its stage reads: once per process while they are unchanged
    return sha256(path)
