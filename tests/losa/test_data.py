"""The data layer against the manifest and the papers' recipes (reads ../shared/data)."""

import random

import pytest
import torch

from losa import data


class ByteTokenizer:
    """A tokenizer stand-in: one id per UTF-8 byte (enough to test window drawing without a trained tokenizer)."""

    def __call__(self, text, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def test_wikitext2_test_text_is_the_papers_string():
    text = data.wikitext2_test_text()
    assert len(text) == 1_294_336  # MANIFEST §1: "\n\n".join(rows) of the HF test split
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")  # row 0 is ""
    assert "\r" not in text


def test_calibration_windows_replay_the_papers_draw():
    docs = list(data.c4_documents())[:200]
    tok = ByteTokenizer()
    seqlen, n, seed = 300, 12, 3
    got = data.calibration_windows(tok, n, seqlen, seed=seed, documents=docs)
    # the draw of Wanda/SparseGPT get_c4, restated: global random.seed, resample until long enough, random offset
    random.seed(seed)
    expected = []
    for _ in range(n):
        while True:
            i = random.randint(0, len(docs) - 1)
            ids = tok(docs[i])["input_ids"]
            if len(ids) > seqlen:
                break
        j = random.randint(0, len(ids) - seqlen - 1)
        expected.append(ids[j : j + seqlen])
    assert got.shape == (n, seqlen) and got.dtype == torch.long
    assert torch.equal(got, torch.tensor(expected))
    assert torch.equal(got, data.calibration_windows(tok, n, seqlen, seed=seed, documents=docs))
    assert not torch.equal(got, data.calibration_windows(tok, n, seqlen, seed=seed + 1, documents=docs))


def test_calibration_windows_reject_impossible_requests():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="longer than seqlen"):
        data.calibration_windows(tok, 2, 10_000_000, documents=["short", "docs"])
    with pytest.raises(ValueError):
        data.calibration_windows(tok, 0, 16, documents=["x" * 100])


def test_missing_data_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "custom"))
    monkeypatch.setattr(data, "PROJECT_ROOT", tmp_path / "project")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError) as err:
        data.require(data.WIKITEXT2_TEST, data.C4_CALIBRATION, data.TESTBED_CORPUS[0])
    msg = str(err.value)
    for rel in (data.WIKITEXT2_TEST, data.C4_CALIBRATION, data.TESTBED_CORPUS[0]):
        assert str(tmp_path / "custom" / rel) in msg
        assert str(tmp_path / "shared" / "data" / rel) in msg
    assert "wikitext-2-raw-v1" in msg and "skipped: offline mode" in msg
    assert "LOSA_DATA_DIR" in msg


def test_env_override_comes_first(tmp_path, monkeypatch):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_en_demo.json").write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.find(data.ALPACA) == tmp_path / data.ALPACA
    assert data.alpaca_examples() == [{"instruction": "Say hi.", "input": "", "output": "hi"}]


def test_alpaca_rendering():
    examples = data.alpaca_examples()
    assert len(examples) == 999 and examples[0]["instruction"] == "Describe a process of making crepes."
    prompt, response = data.render_alpaca({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert prompt.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n") and response == "5"
    prompt, _ = data.render_alpaca({"instruction": "Add.", "input": "", "output": "5"})
    assert "### Input:" not in prompt and prompt.endswith("### Response:\n")


def test_lm_batch_depends_only_on_seed_and_step():
    stream = torch.arange(10_000, dtype=torch.int32)
    a = data.lm_batch(stream, 64, 4, seed=1, step=7)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, data.lm_batch(stream, 64, 4, seed=1, step=7))  # resumable: no hidden state
    assert not torch.equal(a, data.lm_batch(stream, 64, 4, seed=1, step=8))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError):
        data.lm_batch(stream[:10], 64, 4, seed=1, step=0)


def test_corpus_reads_every_shipped_file():
    docs = data.read_corpus()
    sources = {d.name.split(":")[0] for d in docs}
    assert sources == {"gutenberg.zip", "state_union.zip", "wiki_demo.txt", "abc.zip", "movie_reviews.zip", "inaugural.zip"}
    assert not any("README" in d.name for d in docs)
    assert sum(len(d.text) for d in docs) > 25_000_000
