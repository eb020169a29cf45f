"""QuIP / QuIP#-style quantization: incoherence processing, then block LDLQ (GPTQ's error
feedback) onto an E8-lattice codebook (QuIP#, Tseng et al. 2024, arXiv:2402.04396) or a
scalar uniform grid (QuIP, Chee et al. 2023, arXiv:2307.13304).

Incoherence processing: each block linear W [rows, cols] is coded as W' = U W V^T with U
and V seeded random orthogonal matrices (random-sign Hadamard where a Hadamard matrix of
that order is constructible, else Haar; framework.transforms.random_rotation). Rotating
both sides spreads every large entry over a whole row and column, so W' looks like i.i.d.
Gaussian samples and a codebook made for Gaussians (E8 cut to a ball) fits it; the layer's
proxy Hessian goes with it, H' = V H V^T (||X V^T E'^T||^2 = tr(E' H' E'^T) for E = U^T
E' V). The rotation belongs to the codec (framework.codecs.incoherent): the decoder
un-rotates, W_hat = U^T Q V, and that dense weight is what goes into the model, so the
compressed model's function is just its decoded weights, with no online transform at
inference (QuIP# instead keeps the codes and applies the Hadamards at run time to save
memory bandwidth; here the point is the rate-distortion trade-off). The side information
is a 4-byte seed per tensor, from which U and V are regenerated, plus one fp16 scale per
row (or group).

Block LDLQ: with U_c the upper Cholesky factor of H'^-1 (H'^-1 = U_c^T U_c), the columns
are coded 8 at a time (one E8 vector per row; 1 at a time on the uniform grid), and after
block b with error E_b = W_b - Q_b the later columns take W[:, e:] -= E_b U_bb^-1 U[b, e:].
For a block of one column this is GPTQ's update; it is QuIP#'s BlockLDLQ written with the
inverse Hessian's Cholesky factor (the optimal update of the remaining columns given the
fixed block, as in GPTQ's derivation). The layers are calibrated sequentially block by
block with the machinery it shares with GPTQ (framework.sequential.quantize_sequentially).

Per tensor the stage records the relative output error tr(E H E^T) / tr(W H W^T) of this
method, of the same codebook without feedback (rotation and nearest point only) and of
RTN per channel at the same nominal bits, and the Gaussian rate-distortion gap at the rate
counted from the bytes written (framework.ratedistortion).
"""

from __future__ import annotations

import logging
import math
import zlib
from typing import Annotated, Any, Literal

import numpy as np
import torch
from annotated_types import Ge
from torch import nn

from framework.calibration import BatchSize, CalibrationWindows, Damp, inverse_cholesky_upper
from framework.codecs.incoherent import (
    Codebook,
    check_codebook,
    default_constants,
    encode,
    fit_scales,
    quantize_unit,
    rotation_kind,
    rotations,
)
from framework.codecs.uniform import UniformGrid, dequantize, fit_params, quantize_codes
from framework.errors import ConfigError
from framework.models import block_linears
from framework.plugins import Compressor, Context, StageResult
from framework.ratedistortion import (
    output_error_bound,
    plot_bounds,
    summarize_bounds,
    summarize_output_bounds,
    tensor_bound,
)
from framework.sequential import (
    errors_by_role,
    intra_op_threads,
    quantize_sequentially,
    relative_output_errors,
)
from plugins.compressors.rtn import Quantized

log = logging.getLogger("sculpt")


# ----------------------------------------------------------------------------------------
# The per-layer algorithm
# ----------------------------------------------------------------------------------------


