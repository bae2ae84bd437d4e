"""The claims report: verdict rules on paired seeds, and each claim read from synthetic results frames."""

import pandas as pd

from flows.claims import claims, combine, render, verdict


def test_verdict_pairs_seeds():
    assert verdict({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.0, 2: 4.0}) == "holds"
    assert verdict({0: 1.0, 1: 5.0}, {0: 4.0, 1: 4.5}) == "holds on average"  # seed 1 loses, the mean wins
    assert verdict({0: 5.0}, {0: 4.0}) == "fails"
    assert verdict({0: 4.0}, {0: 4.0}) == "fails"  # a tie is not a win
    assert verdict({0: 1.0}, {1: 2.0}) == "not measured"  # no common seed
    assert verdict({0: float("nan")}, {0: 2.0}) == "not measured"
    assert combine(["holds", "holds"]) == "holds"
    assert combine(["holds", "holds on average"]) == "holds on average"
    assert combine(["holds", "fails"]) == "mixed"
    assert combine(["fails", "not measured"]) == "fails"
    assert combine(["not measured"]) == "not measured"


def _row(method, ppl, seed=0, pruner="wanda", sparsity=0.7, ablate="", pattern="unstructured", steps=3, **kw):
    row = dict(method=method, ppl=ppl, seed=seed, pruner=pruner, sparsity=sparsity, ablate=ablate, pattern=pattern,
               steps=steps, achieved_sparsity=sparsity if method != "lora" else 0.0,
               sparsity_before_merge=sparsity if method == "lora" else float("nan"), label=method, run_id=None)
    row.update(kw)
    return row


def test_claims_from_frames():
    seeds = pd.DataFrame([r for s in (0, 1, 2) for r in (
        _row("pruned", 100 + s, s), _row("lora", 60 + s, s), _row("losa", 40 + s, s),
        _row("losa", 50 + s, s, ablate="lsr"), _row("losa", 45 + s, s, ablate="sra"),
        _row("losa", 39 + s, s, ablate="dsa"))])  # -DSA better than LoSA: that part fails
    steps = pd.DataFrame([_row("losa", 50, steps=1), _row("losa", 55, steps=5)])
    nm = pd.DataFrame([_row("losa", 80, pattern="2:8", sparsity=0.75), _row("losa", 70, pattern="mixed-2:8",
                                                                           sparsity=0.75)])
    asked = []
    results = pd.concat([seeds, steps, nm], ignore_index=True)
    results["cell_id"] = [f"c{i}" for i in range(len(results))]
    out = claims(results, why=lambda frame, where: asked.append(where) or [f"why {where.get('ablate', where)}"])
    verdicts = [c.verdict for c in out]
    # claim 1 is partly measured (no 60 % cells); the T = 1/5 LoSA cells do not enter claims 1 and 3 (T = 3 there)
    assert verdicts == ["holds (partly measured)", "holds", "mixed", "mixed", "holds"], verdicts
    assert asked and asked[0]["ablate"] == "dsa"  # per-layer data asked for the failing comparison only
    assert "why dsa" in out[2].why
    text = render("m", out, "budget", {"seeds": "m-seeds"})
    assert "| Each of −LSR, −SRA, −DSA is worse than LoSA | mixed |" in text
    assert "40.00 ± 1.00 (n=3)" in text  # LoSA over the three seeds


def test_missing_grids_say_not_measured():
    out = claims(pd.DataFrame())
    assert all(c.verdict == "not measured" for c in out)
