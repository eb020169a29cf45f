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
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.calibration import (
    Activations,
    BlockInputs,
    DiskActivations,
    accumulate_hessians,
    capture_block_inputs,
    run_block,
)
from framework.codecs.uniform import UniformGrid, dequantize, encode, fit_params, quantize_codes
from framework.errors import ConfigError, SculptError
from framework.heap import move_to_file, page_out, release_freed_memory
from framework.models import block_linears, blocks
from framework.models.arch import ArchMap
from framework.plugins import Compressor, Context, StageResult
from framework.ratedistortion import (
    output_error_bound,
    plot_bounds,
    summarize_bounds,
    summarize_output_bounds,
    tensor_bound,
)
from plugins.compressors.rtn import Quantized, check_grid_args

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


def _inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1 (so Hinv = U^T U), in
    float64. If H + damp is not positive definite in floating point the dampening grows
    tenfold until it is."""
    mean_diag = float(torch.diag(h).mean())
    d = damp
    for _ in range(12):
        # Dampened in a copy's diagonal (no identity matrix: at 1536 columns in float64
        # each n x n temporary is 19 MB, and this is GPTQ's memory peak per layer).
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, d
        d = max(d * 10.0, 1e-6)
    raise SculptError(f"gptq: the Hessian is not positive definite even with damp={d:g}")


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads. GPTQ's column loop is thousands of tiny ops: split over
    threads they mostly wait at barriers (badly so on a loaded machine), so it runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    with _threads(1 if device.type == "cpu" else torch.get_num_threads()):
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

    upper64, damp_used = _inverse_cholesky(h, damp)
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


def relative_output_errors(
    w: torch.Tensor, hessian: torch.Tensor, *w_hats: torch.Tensor
) -> list[float]:
    """tr(E H E^T) / tr(W H W^T), E = W - W_hat, for each W_hat: the relative squared output
    error of the layer on its calibration inputs (H = 2 X^T X / tokens, undamped)."""
    h = hessian.to(torch.float32)
    w32 = w.to(h.device, torch.float32)
    stacked = torch.stack([w32, *(w32 - wh.to(h.device, torch.float32) for wh in w_hats)])
    quad = ((stacked @ h) * stacked).sum(dim=(1, 2)).double()
    den = float(quad[0])
    return [float(q) / den if den > 0 else 0.0 for q in quad[1:]]


# ----------------------------------------------------------------------------------------
# Sequential calibration through the blocks
# ----------------------------------------------------------------------------------------


def sequential_groups(arch: ArchMap, true_sequential: bool) -> list[tuple[str, ...]]:
    """The linears of a block grouped by shared input, in forward order (from the arch
    map); without true_sequential, one group holding them all."""
    groups = [(arch.q, arch.k, arch.v), (arch.o,), tuple(arch.mlp_in), (arch.mlp_out,)]
    return groups if true_sequential else [tuple(n for grp in groups for n in grp)]


QuantizeInto = Callable[[nn.Linear, torch.Tensor], tuple[Any, dict[str, Any]]]


@contextmanager
def _scratch_folder(ctx: Context, needed: bool) -> Iterator[Path | None]:
    """A temporary folder of the run's output for offloaded activations and weights (None
    when nothing is offloaded), removed on the way out whatever happened."""
    if not needed:
        yield None
        return
    Path(ctx.output_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".offload-", dir=ctx.output_dir) as tmp:
        yield Path(tmp)


def _weights_to_files(layers: dict[str, nn.Linear], folder: Path) -> None:
    """Move each layer's weight into a file of `folder` named after the layer
    (framework.heap.move_to_file unlinks it at once, so a later move reuses the name) and
    drop the pages it held."""
    for name, layer in layers.items():
        old = layer.weight.data
        layer.weight.data = move_to_file(old, folder / f"{name}.bin")
        page_out(old)  # a model mapped from its safetensors file keeps those pages otherwise
        del old
    release_freed_memory()


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    ctx: Context,
    windows: torch.Tensor,
    quantize_into: QuantizeInto,
    batch_size: int,
    true_sequential: bool,
    quantized_inputs: bool,
    description: str,
    offload_activations: bool = False,
    offload_weights: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """GPTQ's sequential calibration (see the module docstring), with the per-layer step
    left to the caller: quantize_into(layer, hessian) writes the decoded weights into the
    layer and returns (container entry, stats row). Shared with QuIP (plugins.compressors
    .quip), which codes differently but calibrates the same way. With offload_activations
    the block activations live in files under a temporary folder of the run's output (removed
    at the end, also on failure). With offload_weights the block linears' weights live in
    files too (framework.heap.move_to_file: mapped, read in when a block runs), all of them
    from the start and each block's again once it is done, so the resident set holds the
    embedding and about one block instead of the whole model; the model that comes back
    reads its weights from those (unlinked) files. -> (entries by parameter name, one stats
    row per layer with its name and role added)."""
    device = next(model.parameters()).device
    if offload_weights and device.type != "cpu":
        raise ConfigError(
            "offload_weights", f"keeps weights in files for a model on the CPU, not {device}"
        )
    with _scratch_folder(ctx, offload_activations or offload_weights) as offload_dir:
        arch = ctx.arch
        linears = block_linears(model, arch)
        names = {id(layer): name for name, layer in linears.items()}
        block_list = blocks(model, arch)
        if offload_weights:
            assert offload_dir is not None
            _weights_to_files(linears, offload_dir)
        was_training = model.training
        model.eval()
        encoded: dict[str, Any] = {}
        rows_out: list[dict[str, Any]] = []
        files = (
            (offload_dir / f"block{i}.bin" for i in range(len(block_list) + 1))
            if offload_dir and offload_activations
            else None
        )
        inputs: BlockInputs | None = None
        try:
            inputs = capture_block_inputs(
                model, block_list[0], windows, batch_size, device, next(files) if files else None
            )
            groups = sequential_groups(arch, true_sequential)
            for block in ctx.track(list(block_list), description=description):
                outputs: Activations | None = None
                if not quantized_inputs:
                    # The block's outputs before any of its weights change are the next
                    # block's inputs: taken from the first Hessian pass (in place when it is
                    # the only pass over these inputs).
                    if len(groups) == 1:
                        outputs = inputs.hidden
                    elif isinstance(inputs.hidden, DiskActivations):
                        assert files is not None
                        outputs = inputs.hidden.empty_like(next(files))
                    else:
                        outputs = torch.empty_like(inputs.hidden)
                for i, group in enumerate(groups):
                    layers = {rel: block.get_submodule(rel) for rel in group}
                    hessians = accumulate_hessians(
                        block, layers, inputs, outputs=outputs if i == 0 else None
                    )
                    for rel, layer in layers.items():
                        name = names[id(layer)]
                        encoded[f"{name}.weight"], row = quantize_into(layer, hessians.pop(rel))
                        rows_out.append({"layer": name, "role": rel, **row})
                # A block's passes free their activations; keep the high-water mark at one
                # block's worth rather than letting the heap hold every block's peak.
                release_freed_memory()
                if outputs is None:
                    run_block(block, inputs, write=True)
                elif outputs is not inputs.hidden:
                    if isinstance(inputs.hidden, DiskActivations):
                        inputs.hidden.close()
                    inputs.hidden = outputs
                if offload_weights:
                    assert offload_dir is not None
                    done = {names[id(m)]: m for m in block.modules() if id(m) in names}
                    _weights_to_files(done, offload_dir)
        finally:
            if inputs is not None and isinstance(inputs.hidden, DiskActivations):
                inputs.hidden.close()
            model.train(was_training)
        return encoded, rows_out


# ----------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------


def check_calibration_args(
    damp: float,
    calibration_windows: int | None,
    batch_size: int,
    offload_activations: bool = False,
    offload_weights: bool = False,
) -> None:
    """The arguments every Hessian-calibrated quantizer (GPTQ, QuIP, the peer's GPTQ) takes
    alike; a ConfigError names the first bad one."""
    if not (isinstance(damp, int | float) and math.isfinite(damp) and 0.0 <= damp < 1.0):
        raise ConfigError("damp", f"{damp} must be a fraction of the mean diagonal in [0, 1)")
    if calibration_windows is not None and (
        type(calibration_windows) is not int or calibration_windows < 1
    ):
        raise ConfigError(
            "calibration_windows", f"{calibration_windows} must be >= 1 (or null for all)"
        )
    if type(batch_size) is not int or batch_size < 1:
        raise ConfigError("batch_size", f"{batch_size} must be an integer >= 1")
    if type(offload_activations) is not bool:
        raise ConfigError("offload_activations", f"{offload_activations!r} must be true or false")
    if type(offload_weights) is not bool:
        raise ConfigError("offload_weights", f"{offload_weights!r} must be true or false")


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
        bits: int = 3,
        group_size: int | None = 192,
        symmetric: bool = False,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = True,
        static_groups: bool = False,
        true_sequential: bool = False,
        quantized_inputs: bool = True,
        calibration_windows: int | None = None,
        batch_size: int = 8,
        offload_activations: bool = False,
        offload_weights: bool = False,
    ):
        check_grid_args(bits, group_size)
        check_calibration_args(
            damp, calibration_windows, batch_size, offload_activations, offload_weights
        )
        if block_size < 1:
            raise ConfigError("block_size", f"{block_size} must be >= 1")
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
            tables={"by_role": _by_role(rows_out), "bounds": bound_table(rows_out)},
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


def _by_role(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean per-layer errors for each linear role (q, k, v, o, up, gate, down)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["role"], []).append(r)
    out = []
    for role, rs in by.items():
        k = len(rs)
        out.append(
            {
                "role": role,
                "layers": k,
                "weight_rel_mse": sum(r["weight_rel_mse"] for r in rs) / k,
                "output_rel_err": sum(r["output_rel_err"] for r in rs) / k,
                "rtn_output_rel_err": sum(r["rtn_output_rel_err"] for r in rs) / k,
            }
        )
    return out