def _quantize_columns(
    w: torch.Tensor, scale: torch.Tensor, book: Codebook, start: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Code columns [start, start + w.shape[1]) of a rotated weight (whole vectors) ->
    (their decoded values, codes [rows, vectors])."""
    rows, width = w.shape
    groups = book.column_groups(start + width)[start:]
    s = scale[:, groups]
    unit = (w / s).reshape(rows * width // book.dim, book.dim).numpy()
    values, codes = quantize_unit(unit, book)
    q = torch.from_numpy(values).reshape(rows, width) * s
    return q, codes.reshape(rows, -1)


@torch.no_grad()
def block_ldlq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    book: Codebook,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[np.ndarray, float, float]:
    """Block LDLQ of w [rows, cols] (float64) given its Hessian [cols, cols] and the scales
    [rows, groups] -> (codes [rows, cols / dim] row-major, proxy loss, damp used). The
    proxy loss is GPTQ's, sum_b ||E_b U_bb^-1||^2 / 2."""
    rows, cols = w.shape
    d = book.dim
    block_size = max(d, block_size - block_size % d)
    w = w.to(torch.float64).clone()
    upper, damp_used = inverse_cholesky_upper(hessian.to(torch.float64), damp, what="quip")
    codes = np.empty((rows, cols // d), dtype=np.int64)
    loss = 0.0
    with intra_op_threads(1):  # many small steps: threads would mostly wait (as in GPTQ)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            w1 = w[:, i1:i2].clone()
            g1 = torch.empty_like(w1)
            for j in range(0, i2 - i1, d):
                k = j + d
                q, c = _quantize_columns(w1[:, j:k], scale, book, i1 + j)
                codes[:, (i1 + j) // d] = c[:, 0]
                u_bb = upper[i1 + j : i1 + k, i1 + j : i1 + k]
                g = torch.linalg.solve_triangular(u_bb, w1[:, j:k] - q, upper=True, left=False)
                loss += float(g.pow(2).sum())
                if k < i2 - i1:
                    w1[:, k:] -= g @ upper[i1 + j : i1 + k, i1 + k : i2]
                g1[:, j:k] = g
            if i2 < cols:
                w[:, i2:] -= g1 @ upper[i1:i2, i2:]
    return codes, loss / 2.0, damp_used


def tensor_seed(seed: int, name: str) -> int:
    """A 32-bit rotation seed per tensor: different matrices get unrelated rotations."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


# ----------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------


class QuIP(Compressor):
    """Incoherence processing + block LDLQ onto an E8 or uniform codebook.

    Args:
        bits: nominal bits per weight: 2, 3 or 4 for e8 (the 5-shell E8 ball, then residual
            stages with the 1- or 5-shell ball), 2-8 for uniform.
        codebook: e8 (8-dimensional lattice vectors along the input dimension) or uniform
            (a symmetric scalar grid).
        group_size: input columns sharing one fp16 scale; null = one per row (after the
            rotation the rows' entries are alike, so per row is the default). A multiple of
            8 for e8.
        rotation: hadamard (random signs times a Hadamard matrix; falls back to orthogonal
            for an order none can be built for), orthogonal (Haar random), or none (no
            incoherence processing: the same codebook and feedback on the raw weights, the
            ablation that shows what the rotation buys).
        damp: fraction of the mean Hessian diagonal added to the diagonal (as GPTQ).
        block_size: lazy-batch width in columns (speed only; rounded to whole vectors).
        feedback: LDLQ error feedback; false codes every vector to its nearest point (the
            incoherence-only baseline).
        seed: rotation seed; each tensor's seed mixes it with the tensor's name.
        true_sequential, quantized_inputs, calibration_windows, batch_size,
            offload_activations, offload_weights: the sequential calibration, as for GPTQ.
    """

    needs_calibration = True

    def __init__(
        self,
        bits: int = 2,
        codebook: Literal["e8", "uniform"] = "e8",
        group_size: int | None = None,
        rotation: Literal["hadamard", "orthogonal", "none"] = "hadamard",
        damp: Damp = 0.01,
        block_size: Annotated[int, Ge(1)] = 128,
        feedback: bool = True,
        seed: Annotated[int, Ge(0)] = 0,
        true_sequential: bool = False,
        quantized_inputs: bool = True,
        calibration_windows: CalibrationWindows = None,
        batch_size: BatchSize = 8,
        offload_activations: bool = False,
        offload_weights: bool = False,
    ):
        if type(bits) is not int:
            raise ConfigError("bits", f"{bits!r} must be an integer")
        if group_size is not None and type(group_size) is not int:
            raise ConfigError("group_size", f"{group_size!r} must be an integer or null")
        why = check_codebook(codebook, bits, group_size)
        if why:
            key, _, detail = why.partition(": ")
            raise ConfigError(key, detail)
        self.bits = bits
        self.codebook = codebook
        self.group_size = group_size
        self.rotation = rotation
        self.damp = float(damp)
        self.block_size = block_size
        self.feedback = feedback
        self.seed = seed
        self.true_sequential = true_sequential
        self.quantized_inputs = quantized_inputs
        self.calibration_windows = calibration_windows
        self.batch_size = batch_size
        self.offload_activations = offload_activations
        self.offload_weights = offload_weights

    @property
    def book(self) -> Codebook:
        return Codebook(
            self.codebook, self.bits, self.group_size, default_constants(self.codebook, self.bits)
        )

    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.quantize(model, ctx).result(ctx)

    @torch.no_grad()
    def quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        """Quantize the block linears in place; the container is not written yet."""
        book = self.book
        windows = ctx.calibration(self.calibration_windows)
        names = {id(layer): name for name, layer in block_linears(model, ctx.arch).items()}
        encoded, rows_out = quantize_sequentially(
            model,
            ctx,
            windows,
            lambda layer, hessian: self.quantize_into(layer, hessian, book, names[id(layer)]),
            batch_size=self.batch_size,
            true_sequential=self.true_sequential,
            quantized_inputs=self.quantized_inputs,
            description="quip blocks",
            offload_activations=self.offload_activations,
            offload_weights=self.offload_weights,
        )
        bounds = [{"tensor": r["layer"], **r.pop("_bound")} for r in rows_out]
        sizes = [r.pop("_numel") for r in rows_out]
        n = max(len(rows_out), 1)
        sq_err = sum(r.pop("_sq_err") for r in rows_out)
        sq_norm = sum(r.pop("_sq_norm") for r in rows_out)
        coded_bytes = sum(r.pop("_bytes") for r in rows_out)
        metrics = {
            "layers": len(rows_out),
            "weight_relative_mse": sq_err / max(sq_norm, 1e-30),
            "output_relative_error": sum(r["output_rel_err"] for r in rows_out) / n,
            "nofeedback_output_relative_error": sum(
                r["nofeedback_output_rel_err"] for r in rows_out
            )
            / n,
            "rtn_output_relative_error": sum(r["rtn_output_rel_err"] for r in rows_out) / n,
            "ldlq_loss": sum(r["ldlq_loss"] for r in rows_out),
            "max_damp": max((r["damp"] for r in rows_out), default=self.damp),
            "nominal_bits": float(self.bits),
            "actual_bits": 8.0 * coded_bytes / max(sum(sizes), 1),
            "calibration_windows": int(windows.shape[0]),
            "calibration_tokens": int(windows.numel()),
            **summarize_bounds(bounds, sizes),
        }
        metrics.update(summarize_output_bounds(bounds))  # how loose the certified bounds are
        log.info(
            "quip: %d layers, mean relative output error %.4g (no feedback %.4g, RTN per "
            "channel %.4g), %.4f bits per weight",
            metrics["layers"],
            metrics["output_relative_error"],
            metrics["nofeedback_output_relative_error"],
            metrics["rtn_output_relative_error"],
            metrics["actual_bits"],
        )
        meta = {
            "method": "quip",
            "bits": self.bits,
            "codebook": self.codebook,
            "group_size": self.group_size,
            "rotation": self.rotation,
            "damp": self.damp,
            "feedback": self.feedback,
            "seed": self.seed,
            "true_sequential": self.true_sequential,
            "quantized_inputs": self.quantized_inputs,
            "calibration_windows": int(windows.shape[0]),
        }
        plot = plot_bounds(
            bounds,
            ctx.output_dir / "plots" / f"{ctx.stage_name or 'quip'}_rate_distortion.png",
            f"QuIP {self.codebook} {self.bits}-bit",
        )
        return Quantized(
            encoded=encoded,
            meta=meta,
            metrics=metrics,
            tables={"by_role": errors_by_role(rows_out), "rate_distortion": bounds},
            plots={"rate_distortion": plot},
        )

    def quantize_into(
        self, layer: nn.Linear, hessian: torch.Tensor, book: Codebook, name: str
    ) -> tuple[Any, dict[str, Any]]:
        """Code one layer, write the decoded weights into it; -> (container entry, stats)."""
        w = layer.weight.data
        w32 = w.detach().to(torch.float32).cpu()
        rows, cols = w32.shape
        if cols % book.dim:
            raise ConfigError(
                "codebook", f"{name} has {cols} input columns, not a multiple of {book.dim}"
            )
        kinds = rotation_kind(rows, self.rotation), rotation_kind(cols, self.rotation)
        seed = tensor_seed(self.seed, name)
        u, v = rotations(rows, cols, seed, *kinds)
        h64 = hessian.detach().to(device="cpu", dtype=torch.float64)
        w_rot = u @ w32.double() @ v.T
        scale = fit_scales(w_rot, book)
        nearest = _quantize_columns(w_rot, scale, book, 0)
        if self.feedback:
            # Columns that never saw an input get weight 0 in H; the damping keeps H' = V H
            # V^T invertible (after the rotation no column is dead on its own).
            codes, loss, damp = block_ldlq(
                w_rot, v @ h64 @ v.T, scale, book, self.damp, self.block_size
            )
        else:
            codes, loss, damp = nearest[1], float("nan"), self.damp
        enc, w_hat = encode((rows, cols), book, codes, scale.float(), seed, *kinds)
        # The same codebook without feedback, un-rotated, and RTN per channel at the same bits.
        w_near = (u.T @ nearest[0] @ v).float()
        grid = UniformGrid(bits=self.bits, group_size=None, symmetric=False)
        rtn_scale, rtn_zero = fit_params(w32, grid)
        w_rtn = dequantize(
            quantize_codes(w32, rtn_scale, rtn_zero, grid), rtn_scale, rtn_zero, grid
        )
        out_err, near_err, rtn_err = relative_output_errors(
            w32, hessian.cpu(), w_hat, w_near, w_rtn
        )
        sq_err = float((w_hat - w32).pow(2).sum())
        sq_norm = float(w32.pow(2).sum())
        stats = {
            "output_rel_err": out_err,
            "nofeedback_output_rel_err": near_err,
            "rtn_output_rel_err": rtn_err,
            "weight_rel_mse": sq_err / max(sq_norm, 1e-30),
            "ldlq_loss": loss if math.isfinite(loss) else 0.0,
            "damp": damp,
            "_bound": {
                **tensor_bound(w32, w_hat, 8.0 * enc.nbytes() / w32.numel()),
                **output_error_bound(w32, w_hat, hessian),
            },
            "_numel": w32.numel(),
            "_bytes": enc.nbytes(),
            "_sq_err": sq_err,
            "_sq_norm": sq_norm,
        }
        layer.weight.data.copy_(w_hat.to(device=w.device, dtype=w.dtype))
        return enc, stats
