"""Quantizers for a memoryless Gaussian source, measured against Shannon's D(R).

Each `*_quantize(x, rate)` takes unit-variance samples and returns a `Quantized`: the
reconstruction, the rate actually spent and where that rate was counted from:

* "bytes": a bitstream was written and the reconstruction decoded from it (uniform and
  Lloyd-Max codes packed at R bits, ECSQ's ANS stream with its model, the trellis bits
  (k per sample, no side information), RTN's container entry with its scales);
* "codebook": a fixed-rate index, log2(codebook size) bits per block (the E8 ball).

gap_bits(mse, rate) = 0.5 * log2(MSE / D(R)) with D(R) = sigma^2 2^(-2R) (Cover & Thomas,
Thm. 10.3.2): the extra rate an ideal code would need... read backwards, how many bits per
sample the quantizer is from the bound at its distortion. 6.02 dB per bit.

Designs: uniform scalar with the MSE-optimal step for N(0,1) and Lloyd-Max (S. P. Lloyd,
IEEE Trans. Inf. Theory 28(2), 1982; J. Max, IRE Trans. Inf. Theory 6(1), 1960) are
computed from the Gaussian density, not fitted to the samples; ECSQ's step is searched
until its real bitstream meets the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import ndtr

from framework.codecs.entropy import ECSQ, encode_ecsq, entropy_code_uniform
from framework.codecs.packing import pack_bits, unpack_bits
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import ConfigError
from framework.ratedistortion import lattice, trellis


@dataclass
class Quantized:
    x_hat: np.ndarray
    rate: float  # bits per sample actually spent
    rate_source: str  # "bytes" or "codebook"
    detail: str = ""  # design parameters, for the table


def gap_bits(mse: float, rate: float, variance: float = 1.0) -> float:
    """0.5 * log2(MSE / D(R)): bits per sample from the Gaussian bound at this rate."""
    return 0.5 * math.log2(mse / (variance * 2.0 ** (-2.0 * rate)))


def _check_rate(rate: float, lo: float = 1.0, hi: float = 8.0) -> None:
    if not lo <= rate <= hi:
        raise ConfigError("rate", f"{rate} is out of range [{lo}, {hi}]")


def _integer_rate(rate: float) -> int:
    _check_rate(rate)
    if rate != int(rate):
        raise ConfigError("rate", f"{rate} must be a whole number of bits for a fixed-rate code")
    return int(rate)


# ------------------------------------------------ Gaussian cell moments (closed forms)


def _phi(t: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(t)) / math.sqrt(2.0 * math.pi)


def _cell_mse(thresholds: np.ndarray, levels: np.ndarray) -> float:
    """E[(X - y)^2] for X ~ N(0,1), cells split at `thresholds` (sorted, len = levels - 1)."""
    a = np.concatenate([[-np.inf], thresholds])
    b = np.concatenate([thresholds, [np.inf]])
    m0 = ndtr(b) - ndtr(a)
    m1 = _phi(a) - _phi(b)  # integral of x phi(x) over the cell
    # integral of x^2 phi(x) = m0 + a phi(a) - b phi(b); t phi(t) -> 0 at +-inf.
    a_fin, b_fin = np.where(np.isinf(a), 0.0, a), np.where(np.isinf(b), 0.0, b)
    m2 = m0 + a_fin * _phi(a_fin) - b_fin * _phi(b_fin)
    return float(np.sum(m2 - 2.0 * levels * m1 + levels**2 * m0))


def uniform_levels(bits: int, step: float) -> np.ndarray:
    n = 1 << bits
    return (np.arange(n) - (n - 1) / 2.0) * step


def optimal_uniform_step(bits: int) -> float:
    """The step of the MSE-optimal 2^bits-level midrise uniform quantizer for N(0,1)
    (Max 1960, table II: 1.596, 0.9957, 0.5860, 0.3352 for 2, 4, 8, 16 levels)."""

    def mse(step: float) -> float:
        levels = uniform_levels(bits, step)
        return _cell_mse(0.5 * (levels[1:] + levels[:-1]), levels)

    res = minimize_scalar(mse, bounds=(1e-3, 4.0), method="bounded", options={"xatol": 1e-9})
    return float(res.x)


def lloyd_max(bits: int, iterations: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, levels) of the MSE-optimal fixed-rate scalar quantizer for N(0,1):
    Lloyd's alternation of nearest-neighbour thresholds and centroid levels, run on the
    density itself (closed-form cell moments), from the optimal uniform quantizer."""
    levels = uniform_levels(bits, optimal_uniform_step(bits))
    for _ in range(iterations):
        thresholds = 0.5 * (levels[1:] + levels[:-1])
        a = np.concatenate([[-np.inf], thresholds])
        b = np.concatenate([thresholds, [np.inf]])
        new = (_phi(a) - _phi(b)) / (ndtr(b) - ndtr(a))
        if np.max(np.abs(new - levels)) < 1e-13:
            levels = new
            break
        levels = new
    return 0.5 * (levels[1:] + levels[:-1]), levels


