"""Rate-distortion bit allocation: give each block linear its own grid (bits and group
size) so that the total sensitivity-weighted distortion is least under one global budget
of bits per weight, all side information counted, then quantize with GPTQ or RTN.

Distortion of a layer l at option c is measured, not modelled: the layer is coded with
RTN on option c's grid and D_l(c) = sum_ij F_ij (W - W_hat)_ij^2, where F is the diagonal
empirical Fisher of the language-model loss on calibration windows (mean squared gradient;
to second order the loss grows by about half this sum, the saliency of OBD, LeCun et al.
1990, and of SqueezeLLM/HAWQ-style mixed precision). `sensitivity: none` sets F = 1 (plain
weight MSE). The menu's rates are the codec's own bytes per weight, so the budget is met
in bytes written. The allocation is framework.ratedistortion.allocation's Lagrangian
(convex hull) plus a greedy fill, and beside it the reverse water-filling rates that
Shannon's bound would give Gaussian sources of the same weighted variances.

The quantizer then uses the allocated grids: RTN as measured, or GPTQ (whose error is
lower than the RTN error the allocation assumed, by a ratio that varies less across
layers than the errors themselves do; the allocation is optimal for RTN, near it for
GPTQ). For GPTQ every layer also reports the certified bound on its output error on the
calibration inputs (framework.ratedistortion.output_error_bound) beside the measured one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import nn

from framework.calibration import BatchSize, CalibrationWindows, Damp
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import ConfigError
from framework.models import block_linears
from framework.plugins import Compressor, Context, StageResult
from framework.ratedistortion import (
    plot_bounds,
    summarize_bounds,
    summarize_output_bounds,
    tensor_bound,
)
from framework.ratedistortion.allocation import Option, allocate, reverse_water_filling
from plugins.compressors.gptq import GPTQ
from plugins.compressors.rtn import Bits, GroupSize, Quantized

log = logging.getLogger("sculpt")


def fisher_diagonal(
    model: nn.Module, linears: dict[str, nn.Linear], windows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean over windows of the squared gradient of each window's mean next-token loss
    with respect to each linear's weight. Only those weights take gradients."""
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = {name: layer.weight for name, layer in linears.items()}
    for w in weights.values():
        w.requires_grad_(True)
    sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for window in windows:
                ids = window[None].to(next(model.parameters()).device)
                loss = model(input_ids=ids, labels=ids).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, g in zip(weights, grads, strict=True):
                    sums[name] += g.detach().float().pow(2)
    finally:
        model.train(was_training)
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return {name: s / max(len(windows), 1) for name, s in sums.items()}


class _AllocatedGPTQ(GPTQ):
    """GPTQ with a grid per layer; records each layer's certified output-error bound."""

    def __init__(self, grids: dict[int, UniformGrid], **kwargs: Any):
        first = next(iter(grids.values()))
        super().__init__(
            bits=first.bits, group_size=first.group_size, symmetric=first.symmetric, **kwargs
        )
        self.grids = grids
        self.bounds: dict[int, dict[str, float]] = {}

    def _quantize_into(self, layer: nn.Linear, hessian: torch.Tensor):
        self.grid = self.grids[id(layer)]
        enc, stats = super()._quantize_into(layer, hessian)
        self.bounds[id(layer)] = stats  # GPTQ's D(R) gap and certified output bound
        return enc, stats


