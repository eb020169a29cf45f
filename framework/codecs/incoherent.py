"""Incoherence-processed weights on an E8-lattice or uniform codebook (the QuIP / QuIP#
family): the container holds the codes of the rotated weight W' = U W V^T, and decoding
un-rotates, W_hat = U^T Q V, so what a model reads is an ordinary dense weight.

U (rows) and V (columns) are seeded random orthogonal matrices: diag(signs) H / sqrt(n)
with H a Hadamard matrix of that order when framework.transforms can build one (every
SmolLM2 width can), otherwise a Haar-random orthogonal matrix. The 4-byte seed is a payload
section, so it is counted in the rate like every other byte; U and V are regenerated from
it (framework.transforms.random_rotation, with the same generator in the same order).

Q = s * (codebook values), with one fp16 scale s per row (or per group of columns):

* ``e8``: 8-dimensional vectors along the input dimension, each coded as a point of a
  ball cut from the E8 lattice (framework.ratedistortion.lattice), possibly in residual
  stages (QuIP#'s 3- and 4-bit codebooks are residual as well, Tseng et al. 2024,
  arXiv:2402.04396): value = sum_k c_k y_k, y_k in the k-th ball, c_k a per-stage constant
  stored in the parameters. The stage indices of a vector are one mixed-radix integer
  written with ceil(log2(prod N_k)) bits: 16 bits per 8 weights for the 2-bit ball (5 shells,
  56,881 points), 24 for 3 bits (that ball plus the 241-point first shell).
* ``uniform``: b-bit codes k on the symmetric mid-rise grid (k - (2^b - 1) / 2) * c
  (QuIP's scalar grid, Chee et al. 2023, arXiv:2307.13304).

The encoder calls `decode` on the entry it has just built to get the weight it places in
the model, so model and container agree bit for bit (the decode is a fixed sequence of
float64 operations, rounded to float32 once at the end).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from framework.codecs.container import EncodedTensor, register_codec
from framework.codecs.packing import pack_bits, packed_size, unpack_bits
from framework.errors import SculptError
from framework.ratedistortion.lattice import DIM, E8Ball, ball_size, fit_e8
from framework.transforms import hadamard_matrix, random_rotation

CODEC = "incoherent"
CODEBOOKS = ("e8", "uniform")
# "identity" switches incoherence off: the ablation of the same codebook and feedback.
ROTATIONS = ("hadamard", "orthogonal", "identity")
# Whole shells of each residual stage, by nominal bits per weight: the 5-shell ball is the
# largest that fits 16 bits per vector, the 1-shell ball (origin and the 240 minimal
# vectors) fits 8.
E8_STAGES: dict[int, tuple[int, ...]] = {2: (5,), 3: (5, 1), 4: (5, 5)}
_FP16_TINY = 2.0**-24
_FIT_VECTORS = 1 << 15  # Gaussian vectors the default codebook constants are fitted on


@dataclass(frozen=True)
class Codebook:
    """What the codes mean: kind, nominal bits, scale groups, and the per-stage (e8) or
    step (uniform) constants relative to the group scale."""

    kind: str
    bits: int
    group_size: int | None
    constants: tuple[float, ...]

    @property
    def dim(self) -> int:
        return DIM if self.kind == "e8" else 1

    @property
    def shells(self) -> tuple[int, ...]:
        return E8_STAGES[self.bits] if self.kind == "e8" else ()

    @property
    def code_bits(self) -> int:
        """Bits of one code: a vector's mixed-radix index (e8), a weight's level (uniform)."""
        if self.kind == "uniform":
            return self.bits
        return math.ceil(math.log2(math.prod(ball_size(m) for m in self.shells)))

    def groups(self, cols: int) -> int:
        g = self.group_size or cols
        return (cols + g - 1) // g

    def column_groups(self, cols: int) -> torch.Tensor:
        return torch.arange(cols) // (self.group_size or cols)


def check_codebook(kind: str, bits: int, group_size: int | None) -> str | None:
    """Why (kind, bits, group_size) is not a codebook, keyed by argument, or None."""
    if kind not in CODEBOOKS:
        return f"codebook: '{kind}' is not one of {', '.join(CODEBOOKS)}"
    if kind == "e8" and bits not in E8_STAGES:
        return f"bits: {bits} has no E8 codebook (choose one of {sorted(E8_STAGES)})"
    if kind == "uniform" and not 2 <= bits <= 8:
        return f"bits: {bits} must be in [2, 8]"
    if group_size is not None and (group_size < 1 or group_size % (DIM if kind == "e8" else 1)):
        return f"group_size: {group_size} must be a positive multiple of the vector length"
    return None


@functools.cache
def default_constants(kind: str, bits: int) -> tuple[float, ...]:
    """Constants minimising the MSE on unit-variance Gaussian data (what incoherence
    processing makes of a weight row), fitted greedily stage by stage on a fixed sample."""
    x = np.random.default_rng(0).standard_normal((_FIT_VECTORS, DIM))
    if kind == "uniform":
        from scipy.optimize import minimize_scalar

        levels = 1 << bits

        def mse(log_c: float) -> float:
            c = math.exp(log_c)
            k = np.clip(np.rint(x / c + (levels - 1) / 2), 0, levels - 1)
            return float((((k - (levels - 1) / 2) * c - x) ** 2).mean())

        guess = 4.0 / levels
        best = minimize_scalar(
            mse, bounds=(math.log(guess / 4), math.log(guess * 4)), method="bounded"
        )
        return (float(math.exp(best.x)),)
    constants = []
    residual = x
    for shells in E8_STAGES[bits]:
        # fit_e8 picks the ball from a rate; the stages' rates are chosen to land on them.
        ball = fit_e8(residual, rate=math.log2(ball_size(shells)) / DIM + 1e-9, fit_samples=x.size)
        if ball.shells != shells:
            raise AssertionError(f"e8 stage with {shells} shells fitted {ball.shells}")
        constants.append(ball.scale)
        residual = residual - ball.quantize(residual)
    return tuple(constants)


# ----------------------------------------------------------------------------- E8 balls


def _twice_values(shells: int, parity: int) -> np.ndarray:
    """Coordinates t = 2y of the given parity with t^2 <= 8 * shells."""
    top = math.isqrt(8 * shells)
    return np.array([t for t in range(-top, top + 1) if t % 2 == parity], dtype=np.int64)


@functools.cache
def ball_table(shells: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Every E8 point of squared norm <= 2 * shells as t = 2y [N, 8] (int64), sorted by
    key, with the keys and the key's (offset, base). E8 = {y in Z^8 or (Z + 1/2)^8, sum y
    even}: t all even or all odd with sum t = 0 mod 4. Points are built from pairs of
    4-dimensional halves, which keeps the enumeration to a few million pairs."""
    limit = 8 * shells
    parts = []
    for parity in (0, 1):
        vals = _twice_values(shells, parity)
        half = np.stack(np.meshgrid(vals, vals, vals, vals, indexing="ij"), -1).reshape(-1, 4)
        norm = (half**2).sum(1)
        half, norm = half[norm <= limit], norm[norm <= limit]
        total = half.sum(1)
        ok = (norm[:, None] + norm[None, :] <= limit) & ((total[:, None] + total[None, :]) % 4 == 0)
        a, b = np.nonzero(ok)
        parts.append(np.concatenate([half[a], half[b]], axis=1))
    points = np.concatenate(parts)
    if len(points) != ball_size(shells):
        raise AssertionError(f"E8 ball of {shells} shells: {len(points)} points enumerated")
    offset = math.isqrt(limit)
    base = 2 * offset + 1
    keys = _keys(points, offset, base)
    order = np.argsort(keys)
    return points[order], keys[order], offset, base


