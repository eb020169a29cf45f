"""An E8-lattice codebook quantizer for 8-dimensional blocks.

E8 = D8 ∪ (D8 + 1/2), where D8 holds the integer vectors with an even coordinate sum; it
is the densest lattice packing in 8 dimensions, with a normalised second moment
G(E8) = 0.0717 against 1/12 = 0.0833 for the integer grid, 0.65 dB of the 1.53 dB that
separates scalar rounding from an ideal space-filling cell (Conway & Sloane, "Sphere
Packings, Lattices and Groups", ch. 4 and 21; nearest-point algorithm: Conway & Sloane,
"Fast quantizing and decoding algorithms for lattice quantizers and codes", IEEE Trans.
Inf. Theory 28(2), 1982). QuIP# (Tseng et al., arXiv:2402.04396) quantizes weights with a
2^16-point codebook cut from E8; this module is its own code, in the same spirit.

The codebook is the scaled lattice s * E8 cut to a ball: every point with squared norm
<= 2M, i.e. whole shells, the largest M whose point count N(M) fits 2^(8R). N(M) comes from
the theta series of E8: 240 * sigma_3(m) points of squared norm 2m. The rate is
log2(N(M)) / 8 bits per coordinate (a fixed-rate index into the codebook; no bitstream is
written for it), slightly below R because shells are not split.

Encoding: the lattice's nearest point of x / s; a point that falls outside the ball
(overload) is replaced by the lattice point of the largest shrunken copy alpha * x / s
(found by bisection) that lands inside: a codebook point near the ray through x, not
always the nearest one, so the measured MSE is what this encoder achieves, not the
codebook's optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from framework.errors import ConfigError

DIM = 8
_SHRINK_STEPS = 12  # bisection steps for overloaded vectors (alpha resolved to 2^-12)


def nearest_d8(x: np.ndarray) -> np.ndarray:
    """Nearest point of D8 to each row of x [n, 8]: round every coordinate; if the sum is
    odd, re-round the coordinate with the largest rounding error the other way."""
    f = np.rint(x)
    odd = (f.sum(axis=1) % 2) != 0
    if odd.any():
        rows = np.nonzero(odd)[0]
        err = x[rows] - f[rows]
        col = np.abs(err).argmax(axis=1)
        e = err[np.arange(rows.size), col]
        f[rows, col] += np.where(e >= 0, 1.0, -1.0)
    return f


def nearest_e8(x: np.ndarray) -> np.ndarray:
    """Nearest point of E8 = D8 ∪ (D8 + 1/2) to each row of x [n, 8]."""
    a = nearest_d8(x)
    b = nearest_d8(x - 0.5) + 0.5
    closer_b = ((x - b) ** 2).sum(axis=1) < ((x - a) ** 2).sum(axis=1)
    return np.where(closer_b[:, None], b, a)


def _sigma3(m: int) -> int:
    return sum(d**3 for d in range(1, m + 1) if m % d == 0)


def ball_size(shells: int) -> int:
    """Number of E8 points with squared norm <= 2 * shells (theta series of E8)."""
    return 1 + 240 * sum(_sigma3(m) for m in range(1, shells + 1))


def shells_for_rate(rate: float) -> int:
    """The largest number of whole shells whose ball has at most 2^(8 * rate) points."""
    budget = 2.0 ** (DIM * rate)
    m = 0
    while ball_size(m + 1) <= budget:
        m += 1
    return m


@dataclass(frozen=True)
class E8Ball:
    """s * E8 cut to the ball of squared norm 2 * shells * s^2."""

    shells: int
    scale: float

    def __post_init__(self) -> None:
        if self.shells < 1:
            raise ConfigError("shells", f"{self.shells} must be >= 1")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError("scale", f"{self.scale} must be a finite number > 0")

    @property
    def size(self) -> int:
        return ball_size(self.shells)

    @property
    def rate(self) -> float:
        return math.log2(self.size) / DIM

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """x [n, 8] -> codebook points [n, 8]."""
        u = np.asarray(x, dtype=np.float64) / self.scale
        y = nearest_e8(u)
        limit = 2.0 * self.shells + 1e-9
        over = np.nonzero((y**2).sum(axis=1) > limit)[0]
        if over.size:
            uo = u[over]
            lo = np.zeros(over.size)
            hi = np.ones(over.size)
            for _ in range(_SHRINK_STEPS):
                mid = 0.5 * (lo + hi)
                inside = (nearest_e8(uo * mid[:, None]) ** 2).sum(axis=1) <= limit
                lo = np.where(inside, mid, lo)
                hi = np.where(inside, hi, mid)
            y[over] = nearest_e8(uo * lo[:, None])
        return y * self.scale


def fit_e8(x: np.ndarray, rate: float, fit_samples: int = 1 << 14) -> E8Ball:
    """The ball for `rate` with its scale chosen to minimise MSE on (a prefix of) x [n, 8]."""
    shells = shells_for_rate(rate)
    if shells < 1:
        raise ConfigError("rate", f"{rate} is too low for an E8 ball (needs >= 0.99 bit)")
    fit = np.asarray(x, dtype=np.float64)[: max(fit_samples // DIM, 1)]
    # Points of the outermost shell have norm sqrt(2M) * s; a unit-variance block has norm
    # about sqrt(8), so s sits near sqrt(8 / 2M); the optimum lies a little above (overload costs more
    # than granular error). Search from a quarter to twice that.
    guess = math.sqrt(DIM / (2.0 * shells))

    def mse(log_s: float) -> float:
        return float(((E8Ball(shells, math.exp(log_s)).quantize(fit) - fit) ** 2).mean())

    best = minimize_scalar(
        mse,
        bounds=(math.log(guess / 4), math.log(guess * 2)),
        method="bounded",
        options={"xatol": 1e-3},
    )
    return E8Ball(shells, float(math.exp(best.x)))
