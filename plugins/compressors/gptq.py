"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): quantize each block linear column by
column on the same uniform grid as RTN, and after each column spread its rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ||X W^T - X W_hat^T||^2, H = 2 X^T X / tokens.

The calibration is sequential, block by block: the inputs of the first block are captured
once (with whatever keyword arguments the model hands its blocks: attention mask, rotary
position embeddings, position ids), then each block accumulates the Hessians of its linears
on its current inputs, is quantized, and is run again with the quantized weights; those
outputs are the next block's inputs, so every block sees the errors made upstream
(`quantized_inputs: false` instead takes each block's outputs from its Hessian pass, before
its weights change: the original model's activations, one forward per block instead of
two). Only one block's activations are held at a time ([windows, seq, hidden] floats), and
windows go through a block in chunks of `batch_size`.

`true_sequential` runs each block once per group of linears that share an input (q/k/v,
then o, then the MLP's up/gate, then its down projection), so a group's Hessian sees the
already quantized groups before it; off, one pass collects every Hessian of a block from
its unquantized weights (faster: two passes per block instead of five partial ones).

Groups: a group's scale and zero point are fitted (min-max, as RTN) on the partially
updated weights when GPTQ reaches the group's first column, so they see the error spread
from the columns before it. Column blocks (the lazy-batch width) are cut so that a group
never starts inside a block and runs past its end, which keeps that fit exact. With
`act_order` (the default: columns in decreasing Hessian-diagonal order, llm-compressor's
"static" actorder) the groups stay contiguous in the original column order, as the
container stores them, and are fitted once up front on the original weights ("static
groups"); `static_groups` asks for the same without act_order.

The codes and parameters chosen are written with the uniform codec, and the weights placed
in the model are that codec's decode, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from annotated_types import Ge
from torch import nn

from framework.calibration import BatchSize, CalibrationWindows, Damp, inverse_cholesky_upper
from framework.codecs.uniform import UniformGrid, dequantize, encode, fit_params, quantize_codes
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
from plugins.compressors.rtn import Bits, GroupSize, Quantized

log = logging.getLogger("sculpt")


# ----------------------------------------------------------------------------------------
# The per-layer algorithm
# ----------------------------------------------------------------------------------------


@dataclass
class GPTQLayerResult:
    """Codes [rows, cols] and per-group (scale, zero) [rows, groups] in the uniform codec's
    layout (original column order), plus diagnostics."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    loss: float  # GPTQ's own proxy: sum over columns of (w - q)^2 / (2 [H^-1]_jj)
    damp: float  # the dampening finally used (relative to the mean diagonal)
    dead_columns: int


def column_blocks(
    cols: int, block_size: int, group_size: int | None, static: bool
) -> list[tuple[int, int]]:
    """Lazy-batch column blocks [i1, i2). With dynamic groups a group that starts inside a
    block must end inside it: otherwise the block is cut where that group starts."""
    out: list[tuple[int, int]] = []
    i1 = 0
    while i1 < cols:
        i2 = min(i1 + block_size, cols)
        if group_size is not None and not static:
            first = (i1 // group_size + 1) * group_size  # first group start after i1
            for start in range(first, i2, group_size):
                if min(start + group_size, cols) > i2:
                    i2 = start
                    break
        out.append((i1, i2))
        i1 = i2
    return out


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: UniformGrid,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
) -> GPTQLayerResult:
    """GPTQ for one [rows, cols] weight given its input Hessian [cols, cols] (any positive
    multiple of X^T X). Returns codes and group parameters for `framework.codecs.uniform`."""
    cols = weight.shape[1]
    if weight.dim() != 2 or hessian.shape != (cols, cols):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    device = weight.device
    with intra_op_threads(1 if device.type == "cpu" else torch.get_numintra_op_threads()):
        return _gptq(weight, hessian, grid, damp, block_size, act_order, static_groups)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: UniformGrid,
    damp: float,
    block_size: int,
    act_order: bool,
    static_groups: bool,
) -> GPTQLayerResult:
    rows, cols = weight.shape
    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float64).clone()

    # Columns that never saw a nonzero input: their weights cannot matter to the outputs.
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = grid.group_size or cols
    static = act_order or static_groups or grid.group_size is None
    if static:
        # One fit up front, on the original weights, in the container's (original) order.
        scale, zero = fit_params(w.cpu(), grid)
        scale, zero = scale.to(device), zero.to(device)
    else:
        n_groups = grid.groups(cols)
        scale = torch.empty(rows, n_groups, device=device)
        zero = torch.empty(rows, n_groups, device=device)
    column_grid = UniformGrid(grid.bits, None, grid.symmetric)

    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(cols, device=device)
    group_of = (perm // g).tolist()  # group (original order) of each processed column

    upper64, damp_used = inverse_cholesky_upper(h, damp)
    upper = upper64.to(torch.float32)
    del h

    # Work on the transpose: column j of W is the contiguous row wt[j].
    wt = w.T.contiguous()
    codes_t = torch.empty(cols, rows, device=device)
    scale_t, zero_t = scale.T.contiguous(), zero.T.contiguous()
    qmax = float(grid.qmax)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for i1, i2 in column_blocks(cols, block_size, grid.group_size, static):
        wt1 = wt[i1:i2].clone()
        err1 = torch.empty(i2 - i1, rows, device=device)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % g == 0:
                end = min(j + g, cols)
                # Inside the block wt1 is up to date; a group reaching past the block starts
                # at the block's first column (column_blocks), where wt is up to date.
                src = wt1[i : end - i1] if end <= i2 else wt[j:end]
                s, z = fit_params(src.T.cpu(), column_grid)
                scale_t[j // g] = s[:, 0].to(device)
                zero_t[j // g] = z[:, 0].to(device)
            s = scale_t[group_of[j]]
            z = zero_t[group_of[j]]
            col = wt1[i]
            # The uniform codec's arithmetic exactly (quantize_codes / dequantize).
            q = torch.clamp(torch.round(col / s) + z, 0, qmax)
            col_hat = (q - z) * s
            codes_t[j] = q
            err = (col - col_hat) / u1[i, i]
            loss += err.dot(err)
            wt1[i:].addr_(u1[i, i:], err, alpha=-1.0)
            err1[i] = err
        if i2 < cols:
            wt[i2:].addmm_(upper[i1:i2, i2:].T, err1, alpha=-1.0)

    codes = codes_t.T
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return GPTQLayerResult(
        codes=codes.contiguous().cpu(),
        scale=scale_t.T.contiguous().cpu(),
        zero=zero_t.T.contiguous().cpu(),
        loss=float(loss) / 2.0,
        damp=damp_used,
        dead_columns=int(dead.sum()),
    )


# ----------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------


class GPTQ(Compressor):
    """GPTQ onto a uniform grid (the same codec and container as RTN).

    Args:
        bits: code width, 2-8.
        group_size: input columns sharing one scale; null = per-channel. A size that does
            not divide the row leaves a shorter last group (as RTN).
        symmetric: zero point fixed at the grid's middle (no zero points stored).
        damp: fraction of the mean Hessian diagonal added to the diagonal (GPTQ's 1%).
        block_size: lazy-batch width (columns updated together); any value gives the same
            result up to rounding, it only trades memory traffic for matmul size.
        act_order: quantize columns in decreasing order of their Hessian diagonal
            ("desc_act"); with groups, the group parameters are fitted once up front.
        static_groups: fit every group's parameters up front on the original weights
            (implied by act_order), instead of when GPTQ reaches the group.
        true_sequential: re-run each block per group of linears (q/k/v, o, up/gate, down) so
            each group is calibrated on the outputs of the already quantized ones.
        quantized_inputs: calibrate each block on the outputs of the already quantized
            blocks before it (GPTQ's sequential scheme: one extra pass per block to recompute
            them); false: on the original model's activations, one pass per block.
        calibration_windows: how many of the run's calibration windows to use (null: all).
        batch_size: calibration windows per forward chunk (bounds activation memory).
        offload_activations: keep the block's calibration activations in a temporary file
            of the run folder instead of memory ([windows, seq, hidden] floats; only a chunk
            of batch_size windows is resident), for one write and one read per pass.
        offload_weights: keep the block linears' weights in files of the run folder (mapped
            and unlinked, read in as each block runs; CPU models) instead of the heap, so
            the resident set holds about one block of weights; the quantized model reads
            its weights from those files afterwards. Bit-identical results.
    """

    needs_calibration = True

    def __init__(
        self,
        bits: Bits = 3,
        group_size: GroupSize = 192,
        symmetric: bool = False,
        damp: Damp = 0.01,
        block_size: Annotated[int, Ge(1)] = 128,
        act_order: bool = True,
        static_groups: bool = False,
        true_sequential: bool = False,
        quantized_inputs: bool = True,
        calibration_windows: CalibrationWindows = None,
        batch_size: BatchSize = 8,
        offload_activations: bool = False,
        offload_weights: bool = False,
    ):
        self.grid = UniformGrid(bits=bits, group_size=group_size, symmetric=symmetric)
        self.damp = float(damp)
        self.block_size = block_size
        self.act_order = act_order
        self.static_groups = static_groups
        self.true_sequential = true_sequential
        self.quantized_inputs = quantized_inputs
        self.calibration_windows = calibration_windows
        self.batch_size = batch_size
        self.offload_activations = offload_activations
        self.offload_weights = offload_weights

    def quantize_layer(self, weight: torch.Tensor, hessian: torch.Tensor) -> GPTQLayerResult:
        return gptq_quantize(
            weight,
            hessian,
            self.grid,
            damp=self.damp,
            block_size=self.block_size,
            act_order=self.act_order,
            static_groups=self.static_groups,
        )

    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.quantize(model, ctx).result(ctx)

    @torch.no_grad()
    def quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        """GPTQ the block linears in place; the container is not written yet."""
        windows = ctx.calibration(self.calibration_windows)
        encoded, rows_out = quantize_sequentially(
            model,
            ctx,
            windows,
            self._quantize_into,
            batch_size=self.batch_size,
            true_sequential=self.true_sequential,
            quantized_inputs=self.quantized_inputs,
            description="gptq blocks",
            offload_activations=self.offload_activations,
            offload_weights=self.offload_weights,
        )

        meta = {
            "method": "gptq",
            **self.grid.__dict__,
            "damp": self.damp,
            "act_order": self.act_order,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "quantized_inputs": self.quantized_inputs,
            "calibration_windows": int(windows.shape[0]),
        }
        n = max(len(rows_out), 1)
        sq_err = sum(r["_sq_err"] for r in rows_out)
        sq_norm = sum(r["_sq_norm"] for r in rows_out)
        metrics = {
            "layers": len(rows_out),
            "weight_relative_mse": sq_err / max(sq_norm, 1e-30),
            "output_relative_error": sum(r["output_rel_err"] for r in rows_out) / n,
            "rtn_output_relative_error": sum(r["rtn_output_rel_err"] for r in rows_out) / n,
            "gptq_loss": sum(r["gptq_loss"] for r in rows_out),
            "dead_columns": sum(r["dead_columns"] for r in rows_out),
            "max_damp": max((r["damp"] for r in rows_out), default=self.damp),
            "nominal_bits": float(self.grid.bits),
            "calibration_windows": int(windows.shape[0]),
            "calibration_tokens": int(windows.numel()),
        }
        metrics.update(bound_metrics(rows_out))
        log.info(
            "gptq: %d layers, mean relative output error %.4g (RTN on the same grid %.4g); "
            "certified output bounds %.3g-%.3g x the measured errors",
            metrics["layers"],
            metrics["output_relative_error"],
            metrics["rtn_output_relative_error"],
            metrics.get("bound_ratio_min", float("nan")),
            metrics.get("bound_ratio_max", float("nan")),
        )
        title = f"GPTQ {self.grid.bits}-bit, group {self.grid.group_size or 'per-channel'}"
        return Quantized(
            encoded=encoded,
            meta=meta,
            metrics=metrics,
            tables={"by_role": errors_by_role(rows_out), "bounds": bound_table(rows_out)},
            plots={"rate_distortion": _bounds_plot(rows_out, ctx, "gptq", title)},
        )

    def _quantize_into(
        self, layer: nn.Linear, hessian: torch.Tensor
    ) -> tuple[Any, dict[str, float]]:
        """GPTQ one layer, write the decoded weights into it; -> (container entry, stats)."""
        w = layer.weight.data
        w32 = w.detach().to(torch.float32).cpu()
        res = self.quantize_layer(w, hessian)
        enc, w_hat = encode(w32, self.grid, codes=res.codes, scale=res.scale, zero=res.zero)
        rtn_scale, rtn_zero = fit_params(w32, self.grid)  # RTN on the same grid, for reference
        w_rtn = dequantize(
            quantize_codes(w32, rtn_scale, rtn_zero, self.grid), rtn_scale, rtn_zero, self.grid
        )
        out_err, rtn_err = relative_output_errors(w32, hessian.cpu(), w_hat, w_rtn)
        stats = {
            # Shannon's Gaussian D(R) at the rate written, and the certified bound on the
            # layer's output error on these calibration inputs (framework.ratedistortion).
            **tensor_bound(w32, w_hat, 8.0 * enc.nbytes() / w32.numel()),
            **output_error_bound(w32, w_hat, hessian),
            "output_rel_err": out_err,
            "rtn_output_rel_err": rtn_err,
            "weight_rel_mse": float((w_hat - w32).pow(2).sum() / w32.pow(2).sum().clamp_min(1e-30)),
            "gptq_loss": res.loss,
            "damp": res.damp,
            "dead_columns": res.dead_columns,
            "_sq_err": float((w_hat - w32).pow(2).sum()),
            "_sq_norm": float(w32.pow(2).sum()),
            "_numel": w32.numel(),
        }
        layer.weight.data.copy_(w_hat.to(device=w.device, dtype=w.dtype))
        return enc, stats


BOUND_COLUMNS = (
    "layer",
    "role",
    "rate",
    "mse",
    "gaussian_dr",
    "gap_bits",
    "output_error",
    "output_bound",
    "bound_ratio",
)


def bound_table(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer: rate written, MSE beside the Gaussian D(R), gap in bits, and the measured
    output error beside its certified bound."""
    return [{k: r[k] for k in BOUND_COLUMNS if k in r} for r in rows]


def bound_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Weight-count-weighted D(R) gaps and the spread of bound / measured over layers."""
    rows = [r for r in rows if "gap_bits" in r]
    if not rows:
        return {}
    return {
        **summarize_bounds(rows, [int(r["_numel"]) for r in rows]),
        **summarize_output_bounds(rows),
    }


def _bounds_plot(rows: list[dict[str, Any]], ctx: Context, default: str, title: str):
    rows = [r for r in rows if "gap_bits" in r]
    path = ctx.output_dir / "plots" / f"{ctx.stage_name or default}_rate_distortion.png"
    return plot_bounds(rows, path, title)
