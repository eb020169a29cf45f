"""Rotate, then quantize (weight-only; the QuaRot / SpinQuant recipe without learned or
online rotations): fold the norm scales, rotate the residual stream by a seeded random
Hadamard (or Haar orthogonal) matrix, rotate each kv head's values and outputs, then
quantize the 210 block linears with RTN or GPTQ, reusing those plugins' code.

Why it helps: a rotation spreads each weight row's few large entries over all its
columns, so a group's min-max range is set by a Gaussian-like spread instead of an
outlier, and the same grid wastes fewer levels (QuaRot, Ashkboos et al., 2024,
arXiv:2404.00456; SpinQuant, Liu et al., 2024, arXiv:2405.16406). The model before
quantization computes the same function (framework.transforms; tests check 1e-4).

What is and is not rotated: the residual stream (O(d): embedding, q/k/v/gate/up inputs,
o/down outputs, head), values/outputs per kv head (O(head_dim)), optionally queries/keys
inside their RoPE planes. The down projection's input is not: SiLU(gate) * up does not
commute with a rotation, and QuaRot's online Hadamard there is not a foldable weight
change.

Rate accounting: the rotations are folded into the weights, so the coded block linears
carry no side information for them (the seed in the manifest's meta reproduces them but
is not needed to decode). Folding and rotating also change tensors outside the coded set:
the embedding (rotated), every norm scale (folded to 1) and the LM head (rotated, and
untied from the embedding when the final norm's scale goes into it, as for SmolLM2).
They stay at full precision, as for every method under PROTOCOL.md, and are written to
the container with the raw codec outside the rate (container_size reports them as
outside_rate_bytes); the untied head is one vocab x hidden matrix more in model/ on disk
(28.3M weights for SmolLM2-135M), visible in the run's model_dir_bytes.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from framework.codecs.raw import encode_raw
from framework.errors import ConfigError
from framework.models import block_linears
from framework.plugins import Compressor, Context, StageResult
from framework.transforms import (
    fold_norm_scales,
    is_tied,
    random_rotation,
    rotate_queries_keys,
    rotate_residual,
    rotate_values,
)
from plugins.compressors.gptq import GPTQ
from plugins.compressors.rtn import RTN, Bits, GroupSize


class RotateQuant(Compressor):
    """Rotations folded into the weights, then RTN or GPTQ on the same uniform grid.

    Args:
        quantizer: rtn or gptq (its code, its container layout).
        bits, group_size, symmetric: the grid, as for RTN and GPTQ.
        rotation: hadamard (random signs times a Hadamard matrix; needs a constructible
            order, true for SmolLM2's 576 and 64) or orthogonal (Haar random).
        rotate_residual: rotate the residual stream (folds norm scales first).
        rotate_values: rotate values/outputs per kv head.
        rotate_queries_keys: rotate queries/keys inside their RoPE planes.
        gptq: further GPTQ arguments (damp, act_order, ...), only with quantizer=gptq.
    """

    def __init__(
        self,
        quantizer: Literal["rtn", "gptq"] = "rtn",
        bits: Bits = 3,
        group_size: GroupSize = 192,
        symmetric: bool = False,
        rotation: Literal["hadamard", "orthogonal"] = "hadamard",
        rotate_residual: bool = True,
        rotate_values: bool = True,
        rotate_queries_keys: bool = False,
        gptq: dict[str, Any] | None = None,
    ):
        extra = dict(gptq or {})
        if extra and quantizer != "gptq":
            raise ConfigError("gptq", "only applies with quantizer=gptq")
        grid = {"bits": bits, "group_size": group_size, "symmetric": symmetric}
        if quantizer == "gptq":
            accepted = set(inspect.signature(GPTQ).parameters) - set(grid)
            unknown = sorted(set(extra) - accepted)
            if unknown:
                raise ConfigError(
                    "gptq",
                    f"{', '.join(unknown)} not GPTQ arguments ({', '.join(sorted(accepted))})",
                )
            try:
                self.inner: RTN | GPTQ = GPTQ(**grid, **extra)
            except ConfigError as exc:
                raise ConfigError(f"gptq.{exc.argument}", exc.detail) from exc
        else:
            self.inner = RTN(**grid)
        # GPTQ calibrates; RTN does not. The runner reads the flag from the instance.
        self.needs_calibration = quantizer == "gptq"
        self.quantizer = quantizer
        self.rotation = rotation
        self.residual = rotate_residual
        self.values = rotate_values
        self.queries_keys = rotate_queries_keys

    @torch.no_grad()
    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        arch = ctx.arch
        generator = ctx.generator()
        was_tied = is_tied(model, arch)
        folded = 0
        if self.residual:
            folded = fold_norm_scales(model, arch)
            d = model.get_submodule(arch.embed).weight.shape[1]
            rotate_residual(model, arch, random_rotation(d, self.rotation, generator))
        if self.values:
            rotate_values(model, arch, self.rotation, generator)
        if self.queries_keys:
            rotate_queries_keys(model, arch, generator)

        quantized = self.inner.quantize(model, ctx)
        # Everything the rotation changed outside the coded linears, at full precision.
        linears = {f"{name}.weight" for name in block_linears(model, arch)}
        extra = (
            {
                name: encode_raw(t, in_rate=False)
                for name, t in model.state_dict().items()
                if name not in linears and t.is_floating_point()
            }
            if self.residual
            else {}
        )
        untied = was_tied and not is_tied(model, arch)
        return quantized.result(
            ctx,
            extra=extra,
            meta={
                "method": f"rotate_{self.quantizer}",
                "rotation": self.rotation,
                "rotate_residual": self.residual,
                "rotate_values": self.values,
                "rotate_queries_keys": self.queries_keys,
                "rotation_seed": int(generator.initial_seed()),
                "head_untied": untied,
            },
            metrics={
                "norms_folded": float(folded),
                "head_untied": float(untied),
                # Folded into the weights: no bits are stored for the rotations.
                "rotation_side_bits": 0.0,
            },
        )
