"""lm-eval ``custom_dataset`` loaders of the shipped zero-shot files (:func:`losa.data.zeroshot_docs`), and the
document functions two tasks need. lm-eval imports this file by path from the task YAMLs beside it."""

from __future__ import annotations

import re


def _split(task: str, process=None):
    import datasets

    from losa import data

    _, split = data.ZEROSHOT_FILES[task]
    docs = data.zeroshot_docs(task)
    if process is not None:  # here rather than in a datasets.map: no function hashing, no cache files
        docs = [process(d) for d in docs]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def boolq(**_):
    return _split("boolq")


def rte(**_):
    return _split("rte")


def hellaswag(**_):
    return _split("hellaswag", _hellaswag_doc)


def winogrande(**_):
    return _split("winogrande")


def arc_easy(**_):
    return _split("arc_easy")


def arc_challenge(**_):
    return _split("arc_challenge")


def openbookqa(**_):
    return _split("openbookqa")


def piqa(**_):
    return _split("piqa")


# HellaSwag: lm-eval's own cleaning (lm_eval/tasks/hellaswag/utils.py) on the converted context
def _clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(d: dict) -> dict:
    return {**d, "query": _clean(d["ctx"]), "choices": [_clean(e) for e in d["endings"]], "gold": int(d["label"])}


# WinoGrande: lm-eval's partial scoring (lm_eval/tasks/winogrande/preprocess_winogrande.py): the choices are the
# sentence up to the blank with each option, the continuation after the blank is scored
def winogrande_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_target(doc):
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_choice(doc):
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + opt for opt in (doc["option1"], doc["option2"])]
