"""The CPU testbed: a small LLaMA-architecture model trained from scratch on the shipped prose, saved like a hub model.

The build is deterministic under the recipe's seed (data split, tokenizer, initialisation, batch order) and resumable:
it checkpoints every ``checkpoint_every`` steps into a work folder and continues from there after a crash. Nothing
else in losa knows about the testbed: it is loaded by path like any causal LM.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from . import data

METADATA_FILE = "losa_testbed.json"
EOS = "<|endoftext|>"


class TestbedRecipe(BaseModel):
    """Everything that determines the testbed: model shape, data, optimisation. Stored beside the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    corpus: tuple[str, ...] = data.TESTBED_CORPUS
    chunk_chars: int = 20_000  # documents are cut into chunks of about this size before the split
    val_every: int = 50  # every 50th chunk (after a seeded shuffle) is held out for validation
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048
    seqlen: int = 256
    batch_size: int = 16
    steps: int = 3000
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.0  # decay completed: mid-schedule checkpoints are unrealistically robust to pruning
    warmup_frac: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    val_windows: int = 64
    eval_seqlen: int = 256  # WikiText-2 perplexity recorded in the metadata
    threads: int = 2
    compile: bool = True  # torch.compile + bf16 autocast: about 2x the tokens/s of eager fp32 on these CPUs
    autocast_bf16: bool = True
    checkpoint_every: int = 200


def split_corpus(recipe: TestbedRecipe) -> tuple[list[str], list[str]]:
    """Cut the corpus documents into ~``chunk_chars`` chunks at line breaks, shuffle with the seed, hold out 1/val_every."""
    chunks: list[str] = []
    for doc in data.read_corpus(recipe.corpus):
        buf, size = [], 0
        for line in doc.text.splitlines(keepends=True):
            buf.append(line)
            size += len(line)
            if size >= recipe.chunk_chars:
                chunks.append("".join(buf))
                buf, size = [], 0
        if buf and "".join(buf).strip():
            chunks.append("".join(buf))
    random.Random(recipe.seed).shuffle(chunks)
    val = [c for i, c in enumerate(chunks) if i % recipe.val_every == 0]
    train = [c for i, c in enumerate(chunks) if i % recipe.val_every != 0]
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenisation) wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and joined with EOS into one int32 stream."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.int32)


def make_model(recipe: TestbedRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def _lr_lambda(recipe: TestbedRecipe):
    warmup = max(1, int(recipe.warmup_frac * recipe.steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, recipe.steps - warmup)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def _val_loss(model, val_stream: torch.Tensor, recipe: TestbedRecipe) -> float:
    model.eval()
    losses = []
    for k in range(0, recipe.val_windows, recipe.batch_size):
        batch = data.lm_batch(val_stream, recipe.seqlen, min(recipe.batch_size, recipe.val_windows - k), -1 - recipe.seed, k)
        losses.append(model(input_ids=batch, labels=batch).loss.item())
    model.train()
    return sum(losses) / len(losses)


def build(recipe: TestbedRecipe, out_dir: Path, work_dir: Path, log=print) -> dict:
    """Train the testbed from ``recipe`` and save model + tokenizer + metadata to ``out_dir``.

    Args:
        recipe: the build recipe.
        out_dir: final folder (``save_pretrained`` layout, bf16 safetensors).
        work_dir: scratch folder for the tokenizer, token streams and resumable checkpoints.
        log: callable receiving progress lines.

    Returns:
        The metadata written to ``out_dir / METADATA_FILE``.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from .evaluate import perplexity

    torch.set_num_threads(recipe.threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # scratch files are keyed by the recipe fields they depend on, so a changed recipe never reuses stale ones
    data_key = _key(recipe, ("seed", "corpus", "chunk_chars", "val_every", "vocab_size"))
    tok_dir = work_dir / f"tokenizer-{data_key}"
    streams = work_dir / f"streams-{data_key}.pt"
    if not streams.exists():
        train_texts, val_texts = split_corpus(recipe)
        log(f"corpus: {len(train_texts)} train / {len(val_texts)} validation chunks, "
            f"{sum(map(len, train_texts)):,} / {sum(map(len, val_texts)):,} characters")
        tokenizer = train_tokenizer(train_texts, recipe.vocab_size)
        tokenizer.save_pretrained(tok_dir)
        torch.save({"train": token_stream(tokenizer, train_texts), "val": token_stream(tokenizer, val_texts)}, streams)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    s = torch.load(streams, weights_only=True)
    train_stream, val_stream = s["train"], s["val"]
    log(f"tokens: {train_stream.numel():,} train / {val_stream.numel():,} validation ({time.time() - t0:.0f} s)")

    model = make_model(recipe, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.peak_lr, betas=(0.9, 0.95), eps=1e-8,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    ckpt = work_dir / f"checkpoint-{_key(recipe, tuple(TestbedRecipe.model_fields))}.pt"
    step, history, train_seconds = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # tensors, numbers and lists only: no pickle
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
        log(f"resumed from step {step}")

    model.train()
    train_model = torch.compile(model) if recipe.compile else model
    bar = tqdm(total=recipe.steps, initial=step, desc="testbed", unit="step", mininterval=5)
    t_seg = time.time()
    while step < recipe.steps:
        batch = data.lm_batch(train_stream, recipe.seqlen, recipe.batch_size, recipe.seed, step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.autocast_bf16):
            loss = train_model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % recipe.eval_every == 0 or step == recipe.steps:
            val = _val_loss(model, val_stream, recipe)
            history.append({"step": step, "train_loss": loss.item(), "val_loss": val})
            log(f"step {step}: train {loss.item():.3f}  val {val:.3f}  ppl {math.exp(val):.1f}")
        if step % recipe.checkpoint_every == 0 and step < recipe.steps:
            train_seconds += time.time() - t_seg
            t_seg = time.time()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "history": history, "train_seconds": train_seconds}, ckpt)
    bar.close()
    train_seconds += time.time() - t_seg

    # The committed artifact is bf16 (size limit); measure what users will load: bf16 weights run in fp32.
    model = model.to(torch.bfloat16).to(torch.float32)
    ppl = perplexity(model, tokenizer, data.wikitext2_test_text(), recipe.eval_seqlen, batch_size=16)
    val_bf16 = _val_loss(model, val_stream, recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    meta = {
        "recipe": recipe.model_dump(mode="json"),
        "data_sha256": {rel: data.sha256(data.find(rel)) for rel in recipe.corpus},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(train_stream.numel()),
        "val_tokens": int(val_stream.numel()),
        "tokens_seen": recipe.steps * recipe.batch_size * recipe.seqlen,
        "train_seconds": round(train_seconds, 1),
        "val_loss": round(val_bf16, 4),
        "wikitext2_ppl": round(ppl, 3),
        "wikitext2_eval_seqlen": recipe.eval_seqlen,
        "history": history,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"saved {out_dir}: WikiText-2 ppl {ppl:.2f} (seqlen {recipe.eval_seqlen}), {train_seconds / 60:.1f} min")
    return meta


def _key(recipe: TestbedRecipe, fields: tuple[str, ...]) -> str:
    import hashlib

    payload = json.dumps({f: recipe.model_dump(mode="json")[f] for f in fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def load_recipe(path: Path) -> TestbedRecipe:
    return TestbedRecipe.model_validate_json(Path(path).read_text())
