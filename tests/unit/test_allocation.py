"""Bit allocation: the Lagrangian + greedy allocation against exhaustive search on small
menus, the budget respected, and reverse water-filling against its closed form."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from framework.ratedistortion.allocation import Option, allocate, reverse_water_filling


def gaussian_menu(variance: float, rates=(2, 3, 4, 5)) -> list[Option]:
    # A convex operational curve with a scalar quantizer's 1.53 dB loss.
    return [Option(r, variance * 1.42 * 2.0 ** (-2 * r)) for r in rates]


def brute_force(menus, sizes, budget):
    best, best_d = None, math.inf
    for choice in itertools.product(*(range(len(m)) for m in menus)):
        bits = sum(n * m[i].rate for m, n, i in zip(menus, sizes, choice))
        if bits <= budget * sum(sizes) + 1e-9:
            d = sum(m[i].distortion for m, i in zip(menus, choice))
            if d < best_d:
                best, best_d = choice, d
    return best, best_d


def mean_rate(menus, sizes, choice) -> float:
    return sum(n * m[i].rate for m, n, i in zip(menus, sizes, choice)) / sum(sizes)


def total(menus, choice) -> float:
    return sum(m[i].distortion for m, i in zip(menus, choice))


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_optimal_at_the_lagrangian_points(seed: int) -> None:
    """A budget that some lambda meets exactly: the relaxation is tight, the answer is the
    exhaustive search's optimum."""
    rng = random.Random(seed)
    menus = [gaussian_menu(rng.uniform(0.1, 100.0)) for _ in range(5)]
    sizes = [rng.choice([100, 200, 400]) for _ in menus]
    lam = 10.0 ** rng.uniform(-5, -1)
    hull = [
        min(range(len(m)), key=lambda i, m=m, n=n: m[i].distortion + lam * n * m[i].rate)
        for m, n in zip(menus, sizes)
    ]
    budget = mean_rate(menus, sizes, hull)
    choice = allocate(menus, sizes, budget)
    assert mean_rate(menus, sizes, choice) <= budget + 1e-9
    _, optimum = brute_force(menus, sizes, budget)
    assert total(menus, choice) == pytest.approx(optimum, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_between_lagrangian_points_respects_the_budget(seed: int) -> None:
    """Any budget: never over it, never worse than spending nothing above the cheapest
    options, and within the gap the greedy fill leaves to the optimum on small menus."""
    rng = random.Random(100 + seed)
    menus = [gaussian_menu(rng.uniform(0.1, 100.0)) for _ in range(5)]
    sizes = [rng.choice([100, 200, 400]) for _ in menus]
    budget = rng.uniform(2.3, 4.5)
    choice = allocate(menus, sizes, budget)
    assert mean_rate(menus, sizes, choice) <= budget + 1e-9
    _, optimum = brute_force(menus, sizes, budget)
    assert optimum <= total(menus, choice) <= 1.25 * optimum
    # The budget is spent: no single upgrade still fits.
    slack = budget * sum(sizes) - mean_rate(menus, sizes, choice) * sum(sizes)
    for m, n, i in zip(menus, sizes, choice):
        assert all(n * (o.rate - m[i].rate) > slack + 1e-9 or o.rate <= m[i].rate for o in m)


def test_more_sensitive_tensors_get_more_bits() -> None:
    menus = [gaussian_menu(1.0), gaussian_menu(1000.0)]
    choice = allocate(menus, [100, 100], 3.0)
    assert menus[1][choice[1]].rate > menus[0][choice[0]].rate


def test_budget_below_the_cheapest_option_is_refused() -> None:
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate([gaussian_menu(1.0)], [10], 1.5)


def test_reverse_water_filling_closed_form() -> None:
    # Two sources, both above the water level: R_i = b + 1/2 log2(s_i / geometric mean).
    rates, distortion = reverse_water_filling([16.0, 1.0], [1, 1], 3.0)
    assert rates[0] == pytest.approx(4.0, abs=1e-6)
    assert rates[1] == pytest.approx(2.0, abs=1e-6)
    assert distortion == pytest.approx(2 * 16.0 * 2.0**-8, rel=1e-5)
    # A source below the water level gets no bits at all.
    rates, _ = reverse_water_filling([1.0, 1e-9], [1, 1], 1.0)
    assert rates[1] == 0.0 and rates[0] == pytest.approx(2.0, abs=1e-6)
