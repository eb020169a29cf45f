"""Scalar quantizers for N(0,1): designs match the literature, measured gaps match the
designs, and ECSQ's real bitstream sits within 0.30 bit of D(R) at 2-4 bits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from framework.errors import ConfigError
from framework.ratedistortion import quantizers as q

N = 1 << 16


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N)


def _mse(out: q.Quantized, x: np.ndarray) -> float:
    return float(np.mean((out.x_hat - x[: out.x_hat.size]) ** 2))


def test_gap_bits() -> None:
    assert q.gap_bits(2.0**-4, 2.0) == pytest.approx(0.0)
    assert q.gap_bits(2.0 * 2.0**-4, 2.0) == pytest.approx(0.5)  # twice the MSE: half a bit
    assert q.gap_bits(4.0 * 2.0**-6, 3.0, variance=4.0) == pytest.approx(0.0)


# Max (1960), table I and II: optimal uniform steps and Lloyd-Max MSEs for N(0,1).
@pytest.mark.parametrize(
    "bits,step,lloyd_mse",
    [(1, 1.596, 0.3634), (2, 0.9957, 0.1175), (3, 0.5860, 0.03454), (4, 0.3352, 0.009497)],
)
def test_designs_match_max_1960(bits: int, step: float, lloyd_mse: float) -> None:
    assert q.optimal_uniform_step(bits) == pytest.approx(step, abs=6e-4)
    thresholds, levels = q.lloyd_max(bits)
    assert q._cell_mse(thresholds, levels) == pytest.approx(lloyd_mse, rel=2e-3)
    assert np.all(np.diff(levels) > 0) and np.allclose(levels, -levels[::-1])


@pytest.mark.parametrize("rate", [1, 2, 3, 4])
def test_fixed_rate_codes_measure_their_design(source: np.ndarray, rate: int) -> None:
    lm = q.lloyd_max_quantize(source, rate)
    thresholds, levels = q.lloyd_max(rate)
    assert lm.rate == rate and lm.rate_source == "bytes"
    assert _mse(lm, source) == pytest.approx(q._cell_mse(thresholds, levels), rel=0.03)
    uni = q.uniform_quantize(source, rate)
    assert _mse(uni, source) >= _mse(lm, source) * 0.99  # Lloyd-Max is the optimum


def test_lloyd_max_two_bits_is_the_known_gap(source: np.ndarray) -> None:
    out = q.lloyd_max_quantize(source, 2)
    assert q.gap_bits(_mse(out, source), out.rate) == pytest.approx(0.458, abs=0.015)


@pytest.mark.parametrize("rate", [2, 3, 4])
def test_ecsq_within_030_bit_with_its_bitstream(source: np.ndarray, rate: int) -> None:
    out = q.ecsq_quantize(source, rate)
    assert out.rate_source == "bytes"
    assert rate - 0.01 <= out.rate <= rate
    gap = q.gap_bits(_mse(out, source), out.rate)
    # High-rate theory: 0.5 log2(pi e / 6) = 0.254 bit; side information adds a little.
    assert 0.2 < gap < 0.30


def test_rtn_codec_rate_counts_side_information(source: np.ndarray) -> None:
    plain = q.rtn_quantize(source, 3)
    coded = q.rtn_quantize(source, 3, ans=True)
    # 3-bit codes + fp16 scale + 3-bit zero point per 128 weights.
    assert plain.rate == pytest.approx(3 + 19 / 128)
    assert coded.rate < plain.rate - 0.2
    assert np.array_equal(plain.x_hat, coded.x_hat)


def test_bad_rates_name_the_key(source: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"^rate:"):
        q.lloyd_max_quantize(source, 2.5)
    with pytest.raises(ConfigError, match=r"^rate:"):
        q.uniform_quantize(source, 0)
    with pytest.raises(ConfigError, match=r"^rate:"):
        q.rtn_quantize(source, 1)
    assert math.isfinite(q.gap_bits(0.1, 1.0))
