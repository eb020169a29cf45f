"""Round-to-nearest (RTN) weight quantization: the baseline every other quantizer is
measured against. Each block linear's weight is mapped to the nearest point of a uniform
b-bit grid with one fp16 scale (and, asymmetric, one b-bit zero point) per group of
`group_size` input columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import nn

from framework.codecs import EncodedTensor, write_container
from framework.codecs.entropy import entropy_code_uniform
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import ConfigError
from framework.models import block_linears
from framework.plugins import Compressor, Context, StageResult
from framework.ratedistortion import plot_bounds, summarize_bounds, tensor_bound


@dataclass
class Quantized:
    """A quantizer's outcome before its container is written: the coded block linears
    and what the stage reports. Lets another compressor (rotate_quant) add tensors of its
    own to the same container instead of re-implementing the quantizer."""

    encoded: dict[str, EncodedTensor]
    meta: dict[str, Any]
    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)

    def result(
        self,
        ctx: Context,
        extra: dict[str, EncodedTensor] | None = None,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> StageResult:
        """Write the container (the coded linears plus `extra`) and the stage's result."""
        path = write_container(
            ctx.stage_dir("compressed"),
            {**self.encoded, **(extra or {})},
            meta={**self.meta, **(meta or {})},
        )
        return StageResult(
            metrics={**self.metrics, **(metrics or {})},
            artifacts={"compressed": path},
            tables=self.tables,
            plots=self.plots,
        )


# A uniform grid's arguments as every quantizer on one declares them (RTN, GPTQ, the peer's
# GPTQ, rotate_quant; rd_alloc checks its menus against them).
Bits = Annotated[int, Interval(ge=2, le=8)]
GroupSize = Annotated[int, Ge(1)] | None


class RTN(Compressor):
    """Round-to-nearest on a uniform grid.

    Args:
        bits: code width, 2-8.
        group_size: input columns sharing one scale; null = one group per output row
            (per-channel). A size that does not divide the row leaves a shorter last group.
        symmetric: zero point fixed at the grid's middle (no zero points stored).
        entropy_code: store the codes as an ANS bitstream (codec `uniform_ans`) instead of
            packed at `bits` each: same weights, fewer bytes when the codes are uneven.
        float_zero: store each group's minimum as an fp16 offset (w = q * s + min, GGUF
            Q4_1's form) instead of a `bits`-wide integer zero point: 16 bits per group
            instead of `bits`, and exact on weights that already sit on such a grid.
    """

    def __init__(
        self,
        bits: Bits = 4,
        group_size: GroupSize = 128,
        symmetric: bool = False,
        entropy_code: bool = False,
        float_zero: bool = False,
    ):
        if float_zero and symmetric:
            raise ConfigError("float_zero", "a symmetric grid has no zero point to store")
        self.grid = UniformGrid(
            bits=bits, group_size=group_size, symmetric=symmetric, float_zero=float_zero
        )
        self.entropy_code = entropy_code

    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.quantize(model, ctx).result(ctx)

    @torch.no_grad()
    def quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        """Quantize the block linears in place; the container is not written yet."""
        linears = block_linears(model, ctx.arch)
        encoded, bounds, sizes = {}, [], []
        sq_err, sq_norm = 0.0, 0.0
        for name, layer in ctx.track(list(linears.items()), description="rtn"):
            w = layer.weight.data
            enc, w_hat = encode(w.float(), self.grid)
            if self.entropy_code:
                enc = entropy_code_uniform(enc)
            sq_err += float((w_hat - w.float()).pow(2).sum())
            sq_norm += float(w.float().pow(2).sum())
            bounds.append(
                {"tensor": name, **tensor_bound(w, w_hat, 8.0 * enc.nbytes() / w.numel())}
            )
            sizes.append(w.numel())
            layer.weight.data.copy_(w_hat.to(w.dtype))
            encoded[f"{name}.weight"] = enc
        plot = plot_bounds(
            bounds,
            ctx.output_dir / "plots" / f"{ctx.stage_name or 'rtn'}_rate_distortion.png",
            f"RTN {self.grid.bits}-bit, group {self.grid.group_size or 'per-channel'}",
        )
        return Quantized(
            encoded=encoded,
            meta={"method": "rtn", **self.grid.__dict__, "entropy_code": self.entropy_code},
            metrics={
                "layers": len(linears),
                "weight_relative_mse": sq_err / max(sq_norm, 1e-30),
                "nominal_bits": float(self.grid.bits),
                **summarize_bounds(bounds, sizes),
            },
            tables={"rate_distortion": bounds},
            plots={"rate_distortion": plot},
        )
