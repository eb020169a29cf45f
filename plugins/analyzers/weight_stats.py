"""Per-layer weight and activation statistics of every block linear.

Weights: Frobenius norm, excess kurtosis, outlier input channels, spectral norm, effective
rank (exp of the entropy of the normalised singular values; Roy & Vetterli, 2007) and its
ratio to the full rank. Activations (the linear's input, over a few calibration windows):
RMS, max |x|, excess kurtosis and outlier channels (channels whose max |x| exceeds
`outlier_ratio` times the median channel's; the pattern LLM.int8() reports).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import nn

from framework.models import block_linears
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult


class _InputMoments:
    """Running moments of a linear's input, accumulated in float64."""

    def __init__(self, width: int):
        self.n = 0
        self.s1 = self.s2 = self.s3 = self.s4 = 0.0
        self.channel_absmax = torch.zeros(width, dtype=torch.float64)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        f64 = torch.float64  # accumulate in float64; elementwise work stays float32
        self.n += x.numel()
        self.s1 += float(x.sum(dtype=f64))
        x2 = x * x
        self.s2 += float(x2.sum(dtype=f64))
        self.s3 += float((x2 * x).sum(dtype=f64))
        self.s4 += float((x2 * x2).sum(dtype=f64))
        self.channel_absmax = torch.maximum(self.channel_absmax, x.abs().amax(dim=0).double())

    def stats(self, ratio: float) -> dict[str, float]:
        mean = self.s1 / self.n
        var = max(self.s2 / self.n - mean**2, 1e-30)
        m4 = (
            self.s4 / self.n
            - 4 * mean * self.s3 / self.n
            + 6 * mean**2 * self.s2 / self.n
            - 3 * mean**4
        )
        med = float(self.channel_absmax.median())
        return {
            "act_rms": math.sqrt(self.s2 / self.n),
            "act_absmax": float(self.channel_absmax.max()),
            "act_kurtosis": m4 / var**2 - 3.0,
            "act_outlier_channels": int((self.channel_absmax > ratio * med).sum()),
        }


def weight_stats(w: torch.Tensor, ratio: float) -> dict[str, float]:
    w = w.detach().double()
    centred = w - w.mean()
    var = float(centred.pow(2).mean())
    # Singular values from the eigenvalues of the smaller Gram matrix, in float64: several
    # times cheaper than an SVD of the full matrix, and exact enough for the spectral norm
    # and the entropy-based effective rank (both dominated by the large values).
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    s = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)
    p = s / s.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    col_norms = w.norm(dim=0)
    return {
        "fro_norm": float(w.norm()),
        "kurtosis": float(centred.pow(4).mean()) / max(var, 1e-30) ** 2 - 3.0,
        "outlier_in_channels": int((col_norms > ratio * col_norms.median()).sum()),
        "spectral_norm": float(s[0]),
        "effective_rank": math.exp(entropy),
        "effective_rank_ratio": math.exp(entropy) / min(w.shape),
    }


class WeightStats(Analyzer):
    """Weight and activation statistics per block linear, as a table and a plot.

    Args:
        calibration_windows: calibration windows fed through the model for activation
            statistics; 0 skips activations.
        outlier_ratio: a channel is an outlier when its norm (weights) or max |x|
            (activations) exceeds this multiple of the median channel's.
    """

    def __init__(
        self,
        calibration_windows: Annotated[int, Ge(0)] = 8,
        outlier_ratio: Annotated[float, Gt(1)] = 6.0,
    ):
        self.calibration_windows = calibration_windows
        self.outlier_ratio = outlier_ratio
        self.needs_calibration = calibration_windows > 0  # type: ignore[misc]

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        linears = block_linears(model, ctx.arch)
        moments = {name: _InputMoments(layer.in_features) for name, layer in linears.items()}
        if self.calibration_windows:
            handles = [
                layer.register_forward_pre_hook(moments[name]) for name, layer in linears.items()
            ]
            try:
                for window in ctx.track(
                    list(ctx.calibration(self.calibration_windows)), "activations"
                ):
                    model(input_ids=window.unsqueeze(0))
            finally:
                for h in handles:
                    h.remove()
        rows = []
        prefix = ctx.arch.blocks + "."
        for name, layer in ctx.track(list(linears.items()), "weight stats"):
            block, _, part = name[len(prefix) :].partition(".")
            row: dict[str, float | int | str] = {
                "layer": name,
                "block": int(block),
                "part": part,
                "shape": "x".join(map(str, layer.weight.shape)),
            }
            row.update(weight_stats(layer.weight, self.outlier_ratio))
            if self.calibration_windows:
                row.update(moments[name].stats(self.outlier_ratio))
            rows.append(row)
        plot = self._plot(rows, ctx)
        metrics = {
            "layers": len(rows),
            "mean_weight_kurtosis": sum(float(r["kurtosis"]) for r in rows) / len(rows),
            "max_spectral_norm": max(float(r["spectral_norm"]) for r in rows),
            "mean_effective_rank_ratio": sum(float(r["effective_rank_ratio"]) for r in rows)
            / len(rows),
            "weight_outlier_channels": sum(int(r["outlier_in_channels"]) for r in rows),
        }
        if self.calibration_windows:
            metrics["max_act_absmax"] = max(float(r["act_absmax"]) for r in rows)
            metrics["act_outlier_channels"] = sum(int(r["act_outlier_channels"]) for r in rows)
        return StageResult(metrics=metrics, tables={"layers": rows}, plots={"layer_stats": plot})

    def _plot(self, rows: list[dict], ctx: Context):
        plt = pyplot()
        keys = ["kurtosis", "spectral_norm", "effective_rank_ratio"]
        if self.calibration_windows:
            keys.append("act_absmax")
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
        parts = sorted({str(r["part"]) for r in rows})
        for ax, key in zip(axes, keys):
            for part in parts:
                sel = [r for r in rows if r["part"] == part]
                ax.plot(
                    [r["block"] for r in sel],
                    [r[key] for r in sel],
                    marker=".",
                    label=part.split(".")[-1],
                )
            ax.set_title(key)
            ax.set_xlabel("block")
            if key in ("act_absmax", "kurtosis"):
                ax.set_yscale("symlog")
        axes[0].legend(fontsize=7)
        fig.suptitle("per-layer statistics of block linears")
        return save_figure(
            fig, ctx.output_dir / "plots" / f"{ctx.stage_name or 'weight_stats'}.png"
        )
