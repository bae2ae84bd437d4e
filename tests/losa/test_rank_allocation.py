"""SRA (method.md §3): ranks proportional to reconstruction error, clipped, and corrected to sum Omega * L."""

import random

import pytest
import torch

from losa.rank_allocation import allocate_ranks


def test_plain_rounding_when_no_correction_is_needed():
    assert allocate_ranks([1.0, 2.0, 3.0], 4) == [2, 4, 6]  # L_avg = 2: 4 * L_l / 2, summing to 4 * 3 already
    errors = [1.2, 2.9, 1.9]  # L_avg = 2: 1.8, 4.35, 2.85 round to 2, 4, 3 (sum 9 = 3 * 3)
    plain = [round(3 * e / 2.0) for e in errors]
    assert sum(plain) == 9
    assert allocate_ranks(torch.tensor(errors), 3) == plain == [2, 4, 3]


def test_correction_adds_to_the_highest_errors_and_removes_from_the_lowest():
    # raw 1.23, 1.23, 1.23, 12.3 -> 1, 1, 1, 12 (sum 15 < 16): the highest-error block takes the missing one
    assert allocate_ranks([1.0, 1.0, 1.0, 10.0], 4) == [1, 1, 1, 13]
    # L_avg = 2: raw 1.5 x4 (-> 2, half to even) and 9, sum 17 > 15: the 2 lowest-error blocks (earliest) give one
    errors = [1.0, 1.0, 1.0, 1.0, 6.0]
    assert allocate_ranks(errors, 3) == [1, 1, 2, 2, 9]


def test_correction_repeats_passes_until_exact():
    # one pass (as the official code) would add only 4 of the 20 missing ranks
    ranks = allocate_ranks([0.0, 0.0, 0.0, 0.0, 100.0], 8, r_min=1, r_max=16)
    assert ranks == [6, 6, 6, 6, 16]
    # raw 8, 0, 0, 0 -> clipped 3, 1, 1, 1 (sum 6 < 8): the block at r_max is skipped, the next ones take one each
    ranks = allocate_ranks([100.0, 1e-3, 1e-3, 1e-3], 2, r_min=1, r_max=3)
    assert ranks == [3, 2, 2, 1]


def test_all_zero_errors_give_the_mean_rank():
    assert allocate_ranks([0.0, 0.0, 0.0], 7) == [7, 7, 7]


def test_random_errors_sum_bounds_and_order():
    rng = random.Random(0)
    for _ in range(300):
        n_layers = rng.randint(1, 40)
        r_min = rng.randint(1, 4)
        r_max = rng.randint(r_min, 20)
        omega = rng.randint(r_min, r_max)
        kind = rng.random()
        if kind < 0.25:
            errors = [float(rng.choice([0, 1, 2])) for _ in range(n_layers)]  # ties and zeros
        elif kind < 0.5:
            errors = [rng.expovariate(1.0) ** 4 for _ in range(n_layers)]  # skewed: heavy clipping
        else:
            errors = [rng.uniform(0.0, 5.0) for _ in range(n_layers)]
        ranks = allocate_ranks(errors, omega, r_min=r_min, r_max=r_max)
        assert all(isinstance(r, int) for r in ranks)
        assert sum(ranks) == omega * n_layers
        assert all(r_min <= r <= r_max for r in ranks)
        for i in range(n_layers):
            for j in range(n_layers):
                if errors[i] > errors[j]:
                    assert ranks[i] >= ranks[j]


@pytest.mark.parametrize(
    "errors,kwargs,match",
    [
        ([], dict(mean_rank=6), "non-empty"),
        ([[1.0, 2.0]], dict(mean_rank=6), "1-D"),
        ([1.0, -0.5], dict(mean_rank=6), ">= 0"),
        ([1.0, float("nan")], dict(mean_rank=6), ">= 0"),
        ([1.0, 2.0], dict(mean_rank=6, r_min=0), "r_min"),
        ([1.0, 2.0], dict(mean_rank=6, r_min=5, r_max=4), "r_min"),
        ([1.0, 2.0], dict(mean_rank=17), "outside"),
        ([1.0, 2.0], dict(mean_rank=2, r_min=3), "outside"),
        ([1.0, 2.0], dict(mean_rank=6.0), "int"),
    ],
)
def test_bad_inputs_raise(errors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        allocate_ranks(errors, **kwargs)
