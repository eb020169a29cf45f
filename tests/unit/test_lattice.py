"""E8: nearest-point search is exact, shell counts follow the theta series, and the ball
codebook's measured gap at 2 bits."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from framework.errors import ConfigError
from framework.ratedistortion import lattice
from framework.ratedistortion.quantizers import e8_quantize, gap_bits


def _in_e8(y: np.ndarray) -> np.ndarray:
    integer = np.all(y == np.rint(y), axis=1)
    half = np.all(y - 0.5 == np.rint(y - 0.5), axis=1)
    even = np.rint(y.sum(axis=1)) % 2 == 0
    return (integer | half) & even


def _grid(values: list[float]) -> np.ndarray:
    return np.stack(np.meshgrid(*[values] * 8, indexing="ij"), axis=-1).reshape(-1, 8)


@functools.cache
def _points(max_norm2: int) -> np.ndarray:
    """All E8 points with squared norm <= max_norm2 (<= 4), by enumeration."""
    ints = _grid([-2.0, -1.0, 0.0, 1.0, 2.0])
    pts = np.concatenate([ints, _grid([-1.5, -0.5, 0.5, 1.5])])
    pts = pts[_in_e8(pts)]
    return pts[(pts**2).sum(axis=1) <= max_norm2 + 1e-9]


def test_ball_sizes_follow_the_theta_series() -> None:
    assert [lattice.ball_size(m) for m in range(4)] == [1, 241, 2401, 9121]
    assert len(_points(2)) == 241 and len(_points(4)) == 2401
    assert lattice.shells_for_rate(2.0) == 5  # 56881 <= 65536 < 117361


def test_nearest_point_is_exact() -> None:
    """Against brute force over every E8 point of norm^2 <= 4 for inputs well inside it
    (norm <= 0.9: their nearest lattice point has norm^2 <= 2 and is in the list)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 8))
    x *= 0.9 * rng.random((400, 1)) / np.linalg.norm(x, axis=1, keepdims=True)
    pts = _points(4)
    d_brute = ((x[:, None, :] - pts[None]) ** 2).sum(-1).min(axis=1)
    y = lattice.nearest_e8(x)
    assert _in_e8(y).all()
    assert np.allclose(((x - y) ** 2).sum(axis=1), d_brute)
    # Far from the origin too: the result is a lattice point at most the packing radius
    # (covering radius of E8 is 1) away.
    far = rng.standard_normal((2000, 8)) * 5
    yf = lattice.nearest_e8(far)
    assert _in_e8(yf).all() and (((far - yf) ** 2).sum(axis=1) <= 1.0 + 1e-9).all()


def test_ball_quantizer_stays_in_its_codebook() -> None:
    ball = lattice.E8Ball(shells=2, scale=0.7)
    x = np.random.default_rng(1).standard_normal((3000, 8)) * 2
    scaled = ball.quantize(x) / 0.7
    y = np.rint(2 * scaled) / 2  # undo the float error of the scale
    assert np.allclose(scaled, y, atol=1e-9)
    assert _in_e8(y).all() and ((y**2).sum(axis=1) <= 4 + 1e-9).all()


def test_e8_two_bits_measured_gap() -> None:
    x = np.random.default_rng(2).standard_normal(1 << 15)
    out = e8_quantize(x, 2.0)
    assert out.rate == pytest.approx(math.log2(56881) / 8)
    gap = gap_bits(float(np.mean((out.x_hat - x) ** 2)), out.rate)
    assert 0.2 < gap < 0.33  # measured 0.30; Lloyd-Max is 0.458


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^shells:"):
        lattice.E8Ball(0, 1.0)
    with pytest.raises(ConfigError, match=r"^scale:"):
        lattice.E8Ball(1, -1.0)
