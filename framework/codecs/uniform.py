"""Uniform (integer-grid) scalar quantization with per-group fp16 scales, as used by RTN and
GPTQ: q = clamp(round(w / s) + z, 0, 2^b - 1), w_hat = (q - z) * s.

Groups run along the input dimension (columns) of a [rows, cols] weight; when the group
size does not divide the row, the last group is shorter and has its own scale (its side
information is counted like any other group's). group_size=None means one group per row
(per-channel). Symmetric grids fix z = 2^(b-1) and store no zero points.

`float_zero` grids store the group's minimum m as an fp16 offset instead of an integer
zero point: w_hat = q * s + m with s = (max - min) / (2^b - 1), the "min-scale" form of
GGUF's Q4_1/Q5_1 (and HQQ). It costs 16 bits per group instead of b, and the range is not
widened to include 0; a weight that was itself dequantized from such a grid, with blocks
aligned to the groups, is reproduced exactly (SmolLM2's packaged weights, docs/benchmarks.md).

The dequantized tensor is computed by exactly the arithmetic `decode` uses, so the model
and the container agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from framework.codecs.container import EncodedTensor, register_codec
from framework.codecs.packing import pack_bits, unpack_bits

CODEC = "uniform"
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


@dataclass(frozen=True)
class UniformGrid:
    bits: int
    group_size: int | None
    symmetric: bool
    float_zero: bool = False

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, cols: int) -> int:
        g = self.group_size or cols
        return (cols + g - 1) // g

    def column_groups(self, cols: int) -> torch.Tensor:
        g = self.group_size or cols
        return torch.arange(cols) // g


def fit_params(w: torch.Tensor, grid: UniformGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) for a [rows, cols] weight, min-max over each group, the range
    widened to include 0. Scales are rounded to fp16 here, because that is what is stored."""
    rows, cols = w.shape
    g = grid.group_size or cols
    n_groups = grid.groups(cols)
    padded = torch.zeros(rows, n_groups * g, dtype=torch.float32)
    padded[:, :cols] = w.float()
    grouped = padded.view(rows, n_groups, g)  # zero padding cannot change a 0-inclusive range
    if grid.float_zero:
        # No 0-inclusive widening here, so a short last group's padding must not count.
        valid = (torch.arange(n_groups * g) < cols).view(1, n_groups, g)
        lo = torch.where(valid, grouped, torch.inf).amin(dim=-1)
        hi = torch.where(valid, grouped, -torch.inf).amax(dim=-1)
        m = lo.to(torch.float16).float()
        return _to_fp16((hi - m) / grid.qmax), m
    if grid.symmetric:
        amax = grouped.abs().amax(dim=-1)
        scale = 2.0 * amax / grid.qmax
        zero = torch.full_like(scale, float(1 << (grid.bits - 1)))
    else:
        lo = grouped.amin(dim=-1).clamp(max=0.0)
        hi = grouped.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / grid.qmax
        scale = _to_fp16(scale)
        zero = torch.round(-lo / scale).clamp(0, grid.qmax)
        return scale, zero
    return _to_fp16(scale), zero


def _to_fp16(scale: torch.Tensor) -> torch.Tensor:
    s16 = scale.to(torch.float16).float()
    return torch.where(s16 > 0, s16, torch.full_like(s16, _FP16_TINY))


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: UniformGrid
) -> torch.Tensor:
    """Integer codes [rows, cols] for w under the given per-group parameters."""
    idx = grid.column_groups(w.shape[1])
    if grid.float_zero:
        return torch.clamp(torch.round((w.float() - zero[:, idx]) / scale[:, idx]), 0, grid.qmax)
    return torch.clamp(torch.round(w.float() / scale[:, idx]) + zero[:, idx], 0, grid.qmax)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: UniformGrid
) -> torch.Tensor:
    idx = grid.column_groups(codes.shape[1])
    if grid.float_zero:
        return codes.float() * scale[:, idx] + zero[:, idx]
    return (codes.float() - zero[:, idx]) * scale[:, idx]


def encode(
    w: torch.Tensor,
    grid: UniformGrid,
    codes: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> tuple[EncodedTensor, torch.Tensor]:
    """Encode w (or already chosen codes/params, e.g. from GPTQ) -> (container entry, w_hat)."""
    if w.dim() != 2:
        raise ValueError(f"uniform codec takes 2-D weights, got shape {tuple(w.shape)}")
    if scale is None or zero is None:
        scale, zero = fit_params(w, grid)
    if codes is None:
        codes = quantize_codes(w, scale, zero, grid)
    sections = {
        "codes": pack_bits(codes.to(torch.uint8).numpy(), grid.bits),
        "scales": scale.to(torch.float16).numpy().tobytes(),
    }
    params: dict = {"bits": grid.bits, "group_size": grid.group_size, "symmetric": grid.symmetric}
    if grid.float_zero:
        sections["zeros"] = zero.to(torch.float16).numpy().tobytes()
        params["float_zero"] = True  # only when set: older manifests stay byte-identical
    elif not grid.symmetric:
        sections["zeros"] = pack_bits(zero.to(torch.uint8).numpy(), grid.bits)
    enc = EncodedTensor(
        codec=CODEC,
        shape=tuple(w.shape),
        bits=float(grid.bits),
        params=params,
        sections=sections,
    )
    return enc, dequantize(codes, scale, zero, grid)


def grid_of(enc: EncodedTensor) -> UniformGrid:
    """The grid a uniform-codec tensor (or its entropy-coded variant) was written with."""
    return UniformGrid(
        int(enc.params["bits"]),
        enc.params["group_size"],
        bool(enc.params["symmetric"]),
        bool(enc.params.get("float_zero", False)),
    )


def _fp16_per_group(enc: EncodedTensor, section: str, n_groups: int) -> torch.Tensor:
    """A [rows, groups] fp16 section (scales, or a float_zero grid's minima) as float32."""
    rows = enc.shape[0]
    raw = enc.sections[section]
    if len(raw) != rows * n_groups * 2:
        raise ValueError(f"{section} section has {len(raw)} bytes, expected {rows * n_groups * 2}")
    return (
        torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy()).float().view(rows, n_groups)
    )


def group_params(enc: EncodedTensor, grid: UniformGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per [row, group] from a tensor's ``scales`` / ``zeros`` sections; a
    symmetric grid's zero is the middle code."""
    rows, cols = enc.shape
    n_groups = grid.groups(cols)
    scale = _fp16_per_group(enc, "scales", n_groups)
    if grid.float_zero:
        zero = _fp16_per_group(enc, "zeros", n_groups)
    elif grid.symmetric:
        zero = torch.full((rows, n_groups), float(1 << (grid.bits - 1)))
    else:
        zero = torch.from_numpy(
            unpack_bits(enc.sections["zeros"], grid.bits, rows * n_groups).astype(np.float32)
        ).view(rows, n_groups)
    return scale, zero


def decode(enc: EncodedTensor) -> torch.Tensor:
    rows, cols = enc.shape
    grid = grid_of(enc)
    codes = torch.from_numpy(
        unpack_bits(enc.sections["codes"], grid.bits, rows * cols).astype(np.int64)
    )
    scale, zero = group_params(enc, grid)
    return dequantize(codes.view(rows, cols), scale, zero, grid)


register_codec(CODEC, decode)