def _fixed_rate(x: np.ndarray, thresholds: np.ndarray, levels: np.ndarray, bits: int) -> Quantized:
    """Codes packed at `bits` each; the reconstruction is decoded from those bytes."""
    codes = np.searchsorted(thresholds, x).astype(np.uint8)
    data = pack_bits(codes, bits)
    decoded = unpack_bits(data, bits, x.size)
    return Quantized(levels[decoded], 8.0 * len(data) / x.size, "bytes")


def uniform_quantize(x: np.ndarray, rate: float) -> Quantized:
    bits = _integer_rate(rate)
    step = optimal_uniform_step(bits)
    levels = uniform_levels(bits, step)
    out = _fixed_rate(x, 0.5 * (levels[1:] + levels[:-1]), levels, bits)
    out.detail = f"step {step:.4f}"
    return out


def lloyd_max_quantize(x: np.ndarray, rate: float) -> Quantized:
    bits = _integer_rate(rate)
    thresholds, levels = lloyd_max(bits)
    out = _fixed_rate(x, thresholds, levels, bits)
    out.detail = f"{len(levels)} levels, design MSE {_cell_mse(thresholds, levels):.5f}"
    return out


def rtn_quantize(x: np.ndarray, rate: float, group_size: int = 128, ans: bool = False) -> Quantized:
    """The framework's own uniform codec (min-max per group, fp16 scales, b-bit zero
    points), as RTN writes it, optionally with its codes ANS-coded; rate from its bytes."""
    bits = _integer_rate(rate)
    if bits < 2:
        raise ConfigError("rate", f"{rate}: the uniform codec needs >= 2 bits")
    w = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, group_size).copy())
    enc, w_hat = encode(w, UniformGrid(bits, group_size, symmetric=False))
    if ans:
        enc = entropy_code_uniform(enc)
    return Quantized(
        w_hat.numpy().reshape(-1), 8.0 * enc.nbytes() / x.size, "bytes", f"group {group_size}"
    )


def ecsq_quantize(
    x: np.ndarray, rate: float, deadzone: float = 0.0, centroids: bool = True
) -> Quantized:
    """ECSQ whose step is bisected (in log scale) until its real bitstream, model and levels
    included, spends at most `rate` bits per sample; reconstruction decoded from it."""
    _check_rate(rate, 0.05, 12.0)
    w = torch.from_numpy(np.asarray(x, dtype=np.float64).copy())

    def coded(step: float):
        enc, w_hat = encode_ecsq(w, ECSQ(step, deadzone, centroids))
        return 8.0 * enc.nbytes() / x.size, w_hat

    # At high rate an entropy-coded uniform quantizer spends h(X) - log2(step) bits, with
    # h = 0.5 log2(2 pi e) = 2.047 for N(0,1): start the bracket around that step.
    guess = 2.0 ** (0.5 * math.log2(2 * math.pi * math.e) - rate)
    lo, hi = math.log(guess / 8), math.log(guess * 8)
    best: tuple[float, torch.Tensor, float] | None = None
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        r, w_hat = coded(math.exp(mid))
        if r <= rate:
            best, hi = (r, w_hat, math.exp(mid)), mid  # feasible: try a finer step
        else:
            lo = mid
        if hi - lo < 1e-5:
            break
    if best is None:
        raise ConfigError("rate", f"{rate}: no ECSQ step found that meets it")
    r, w_hat, step = best
    return Quantized(w_hat.numpy().astype(np.float64), r, "bytes", f"step {step:.4f}")


def e8_quantize(x: np.ndarray, rate: float) -> Quantized:
    _check_rate(rate, 0.99, 8.0)
    blocks = np.asarray(x, dtype=np.float64).reshape(-1, lattice.DIM)
    ball = lattice.fit_e8(blocks, rate)
    return Quantized(
        ball.quantize(blocks).reshape(-1),
        ball.rate,
        "codebook",
        f"{ball.size} points ({ball.shells} shells), scale {ball.scale:.4f}",
    )


def trellis_quantize(
    x: np.ndarray, rate: float, state_bits: int = 16, sequence_length: int = 1024
) -> Quantized:
    bits = _integer_rate(rate)
    code = trellis.BitshiftTrellis(state_bits, bits, sequence_length)
    stream = trellis.encode(x, code)
    x_hat = trellis.decode(stream, code, x.size)
    return Quantized(
        x_hat.astype(np.float64),
        8.0 * len(stream) / x.size,
        "bytes",
        f"L={state_bits}, T={sequence_length}",
    )
