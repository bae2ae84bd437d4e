"""Zero-shot accuracy through stock lm-eval on the shipped task files (losa/zeroshot_tasks, method.md §6)."""

from __future__ import annotations

import math

import pytest

from losa import data
from losa.evaluate import PAPER_TASKS, ZEROSHOT_TASKS, headline, zero_shot

pytestmark = pytest.mark.skipif(any(data.find(f) is None for t in ZEROSHOT_TASKS for f in data.ZEROSHOT_FILES[t][0]),
                                reason="shipped zero-shot data not found")

# the shipped record counts (MANIFEST §3, §5)
COUNTS = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
          "openbookqa": 500, "piqa": 1838}


def _gold(task: str, doc: dict) -> int:
    """The gold choice index read off the raw record, independently of the task files' templates."""
    if task in ("boolq", "rte", "hellaswag", "piqa"):
        return int(doc["label"])
    if task == "winogrande":
        return int(doc["answer"]) - 1
    return doc["choices"]["label"].index(doc["answerKey"].strip())


def _stub(gold_bonus: float):
    """An lm-eval LM whose log-likelihood of a choice is 0 for the gold one and -gold_bonus for the others."""
    from lm_eval.api.model import LM

    class Oracle(LM):
        def loglikelihood(self, requests):
            out = []
            for req in requests:
                task = req.task_name
                out.append((0.0 if req.idx == _gold(task, req.doc) else -gold_bonus, False))
            return out

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    return Oracle()


def test_records_carry_the_fields_and_counts_of_the_standard_tasks():
    for task, n in COUNTS.items():
        docs = data.zeroshot_docs(task)
        assert len(docs) == n, task
    assert data.zeroshot_docs("rte")[0]["sentence1"].startswith("Dana Reeve")  # MANIFEST §5: the first pair
    assert data.zeroshot_docs("rte")[0]["label"] == 1
    hs = data.zeroshot_docs("hellaswag")[0]
    assert hs["ctx"].startswith("Roof shingle removal: A man is sitting on a roof.") and len(hs["endings"]) == 4
    assert sum(d["label"] for d in data.zeroshot_docs("boolq")) == 2033  # MANIFEST §3: 2,033 true
    obqa = data.zeroshot_docs("openbookqa")[0]
    assert set(obqa) >= {"question_stem", "choices", "answerKey"} and len(obqa["choices"]["text"]) == 4


def test_a_model_that_favours_the_gold_choice_scores_one_on_every_task():
    res = zero_shot(_stub(10.0), None, ZEROSHOT_TASKS, limit=20)
    for task in ZEROSHOT_TASKS:
        assert res[task]["acc"] == 1.0, task
        assert res[task]["n"] == 20
        if "acc_norm" in res[task]:
            assert res[task]["acc_norm"] == 1.0, task
    assert res["mean"]["acc"] == 1.0
    # the other way round: gold least likely scores 0
    res = zero_shot(_stub(-10.0), None, ["rte", "arc_easy"], limit=20)
    assert res["rte"]["acc"] == 0.0 and res["arc_easy"]["acc_norm"] == 0.0


def test_every_task_scores_a_tiny_model_offline(tmp_path, monkeypatch):
    from tiny_models import tiny_llama
    from transformers import AutoTokenizer

    from losa.zoo import TESTBED

    tok = AutoTokenizer.from_pretrained(TESTBED)
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing may be downloaded or cached
    res = zero_shot(model, tok, ZEROSHOT_TASKS, limit=4, batch_size=4)
    assert set(res) == set(ZEROSHOT_TASKS) | {"mean"}
    for task in ZEROSHOT_TASKS:
        row = res[task]
        assert row["n"] == 4 and 0.0 <= row["acc"] <= 1.0 and math.isfinite(row["acc_stderr"]), task
    # acc_norm exactly where lm-eval's standard task reports it
    assert {t for t in ZEROSHOT_TASKS if "acc_norm" in res[t]} == {"hellaswag", "arc_easy", "arc_challenge",
                                                                      "openbookqa", "piqa"}
    assert res["mean"]["acc"] == pytest.approx(sum(headline(res[t]) for t in ZEROSHOT_TASKS) / len(ZEROSHOT_TASKS))
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))


def test_bad_requests_fail_before_lm_eval_runs():
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        zero_shot(None, None, ["boolq", "mmlu"])
    with pytest.raises(ValueError, match="limit"):
        zero_shot(None, None, PAPER_TASKS, limit=0)
    with pytest.raises(ValueError, match="no zero-shot tasks"):
        zero_shot(None, None, [])
