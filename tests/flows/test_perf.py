"""The nightly regression's speed ratios: noise bands from repeats, moves outside them flagged (flows/perf.py)."""

from __future__ import annotations

import json

from flows import perf


def test_band_is_three_sd_or_five_percent():
    b = perf.band({"a": [1.0, 1.1, 0.9], "b": [2.0, 2.0, 2.0], "c": []})
    assert set(b) == {"a", "b"}
    assert abs(b["a"]["band"] - 0.3) < 1e-9 and b["a"]["n"] == 3
    assert b["b"]["band"] == 0.1 and b["b"]["sd"] == 0.0  # no spread: the 5 % floor


def test_compare_flags_moves_outside_the_band_and_missing_ratios():
    base = {"a": {"mean": 1.0, "band": 0.1}, "b": {"mean": 2.0, "band": 0.1}, "c": {"mean": 1.0, "band": 0.1}}
    moved = perf.compare({"a": 1.05, "b": 2.5}, base)
    assert [m["ratio"] for m in moved] == ["b", "c"] and moved[1]["now"] is None


def test_check_perf_logs_and_flags(tmp_path, monkeypatch):
    from flows import grid

    path = tmp_path / "perf.json"
    path.write_text(json.dumps({"ratios": {"prune_over_floor": {"mean": 1.5, "band": 0.1}}, "settings": {}}))
    monkeypatch.setattr(perf, "once", lambda **_: {"prune_over_floor": 2.0})
    assert [m["ratio"] for m in grid.check_perf(None, path)] == ["prune_over_floor"]
    monkeypatch.setattr(perf, "once", lambda **_: {"prune_over_floor": 1.55})
    assert grid.check_perf(None, path) == []
    assert grid.check_perf(None, tmp_path / "none.json") == []  # no baseline: nothing checked