class RDAlloc(Compressor):
    """Per-layer bits and group size from a global budget, then GPTQ or RTN.

    Args:
        budget_bits: mean bits per weight over the block linears, all side information
            counted (e.g. 3.099 matches a uniform 3-bit asymmetric group-192 grid).
        quantizer: gptq or rtn, applied with the allocated grids.
        bits_choices: code widths on the menu (each 2-8).
        group_sizes: group sizes on the menu (null: per-channel).
        symmetric: symmetric grids (no zero points) for every option.
        sensitivity: fisher (diagonal empirical Fisher of the LM loss) or none (weight MSE).
        sensitivity_windows: calibration windows used for the Fisher (one backward each).
        damp, act_order, calibration_windows, batch_size: GPTQ's, when quantizer=gptq.
    """

    needs_calibration = True

    def __init__(
        self,
        budget_bits: Annotated[float, Gt(0)] = 3.099,
        quantizer: Literal["gptq", "rtn"] = "gptq",
        bits_choices: Sequence[Bits] = (2, 3, 4, 5, 6, 8),
        group_sizes: Sequence[GroupSize] = (64, 192, None),
        symmetric: bool = False,
        sensitivity: Literal["fisher", "none"] = "fisher",
        sensitivity_windows: Annotated[int, Ge(1)] = 16,
        damp: Damp = 0.01,
        act_order: bool = True,
        calibration_windows: CalibrationWindows = None,
        batch_size: BatchSize = 8,
    ):
        if not bits_choices:
            raise ConfigError("bits_choices", "the menu is empty")
        if not group_sizes:
            raise ConfigError("group_sizes", "the menu is empty")
        self.budget_bits = float(budget_bits)
        self.quantizer = quantizer
        self.options = [
            UniformGrid(int(b), g, symmetric)
            for b in sorted(set(bits_choices))
            for g in dict.fromkeys(group_sizes)
        ]
        self.sensitivity = sensitivity
        self.sensitivity_windows = sensitivity_windows
        self.gptq_args = {
            "damp": damp,
            "act_order": act_order,
            "calibration_windows": calibration_windows,
            "batch_size": batch_size,
        }

    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.quantize(model, ctx).result(ctx)

    @torch.no_grad()
    def quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        linears = block_linears(model, ctx.arch)
        names = list(linears)
        if self.sensitivity == "fisher":
            fisher = fisher_diagonal(model, linears, ctx.calibration(self.sensitivity_windows))
        else:  # plain weight MSE: a scalar weight broadcasts, no tensor per layer
            fisher = dict.fromkeys(linears, torch.tensor(1.0))

        menus, sizes, variances = [], [], []
        for name in ctx.track(names, description="rd_alloc menus"):
            w = linears[name].weight.detach().to(torch.float32).cpu()
            f = fisher[name].cpu()
            menu = []
            for grid in self.options:
                enc, w_hat = encode(w, grid)
                rate = 8.0 * enc.nbytes() / w.numel()
                menu.append(Option(rate, float((f * (w - w_hat).pow(2)).sum())))
            menus.append(menu)
            sizes.append(w.numel())
            variances.append(float((f * (w - w.mean()).pow(2)).mean()))
        # Only its per-layer mean is reported; the full Fisher (one float per weight) is
        # not kept through the quantizer's pass.
        sensitivity = {name: float(f.mean()) for name, f in fisher.items()}
        del fisher
        try:
            choice = allocate(menus, sizes, self.budget_bits)
        except ValueError as err:
            raise ConfigError("budget_bits", str(err)) from None
        water_rates, water_distortion = reverse_water_filling(variances, sizes, self.budget_bits)
        grids = {name: self.options[i] for name, i in zip(names, choice, strict=True)}

        if self.quantizer == "gptq":
            gptq = _AllocatedGPTQ({id(linears[n]): g for n, g in grids.items()}, **self.gptq_args)
            done = gptq.quantize(model, ctx)
            encoded, stage_metrics = done.encoded, done.metrics
            certified = {n: gptq.bounds[id(linears[n])] for n in names}
        else:
            encoded, certified, stage_metrics = {}, {}, {}
            for name in names:
                layer = linears[name]
                w = layer.weight.detach().float().cpu()
                enc, w_hat = encode(w, grids[name])
                certified[name] = tensor_bound(w, w_hat, 8.0 * enc.nbytes() / w.numel())
                layer.weight.data.copy_(w_hat.to(layer.weight.dtype))
                encoded[f"{name}.weight"] = enc
        return self._report(
            ctx,
            names,
            choice,
            menus,
            sizes,
            encoded,
            certified,
            water_rates,
            water_distortion,
            sensitivity,
            stage_metrics,
        )

    def _report(
        self,
        ctx: Context,
        names: list[str],
        choice: list[int],
        menus: list[list[Option]],
        sizes: list[int],
        encoded: dict[str, Any],
        measured: dict[str, dict[str, float]],
        water_rates: list[float],
        water_distortion: float,
        sensitivity: dict[str, float],
        stage_metrics: dict[str, Any],
    ) -> Quantized:
        """The allocation table (one row per layer: option, rate from bytes, water-filling
        rate, Gaussian D(R) gap, certified output bound with GPTQ), metrics and plots."""
        rows = []
        for k, name in enumerate(names):
            grid = self.options[choice[k]]
            m = measured[name]
            row: dict[str, Any] = {
                "layer": name,
                "bits": grid.bits,
                "group_size": grid.group_size or "channel",
                "rate": m["rate"],
                "water_filling_rate": water_rates[k],
                "sensitivity": sensitivity[name],
                "predicted_distortion": menus[k][choice[k]].distortion,
                "mse": m["mse"],
                "gaussian_dr": m["gaussian_dr"],
                "gap_bits": m["gap_bits"],
            }
            for key in ("output_error", "output_bound", "bound_ratio"):
                if key in m:
                    row[key] = m[key]
            rows.append(row)
        bits_per_weight = sum(r["rate"] * n for r, n in zip(rows, sizes, strict=True)) / sum(sizes)
        counts: dict[str, int] = {}
        for k in choice:
            g = self.options[k]
            key = f"{g.bits}b_g{g.group_size or 'ch'}"
            counts[key] = counts.get(key, 0) + 1
        metrics: dict[str, float] = {
            **{k: float(v) for k, v in stage_metrics.items() if isinstance(v, int | float)},
            # GPTQ's own nominal_bits is the last layer's grid: the budget is what was asked.
            "nominal_bits": self.budget_bits,
            "budget_bits": self.budget_bits,
            "bits_per_weight_linears": bits_per_weight,
            "predicted_weighted_distortion": sum(
                m[i].distortion for m, i in zip(menus, choice, strict=True)
            ),
            "water_filling_distortion": water_distortion,
            **summarize_bounds([measured[n] for n in names], sizes),
            **{f"layers_{k}": float(v) for k, v in counts.items()},
        }
        metrics.update(summarize_output_bounds([measured[n] for n in names]))
        plots_dir = ctx.output_dir / "plots"
        stage = ctx.stage_name or "rd_alloc"
        plots = {
            "allocation": _plot_allocation(
                rows, plots_dir / f"{stage}_allocation.png", self.budget_bits
            ),
            "rate_distortion": plot_bounds(
                [measured[n] for n in names],
                plots_dir / f"{stage}_rate_distortion.png",
                f"rd_alloc ({self.quantizer}), budget {self.budget_bits:g} bits/weight",
            ),
        }
        log.info(
            "rd_alloc: %.4f bits/weight over the block linears (budget %.4f): %s",
            bits_per_weight,
            self.budget_bits,
            counts,
        )
        return Quantized(
            encoded=encoded,
            meta={
                "method": "rd_alloc",
                "quantizer": self.quantizer,
                "budget_bits": self.budget_bits,
                "sensitivity": self.sensitivity,
            },
            metrics=metrics,
            tables={"allocation": rows},
            plots=plots,
        )


def _plot_allocation(rows: list[dict[str, Any]], path, budget: float):
    from framework.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    x = range(len(rows))
    ax.step(x, [r["rate"] for r in rows], where="mid", label="allocated (bytes written)")
    ax.plot(
        x,
        [r["water_filling_rate"] for r in rows],
        ".",
        ms=3,
        label="reverse water-filling (Gaussian)",
    )
    ax.axhline(budget, color="grey", lw=0.8, ls="--", label=f"budget {budget:g}")
    ax.set_xlabel("block linear (forward order)")
    ax.set_ylabel("bits per weight")
    ax.legend(fontsize=8)
    return save_figure(fig, path)
