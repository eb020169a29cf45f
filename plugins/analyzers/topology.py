"""Topology of the residual stream, block by block, and neural persistence of the weights.

Points: the hidden states after each block (the residual stream) at `points` tokens drawn
once, with the stage's seeded generator, from the first `calibration_windows` calibration
windows (the first position of each window, an attention sink, is left out); every block
sees the same tokens. With metric=euclidean and normalize=true each block's cloud is divided
by its median token norm, so filtration values compare across depth; metric=cosine uses the
chordal distance between unit vectors (already scale free).

Per block: Vietoris-Rips H0/H1 diagrams (ripser), total persistence per dimension, the
number of H1 features living longer than `h1_threshold` (in those units), Betti curves on one
grid shared by all blocks, the TwoNN intrinsic dimension (Facco et al., 2017), and the
normalised neural persistence (Rieck et al., ICLR 2019) of each block linear. The diagrams
are saved to `<stage>/diagrams.safetensors` (framework.topology.load_diagrams reads them) so a
later stage can compare a compressed model's topology with this one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from annotated_types import Ge, Interval
from torch import nn

from framework import topology as topo
from framework.errors import ConfigError
from framework.models import blocks
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult
from framework.topology import Metric

BETTI_STEPS = 64


class Topology(Analyzer):
    """Persistent homology, intrinsic dimension and neural persistence per block.

    Args:
        calibration_windows: calibration windows run through the model (one forward).
        points: tokens per block cloud, sampled once with the stage's seeded generator.
        max_dim: highest homology dimension (0: components only, 1: also loops).
        layers: block indices to analyse (negative counts from the end); null: all blocks.
        metric: distance between hidden states, euclidean or cosine (chordal).
        normalize: with euclidean, divide each block's cloud by its median token norm.
        neural_persistence: also compute the neural persistence of every block linear.
        h1_threshold: lifetime above which an H1 feature counts as prominent.
        workers: processes running ripser (it holds the GIL); 1 runs it in-process.
        plot_layers: blocks whose diagrams are plotted (evenly spread over `layers`); 0: none.
    """

    needs_calibration = True

    def __init__(
        self,
        calibration_windows: Annotated[int, Ge(1)] = 4,
        points: Annotated[int, Ge(3)] = 800,
        max_dim: Annotated[int, Interval(ge=0, le=1)] = 1,
        layers: list[int] | None = None,
        metric: Metric = "euclidean",
        normalize: bool = True,
        neural_persistence: bool = True,
        h1_threshold: Annotated[float, Ge(0)] = 0.05,
        workers: Annotated[int, Ge(1)] = 2,
        plot_layers: Annotated[int, Ge(0)] = 4,
    ):
        if layers is not None and (len(layers) == 0 or not all(isinstance(i, int) for i in layers)):
            raise ConfigError(
                "layers", f"{layers} must be null or a non-empty list of block indices"
            )
        self.calibration_windows = calibration_windows
        self.points = points
        self.max_dim = max_dim
        self.layers = None if layers is None else [int(i) for i in layers]
        self.metric = metric
        self.normalize = normalize
        self.neural_persistence = neural_persistence
        self.h1_threshold = h1_threshold
        self.workers = workers
        self.plot_layers = plot_layers

    def _block_indices(self, n_blocks: int) -> list[int]:
        if self.layers is None:
            return list(range(n_blocks))
        out = []
        for i in self.layers:
            if not -n_blocks <= i < n_blocks:
                raise ConfigError("layers", f"index {i} is out of range for {n_blocks} blocks")
            out.append(i % n_blocks)
        return sorted(set(out))

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        stage = ctx.stage_name or "topology"
        all_blocks = blocks(model, ctx.arch)
        chosen = self._block_indices(len(all_blocks))
        names = [f"{ctx.arch.blocks}.{i}" for i in chosen]

        windows = ctx.calibration(self.calibration_windows)
        index = topo.sample_tokens(windows.shape[0], windows.shape[1], self.points, ctx.generator())
        if index.numel() < 3:
            raise ConfigError(
                "calibration_windows",
                f"{windows.shape[0]} windows of "
                f"{windows.shape[1]} tokens give only {index.numel()} points",
            )
        result = topo.residual_topology(
            model,
            {name: all_blocks[i] for i, name in zip(chosen, names)},
            windows,
            index,
            max_dim=self.max_dim,
            metric=self.metric,
            normalize=self.normalize,
            workers=self.workers,
            track=ctx.track,
            # Neural persistence runs in this process while the workers compute diagrams.
            concurrently=(lambda: self._neural_persistence(all_blocks, chosen, ctx))
            if self.neural_persistence
            else None,
        )
        dgms, twonn = result.diagrams, result.twonn
        np_rows: list[dict[str, Any]] = result.concurrent_result or []
        t4 = time.perf_counter()

        grid = topo.filtration_grid([d for ds in dgms.values() for d in ds], BETTI_STEPS)
        betti = np.stack([np.stack([topo.betti_curve(d, grid) for d in dgms[n]]) for n in names])
        rows = []
        for k, (i, name) in enumerate(zip(chosen, names)):
            row: dict[str, Any] = {"layer": name, "block": i, "points": int(index.numel())}
            for dim, dgm in enumerate(dgms[name]):
                row[f"h{dim}_features"] = len(topo.finite(dgm))
                row[f"h{dim}_total_persistence"] = topo.total_persistence(dgm)
                row[f"h{dim}_max_persistence"] = topo.max_persistence(dgm)
            if self.max_dim >= 1:
                row["h1_prominent"] = topo.count_persistent(dgms[name][1], self.h1_threshold)
            row["twonn_dimension"] = twonn[name]
            mine = [r["neural_persistence"] for r in np_rows if r["block"] == i]
            if mine:
                row["neural_persistence"] = float(np.mean(mine))
            if self.max_dim >= 1:
                row["betti1_peak"] = int(betti[k, 1].max())
            rows.append(row)

        artifact = topo.save_diagrams(
            ctx.stage_dir(stage) / "diagrams.safetensors",
            dgms,
            arrays={
                "betti_grid": grid,
                "betti_curves": betti,
                "token_index": index.numpy(),
                "twonn_dimension": np.array([twonn[n] for n in names]),
            },
            metadata={
                "metric": self.metric,
                "normalize": self.normalize,
                "points": int(index.numel()),
                "calibration_windows": int(windows.shape[0]),
                "seq_len": int(windows.shape[1]),
                "seed": ctx.seed,
                "stage": stage,
                "skip_first": 1,
                "betti_curves": "[layer, dim, step] over betti_grid",
            },
        )
        plots = {"summary": self._plot_summary(rows, np_rows, grid, betti, ctx, stage)}
        if self.plot_layers:
            plots["diagrams"] = self._plot_diagrams(dgms, names, chosen, ctx, stage)
        t5 = time.perf_counter()

        metrics: dict[str, float] = {"layers": len(rows), "points": int(index.numel())}
        keys = [f"h{d}_total_persistence" for d in range(self.max_dim + 1)] + ["twonn_dimension"]
        if self.max_dim >= 1:
            keys += ["h1_prominent", "h1_max_persistence"]
        if np_rows:
            keys.append("neural_persistence")
        for key in keys:
            metrics[f"mean_{key}"] = float(np.nanmean([float(r[key]) for r in rows]))
        sec = result.seconds
        metrics.update(
            forward_seconds=sec["forward"],
            diagram_seconds=sec["distances"] + sec["diagrams_wait"],
            neural_persistence_seconds=sec["concurrent"],
            plot_seconds=t5 - t4,
        )
        tables = {"layers": rows}
        if np_rows:
            tables["neural_persistence"] = np_rows
        return StageResult(
            metrics=metrics, tables=tables, plots=plots, artifacts={"diagrams": artifact}
        )

    def _neural_persistence(
        self, all_blocks: nn.ModuleList, chosen: list[int], ctx: Context
    ) -> list[dict[str, Any]]:
        rows = []
        for i in ctx.track(chosen, "neural persistence"):
            for rel in ctx.arch.linear_names():
                layer = all_blocks[i].get_submodule(rel)
                rows.append(
                    {
                        "layer": f"{ctx.arch.blocks}.{i}.{rel}",
                        "block": i,
                        "part": rel,
                        "shape": "x".join(map(str, layer.weight.shape)),
                        "neural_persistence": topo.neural_persistence(layer.weight),
                    }
                )
        return rows

    def _plot_diagrams(
        self,
        dgms: dict[str, list[np.ndarray]],
        names: list[str],
        chosen: list[int],
        ctx: Context,
        stage: str,
    ) -> Path:
        plt = pyplot()
        k = min(self.plot_layers, len(names))
        picks = sorted({round(x) for x in np.linspace(0, len(names) - 1, k)})
        fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 3.6), squeeze=False)
        for ax, p in zip(axes[0], picks):
            top = (
                max(
                    (
                        float(topo.finite(d)[:, 1].max())
                        for d in dgms[names[p]]
                        if topo.finite(d).size
                    ),
                    default=1.0,
                )
                * 1.05
            )
            for dim, dgm in enumerate(dgms[names[p]]):
                f = topo.finite(dgm)
                ax.scatter(f[:, 0], f[:, 1], s=6, alpha=0.6, label=f"H{dim} ({len(f)})")
            ax.plot([0, top], [0, top], color="grey", lw=0.8)
            ax.set_xlim(0, top)
            ax.set_ylim(0, top)
            ax.set_title(f"block {chosen[p]}")
            ax.set_xlabel("birth")
            ax.legend(fontsize=7, loc="lower right")
        axes[0][0].set_ylabel("death")
        fig.suptitle(f"persistence diagrams of the residual stream ({self.metric})")
        fig.tight_layout()
        return save_figure(fig, ctx.output_dir / "plots" / f"{stage}_diagrams.png")

    def _plot_summary(
        self,
        rows: list[dict[str, Any]],
        np_rows: list[dict[str, Any]],
        grid: np.ndarray,
        betti: np.ndarray,
        ctx: Context,
        stage: str,
    ) -> Path:
        plt = pyplot()
        fig, axes = plt.subplots(2, 3, figsize=(13, 7))
        x = [r["block"] for r in rows]
        panels: list[tuple[str, list[str]]] = [
            ("total persistence", [f"h{d}_total_persistence" for d in range(self.max_dim + 1)]),
            (
                f"H1 features, lifetime > {self.h1_threshold:g}" if self.max_dim else "H0 features",
                ["h1_prominent"] if self.max_dim else ["h0_features"],
            ),
            ("TwoNN intrinsic dimension", ["twonn_dimension"]),
        ]
        for ax, (title, keys) in zip(axes.flat, panels):
            for key in keys:
                ax.plot(x, [r[key] for r in rows], marker=".", label=key)
            ax.set_title(title)
            ax.set_xlabel("block")
            if len(keys) > 1:  # total persistence: H0 dwarfs H1
                ax.set_yscale("log")
                ax.legend(fontsize=7)
        ax = axes.flat[3]
        if np_rows:
            for part in dict.fromkeys(r["part"] for r in np_rows):
                sel = [r for r in np_rows if r["part"] == part]
                ax.plot(
                    [r["block"] for r in sel],
                    [r["neural_persistence"] for r in sel],
                    marker=".",
                    label=part.split(".")[-1],
                )
            ax.set_title("normalised neural persistence")
            ax.set_xlabel("block")
            ax.legend(fontsize=7)
        else:
            ax.set_axis_off()
        for ax, dim in zip(axes.flat[4:], range(min(2, self.max_dim + 1))):
            im = ax.imshow(
                betti[:, dim, :],
                aspect="auto",
                origin="lower",
                interpolation="nearest",
                extent=(float(grid[0]), float(grid[-1]), -0.5, len(rows) - 0.5),
            )
            ax.set_title(f"Betti-{dim} curves")
            ax.set_xlabel("filtration value")
            ax.set_ylabel("analysed block (row)")
            fig.colorbar(im, ax=ax)
        if self.max_dim == 0:
            axes.flat[5].set_axis_off()
        fig.suptitle(f"topology per block ({rows[0]['points']} tokens, {self.metric})")
        fig.tight_layout()
        return save_figure(fig, ctx.output_dir / "plots" / f"{stage}_summary.png")