def _keys(points: np.ndarray, offset: int, base: int) -> np.ndarray:
    weights = base ** np.arange(DIM, dtype=np.int64)
    return (points.astype(np.int64) + offset) @ weights


def e8_indices(twice: np.ndarray, shells: int) -> np.ndarray:
    """Index in ball_table(shells) of each row of t = 2y [n, 8]."""
    _, keys, offset, base = ball_table(shells)
    if np.abs(twice).max(initial=0) > offset:
        raise SculptError(f"{CODEC}: a point lies outside the {shells}-shell E8 ball")
    k = _keys(twice, offset, base)
    idx = np.searchsorted(keys, k)
    idx = np.minimum(idx, len(keys) - 1)
    if not np.array_equal(keys[idx], k):
        raise SculptError(f"{CODEC}: a point lies outside the {shells}-shell E8 ball")
    return idx


def quantize_unit(x: np.ndarray, book: Codebook) -> tuple[np.ndarray, np.ndarray]:
    """Code x [n, dim] (already divided by its scale) -> (codebook values [n, dim], codes:
    mixed-radix vector indices [n] (e8) or levels [n, 1] (uniform))."""
    x = np.asarray(x, dtype=np.float64)
    if book.kind == "uniform":
        levels = 1 << book.bits
        c = book.constants[0]
        k = np.clip(np.rint(x / c + (levels - 1) / 2), 0, levels - 1)
        return (k - (levels - 1) / 2) * c, k.astype(np.int64)
    values = np.zeros_like(x)
    code = np.zeros(len(x), dtype=np.int64)
    radix = 1
    for shells, c in zip(book.shells, book.constants, strict=True):
        point = E8Ball(shells, c).quantize(x - values)
        twice = np.rint(2.0 * point / c).astype(np.int64)
        values = values + 0.5 * twice * c
        code += e8_indices(twice, shells) * radix
        radix *= ball_size(shells)
    return values, code


