"""Run by the DeepSparse environment's Python (see losa/speed.py): times the prefill and decode ONNX graphs with
``deepsparse.Engine`` and prints one JSON line. Reads its job as JSON on stdin. Imports nothing from losa."""

import json
import statistics
import sys
import time

import numpy as np
from deepsparse import Engine


def median_ms(fn, repeats):
    # losa.speed._median_ms again: this file runs in DeepSparse's environment, which has no torch (nor losa)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inner = fn()
        times.append(inner if isinstance(inner, float) else time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    job = json.loads(sys.stdin.read())
    ids = np.asarray(job["prompt"], dtype=np.int64)
    kw = {"num_cores": job["threads"]} if job.get("threads") else {}
    pre = Engine(job["prefill"], batch_size=1, **kw)
    dec = Engine(job["decode_graph"], batch_size=1, **kw)
    first = pre([ids])

    def steps():
        # DeepSparse compiles for fixed shapes: every step attends to the prompt's cache (the cache does not grow),
        # i.e. the latency of one token at a context of len(prompt)
        out = pre([ids])
        tok = out[0][:, -1:].argmax(-1).astype(np.int64)
        start = time.perf_counter()
        for _ in range(job["decode"]):
            step = dec([tok, *out[1:]])
            tok = step[0][:, -1:].argmax(-1).astype(np.int64)
        return time.perf_counter() - start

    prefill_ms = median_ms(lambda: pre([ids]), job["repeats"])
    decode_ms = median_ms(steps, job["repeats"]) / job["decode"]
    print(json.dumps({"prefill_ms": prefill_ms, "decode_ms": decode_ms,
                      "logits": first[0][0, -1].astype(float).tolist()}))


if __name__ == "__main__":
    main()
