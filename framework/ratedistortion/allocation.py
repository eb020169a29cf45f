"""Rate allocation under a global bits-per-weight budget.

The problem: tensors l = 1..L with n_l weights, each offered a menu of coding options c
with rate r_l(c) bits per weight (all side information counted) and a weighted distortion
D_l(c); choose one option per tensor to minimise sum_l D_l(c_l) subject to
sum_l n_l r_l(c_l) <= budget * sum_l n_l.

`allocate` solves the Lagrangian relaxation (each tensor minimises D_l + lambda n_l r_l, with
lambda bisected to the budget; Shoham & Gersho, "Efficient bit allocation for an arbitrary
set of quantizers", IEEE Trans. ASSP 36(9), 1988), which lands on the lower convex hull of
every tensor's operational D(R) curve, then spends what the hull's corner left unspent
greedily on the upgrades with the best distortion drop per bit that still fit. The
Lagrangian points are optimal for the budgets they meet exactly; the greedy fill is a
heuristic for the slack between two of them.

`reverse_water_filling` is the theoretical counterpart for independent Gaussian sources
(Cover & Thomas, Elements of Information Theory, Thm. 10.3.3): component l of variance
s_l gets R_l = max(0, 1/2 log2(s_l / theta)), with theta set by the budget. With weights
w_l (sensitivities) the sources are w_l-scaled: s_l = w_l sigma_l^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Option:
    """One way to code one tensor: its rate (bits per weight) and weighted distortion."""

    rate: float
    distortion: float


def _choose(options: Sequence[Option], n: int, lam: float) -> int:
    costs = [o.distortion + lam * n * o.rate for o in options]
    return min(range(len(options)), key=lambda i: (costs[i], options[i].rate))


def allocate(menus: Sequence[Sequence[Option]], sizes: Sequence[int], budget: float) -> list[int]:
    """Index of the chosen option for each tensor: least total distortion with the
    size-weighted mean rate at most `budget`. Raises ValueError if even the cheapest
    option of every tensor exceeds the budget."""
    if len(menus) != len(sizes) or not menus:
        raise ValueError("one menu of options per tensor, at least one tensor")
    total = float(sum(sizes))
    allowed = budget * total

    def bits(choice: Sequence[int]) -> float:
        return sum(n * m[i].rate for m, n, i in zip(menus, sizes, choice, strict=True))

    cheapest = [min(range(len(m)), key=lambda i, m=m: (m[i].rate, m[i].distortion)) for m in menus]
    if bits(cheapest) > allowed * (1 + 1e-12):
        least = bits(cheapest) / total
        raise ValueError(
            f"budget {budget:g} bits/weight is below the cheapest options' {least:.4f}"
        )

    # lambda = 0 picks the least distortion everywhere; large lambda the least rate.
    lo, hi = 0.0, 1.0
    while bits([_choose(m, n, hi) for m, n in zip(menus, sizes, strict=True)]) > allowed:
        hi *= 2.0
        if hi > 1e300:
            break
    best = [_choose(m, n, hi) for m, n in zip(menus, sizes, strict=True)]
    if bits([_choose(m, n, lo) for m, n in zip(menus, sizes, strict=True)]) <= allowed:
        return [_choose(m, n, lo) for m, n in zip(menus, sizes, strict=True)]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        choice = [_choose(m, n, mid) for m, n in zip(menus, sizes, strict=True)]
        if bits(choice) <= allowed:
            hi, best = mid, choice
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return _greedy_fill(menus, sizes, best, allowed - bits(best))


def _greedy_fill(
    menus: Sequence[Sequence[Option]], sizes: Sequence[int], choice: list[int], slack: float
) -> list[int]:
    """Upgrade one tensor at a time (largest distortion drop per extra bit that fits)."""
    choice = list(choice)
    while True:
        best_gain, best_move = 0.0, None
        for t, (menu, n) in enumerate(zip(menus, sizes, strict=True)):
            now = menu[choice[t]]
            for i, o in enumerate(menu):
                extra = n * (o.rate - now.rate)
                drop = now.distortion - o.distortion
                if extra <= 0 or extra > slack or drop <= 0:
                    continue
                if drop / extra > best_gain:
                    best_gain, best_move = drop / extra, (t, i, extra)
        if best_move is None:
            return choice
        t, i, extra = best_move
        choice[t] = i
        slack -= extra


def reverse_water_filling(
    variances: Sequence[float], sizes: Sequence[int], budget: float
) -> tuple[list[float], float]:
    """Rates R_l (bits per weight) for Gaussian sources of the given (weighted) variances
    with mean rate `budget`, and the total distortion sum_l n_l min(s_l, theta)."""
    if not variances:
        return [], 0.0
    total = float(sum(sizes))

    def mean_rate(theta: float) -> float:
        return (
            sum(
                n * max(0.0, 0.5 * math.log2(s / theta))
                for s, n in zip(variances, sizes, strict=True)
                if s > 0
            )
            / total
        )

    positive = [s for s in variances if s > 0]
    if not positive:
        return [0.0] * len(variances), 0.0
    lo, hi = min(positive) * 2.0 ** (-2.0 * budget - 2.0), max(positive)
    for _ in range(200):  # mean_rate falls as theta grows: bisect in log space
        mid = math.sqrt(lo * hi)
        if mean_rate(mid) > budget:
            lo = mid
        else:
            hi = mid
    theta = hi
    rates = [max(0.0, 0.5 * math.log2(s / theta)) if s > 0 else 0.0 for s in variances]
    distortion = sum(n * min(s, theta) for s, n in zip(variances, sizes, strict=True))
    return rates, distortion
