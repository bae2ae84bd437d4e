"""Pattern parsing and validation (N = weights kept per group of M)."""

import pytest

from losa.patterns import Pattern


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), (" 2:8 ", 2, 8), ("1:4", 1, 4)])
def test_parse_nm(text, n, m):
    p = Pattern.parse(text)
    assert p == Pattern.nm(n, m)
    assert (p.n, p.m) == (n, m)
    assert p.is_nm
    assert str(p) == f"{n}:{m}"


@pytest.mark.parametrize("text", ["unstructured", "Unstructured", "", "none"])
def test_parse_unstructured(text):
    p = Pattern.parse(text)
    assert p == Pattern.unstructured() == Pattern()
    assert not p.is_nm
    assert p.sparsity is None
    assert str(p) == "unstructured"


def test_parse_passes_pattern_through():
    p = Pattern.nm(2, 4)
    assert Pattern.parse(p) is p


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "-1:4", "2:0"])
def test_parse_rejects_bad_nm(text):
    with pytest.raises(ValueError, match=r"0 < N < M"):
        Pattern.parse(text)


@pytest.mark.parametrize("text", ["3", "a:b", "2:4:8", "2/4", "dense"])
def test_parse_rejects_garbage(text):
    with pytest.raises(ValueError, match=r"'unstructured' or 'N:M'"):
        Pattern.parse(text)


@pytest.mark.parametrize("n,m", [(4, 4), (0, 4), (5, 4)])
def test_constructor_rejects_bad_nm(n, m):
    with pytest.raises(ValueError, match="N:M"):
        Pattern.nm(n, m)


@pytest.mark.parametrize("text,sparsity", [("2:4", 0.5), ("2:8", 0.75), ("4:8", 0.5), ("1:4", 0.75), ("3:4", 0.25)])
def test_nm_implied_sparsity(text, sparsity):
    p = Pattern.parse(text)
    assert p.sparsity == pytest.approx(sparsity)
    assert p.resolve_sparsity(None) == pytest.approx(sparsity)
    assert p.resolve_sparsity(sparsity) == pytest.approx(sparsity)  # an agreeing value is accepted


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.999])
def test_resolve_sparsity_unstructured_accepts(s):
    assert Pattern().resolve_sparsity(s) == s


@pytest.mark.parametrize("s", [1.0, 1.2, -0.1, None, float("nan")])
def test_resolve_sparsity_unstructured_rejects(s):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Pattern().resolve_sparsity(s)


@pytest.mark.parametrize("text,s", [("2:4", 0.6), ("2:8", 0.5), ("4:8", 0.75)])
def test_resolve_sparsity_rejects_contradiction(text, s):
    with pytest.raises(ValueError, match="contradicts"):
        Pattern.parse(text).resolve_sparsity(s)


def test_check_shape():
    Pattern.nm(2, 4).check_shape(64)
    Pattern.nm(2, 8).check_shape(64)
    Pattern().check_shape(63)  # unstructured accepts any width
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        Pattern.nm(2, 4).check_shape(66, "block 0 q_proj")
    with pytest.raises(ValueError, match="block 3 fc1"):
        Pattern.nm(4, 8).check_shape(36, "block 3 fc1")