def unit_values(codes: np.ndarray, book: Codebook) -> np.ndarray:
    """Inverse of quantize_unit's coding: codes -> values [n, dim]."""
    if book.kind == "uniform":
        return (codes.astype(np.float64) - ((1 << book.bits) - 1) / 2) * book.constants[0]
    values = np.zeros((len(codes), DIM))
    rest = codes.astype(np.int64)
    for shells, c in zip(book.shells, book.constants, strict=True):
        points = ball_table(shells)[0]
        n = len(points)
        values = values + 0.5 * points[rest % n] * c
        rest = rest // n
    if rest.any():
        raise ValueError("codes section holds an index outside the codebook")
    return values


# ----------------------------------------------------------------------------- rotations


def rotation_kind(n: int, preferred: str) -> str:
    """hadamard when asked for and constructible at order n, otherwise orthogonal;
    `none` is the identity."""
    if preferred == "none":
        return "identity"
    if preferred == "hadamard":
        try:
            hadamard_matrix(n)
        except SculptError:
            return "orthogonal"
    return preferred


def rotations(
    rows: int, cols: int, seed: int, row_kind: str, col_kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [rows, rows], V [cols, cols]) float64, regenerated from the seed."""
    gen = torch.Generator().manual_seed(seed)

    def one(n: int, kind: str) -> torch.Tensor:
        if kind == "identity":
            return torch.eye(n, dtype=torch.float64)
        return random_rotation(n, kind, gen)

    return one(rows, row_kind), one(cols, col_kind)


# ----------------------------------------------------------------------------- codec


def fit_scales(w_rot: torch.Tensor, book: Codebook) -> torch.Tensor:
    """Per-[row, group] RMS of the rotated weight, rounded to fp16 as stored."""
    rows, cols = w_rot.shape
    g = book.group_size or cols
    n = book.groups(cols)
    padded = torch.zeros(rows, n * g, dtype=torch.float64)
    padded[:, :cols] = w_rot
    counts = torch.full((n,), float(g), dtype=torch.float64)
    counts[-1] = cols - (n - 1) * g
    rms = (padded.view(rows, n, g).pow(2).sum(-1) / counts).sqrt()
    s16 = rms.to(torch.float16).double()
    return torch.where(s16 > 0, s16, torch.full_like(s16, _FP16_TINY))


def encode(
    shape: tuple[int, int],
    book: Codebook,
    codes: np.ndarray,
    scale: torch.Tensor,
    seed: int,
    row_kind: str,
    col_kind: str,
) -> tuple[EncodedTensor, torch.Tensor]:
    """Build the entry from chosen codes (flattened row-major: [rows * cols / dim]) and
    scales [rows, groups]; -> (entry, its decode: the weight to place in the model)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} does not fit 32 bits")
    enc = EncodedTensor(
        codec=CODEC,
        shape=tuple(shape),
        bits=float(book.bits),
        params={
            "codebook": book.kind,
            "bits": book.bits,
            "group_size": book.group_size,
            "constants": list(book.constants),
            "row_rotation": row_kind,
            "col_rotation": col_kind,
        },
        sections={
            "codes": _pack(np.asarray(codes, dtype=np.int64).reshape(-1), book.code_bits),
            "scales": scale.to(torch.float16).numpy().tobytes(),
            "seed": int(seed).to_bytes(4, "little"),
        },
    )
    return enc, decode(enc)


