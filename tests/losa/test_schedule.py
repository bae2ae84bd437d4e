"""DSA schedules (method.md §4): cubic target sparsity per step and the growing mean rank."""

import pytest

from losa.schedule import cubic_sparsity, mean_rank, sparsity_schedule


def test_cubic_value_by_hand():
    assert cubic_sparsity(0.7, 1, 5) == pytest.approx(0.7 - 0.7 * 0.8**3, abs=1e-15)
    assert cubic_sparsity(0.7, 1, 5) == pytest.approx(0.3416, abs=1e-12)
    assert cubic_sparsity(0.5, 2, 4) == pytest.approx(0.5 - 0.5 * 0.125, abs=1e-15)


@pytest.mark.parametrize("target,T", [(0.7, 5), (0.5, 1), (0.8, 10), (0.01, 3)])
def test_schedule_increases_strictly_and_ends_at_target(target, T):
    sched = sparsity_schedule(target, T)
    assert len(sched) == T
    assert sched[-1] == target
    assert 0 < sched[0]
    assert all(a < b for a, b in zip(sched, sched[1:]))
    assert sched == [cubic_sparsity(target, t, T) for t in range(1, T + 1)]


def test_zero_target_stays_zero():
    assert sparsity_schedule(0.0, 3) == [0.0, 0.0, 0.0]


def test_mean_rank():
    assert mean_rank(1) == 6
    assert mean_rank(5) == 10
    assert [mean_rank(t, omega1=4, delta_omega=2) for t in (1, 2, 3)] == [4, 6, 8]
    assert mean_rank(3, delta_omega=0) == 6


@pytest.mark.parametrize(
    "args,match",
    [((0.7, 0, 5), "1..5"), ((0.7, 6, 5), "1..5"), ((0.7, 1, 0), "T must be"), ((1.0, 1, 5), r"\[0, 1\)"),
     ((-0.1, 1, 5), r"\[0, 1\)"), ((0.7, 1.0, 5), "int")],
)
def test_cubic_bad_args_raise(args, match):
    with pytest.raises(ValueError, match=match):
        cubic_sparsity(*args)


def test_schedule_and_rank_bad_args_raise():
    with pytest.raises(ValueError, match="T must be"):
        sparsity_schedule(0.5, 0)
    with pytest.raises(ValueError, match="t >= 1"):
        mean_rank(0)
    with pytest.raises(ValueError, match="omega1"):
        mean_rank(1, omega1=0)
    with pytest.raises(ValueError, match="delta_omega"):
        mean_rank(2, delta_omega=-1)
