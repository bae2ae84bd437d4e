"""The committed testbed: built from the committed recipe, loadable like any hub model, within its size budget."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from losa import data, testbed

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "testbed" / "model"
META = json.loads((MODEL / testbed.METADATA_FILE).read_text())


def test_committed_recipe_is_the_one_the_model_was_built_from():
    recipe = testbed.load_recipe(ROOT / "testbed" / "recipe.json")
    assert META["recipe"] == recipe.model_dump(mode="json")


def test_training_data_is_the_shipped_data():
    for rel, digest in META["data_sha256"].items():
        path = data.find(rel)
        assert path is not None, f"{rel} missing"
        assert data.sha256(path) == digest, f"{rel} changed since the testbed was built"


def test_loads_like_a_hub_model_and_fits_the_budget():
    assert (MODEL / "model.safetensors").stat().st_size <= 16 * 2**20
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(MODEL)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == META["parameters"]
    recipe = META["recipe"]
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (recipe["num_layers"], recipe["hidden_size"])
    ids = tok("The President of the United States", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    assert tok.decode(ids[0]) == "The President of the United States"


def test_split_and_tokenizer_are_deterministic():
    recipe = testbed.TestbedRecipe(corpus=("nltk-extra/inaugural.zip",),
                                   chunk_chars=5000, val_every=10, vocab_size=400)
    train_a, val_a = testbed.split_corpus(recipe)
    train_b, val_b = testbed.split_corpus(recipe)
    assert train_a == train_b and val_a == val_b and len(val_a) > 0
    assert not set(train_a) & set(val_a)
    tok_a = testbed.train_tokenizer(train_a, recipe.vocab_size)
    tok_b = testbed.train_tokenizer(train_b, recipe.vocab_size)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert len(tok_a) == recipe.vocab_size


def test_recipe_rejects_unknown_fields():
    with pytest.raises(ValueError):
        testbed.TestbedRecipe(layers=3)