def _pack(codes: np.ndarray, width: int) -> bytes:
    if width <= 8:
        return pack_bits(codes.astype(np.uint8), width)
    if codes.size and (codes.min() < 0 or int(codes.max()) >> width):
        raise ValueError(f"a code does not fit in {width} bits")
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    bits = ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack(data: bytes, width: int, count: int) -> np.ndarray:
    if width <= 8:
        return unpack_bits(data, width, count).astype(np.int64)
    if len(data) != packed_size(count, width):
        raise ValueError(
            f"codes section has {len(data)} bytes, expected {packed_size(count, width)} for "
            f"{count} codes of {width} bits"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width]
    return bits.reshape(count, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


def codebook_of(enc: EncodedTensor) -> Codebook:
    """The codebook an entry was written with; ValueError naming what does not fit."""
    p = enc.params
    kind, bits, group_size = p.get("codebook"), p.get("bits"), p.get("group_size")
    if type(bits) is not int or (group_size is not None and type(group_size) is not int):
        raise ValueError("bits and group_size must be integers")
    why = check_codebook(kind, bits, group_size)
    if why:
        raise ValueError(why)
    constants = p.get("constants")
    expected = len(E8_STAGES[bits]) if kind == "e8" else 1
    if (
        not isinstance(constants, list)
        or len(constants) != expected
        or not all(isinstance(c, int | float) and math.isfinite(c) and c > 0 for c in constants)
    ):
        raise ValueError(f"constants must be {expected} finite positive numbers")
    return Codebook(kind, bits, group_size, tuple(float(c) for c in constants))


def decode(enc: EncodedTensor) -> torch.Tensor:
    if len(enc.shape) != 2:
        raise ValueError(f"{CODEC} codec takes 2-D weights, got shape {enc.shape}")
    rows, cols = enc.shape
    book = codebook_of(enc)
    if cols % book.dim:
        raise ValueError(f"{cols} columns do not split into vectors of {book.dim}")
    kinds = enc.params.get("row_rotation"), enc.params.get("col_rotation")
    if any(k not in ROTATIONS for k in kinds):
        raise ValueError(f"rotations {kinds} are not in {ROTATIONS}")
    for name in ("codes", "scales", "seed"):
        if name not in enc.sections:
            raise ValueError(f"missing section '{name}'")
    n_groups = book.groups(cols)
    raw_scales = enc.sections["scales"]
    if len(raw_scales) != rows * n_groups * 2:
        raise ValueError(
            f"scales section has {len(raw_scales)} bytes, expected {rows * n_groups * 2}"
        )
    if len(enc.sections["seed"]) != 4:
        raise ValueError(f"seed section has {len(enc.sections['seed'])} bytes, expected 4")
    scale = torch.from_numpy(np.frombuffer(raw_scales, dtype=np.float16).astype(np.float64))
    if not torch.isfinite(scale).all():
        raise ValueError("scales section holds a non-finite scale")
    count = rows * cols // book.dim
    codes = _unpack(enc.sections["codes"], book.code_bits, count)
    q = torch.from_numpy(unit_values(codes, book)).reshape(rows, cols)
    q = q * scale.view(rows, n_groups)[:, book.column_groups(cols)]
    seed = int.from_bytes(enc.sections["seed"], "little")
    u, v = rotations(rows, cols, seed, *kinds)
    return (u.T @ q @ v).to(torch.float32)


register_codec(CODEC, decode)
