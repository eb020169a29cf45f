"""Linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations
Revisited", Eq. 2 in its feature-space form) between the residual streams of every pair of
layers, and between each layer of the model and the same layer of ``ctx.reference`` (the
untouched model the runner keeps when a stage asks for it), so that after a compressor or an
editor it shows where the representation moved.

Tokens are the positions of the evaluation windows; the first position of each window is
left out by default: its residual carries the attention-sink's few huge channels, which
would dominate any linear similarity.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from framework.errors import SculptError
from framework.interventions import check_supported, num_layers, residual_stream
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA of two [n, d] representations of the same n examples: ||Yc^T Xc||_F^2 /
    (||Xc^T Xc||_F ||Yc^T Yc||_F), with column-centred Xc, Yc (float64)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if float(denom) > 0 else 0.0


class CKA(Analyzer):
    """Layer-by-layer linear CKA, within the model and against the reference.

    Args:
        windows: evaluation windows whose tokens are compared; null: all.
        max_tokens: tokens kept (evenly spaced) after dropping first positions.
        skip_first: leave out each window's first position (the attention sink).
        compare_reference: also compare with ctx.reference (the runner then keeps a copy
            of the model from before the first stage).
    """

    def __init__(
        self,
        windows: Annotated[int, Ge(1)] | None = 2,
        max_tokens: Annotated[int, Ge(4)] = 1024,
        skip_first: bool = True,
        compare_reference: bool = True,
    ):
        self.windows = windows
        self.max_tokens = max_tokens
        self.skip_first = skip_first
        self.compare_reference = compare_reference
        self.needs_reference = compare_reference  # type: ignore[misc]

    def _features(self, model: nn.Module, ctx: Context) -> list[torch.Tensor]:
        assert ctx.evaluation_windows is not None
        windows = ctx.evaluation_windows[: self.windows]
        n_layers = num_layers(model, ctx.arch)
        per_layer: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        for window in windows:
            stream = residual_stream(model, ctx.arch, window.unsqueeze(0))
            for layer in range(n_layers):
                h = stream[layer][0]
                per_layer[layer].append(h[1:] if self.skip_first else h)
        feats = [torch.cat(hs).float() for hs in per_layer]
        n = feats[0].shape[0]
        if n > self.max_tokens:
            keep = torch.linspace(0, n - 1, self.max_tokens).round().long()
            feats = [f[keep] for f in feats]
        return feats

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "CKA")
        if ctx.evaluation_windows is None:
            raise SculptError("data.evaluation: CKA needs evaluation windows")
        feats = self._features(model, ctx)
        n_layers = len(feats)
        within = torch.eye(n_layers, dtype=torch.float64)
        for i in range(n_layers):
            for j in range(i + 1, n_layers):
                within[i, j] = within[j, i] = linear_cka(feats[i], feats[j])
        metrics: dict[str, float] = {
            "layers": float(n_layers),
            "tokens": float(feats[0].shape[0]),
            "adjacent_cka_mean": float(within.diagonal(1).mean()) if n_layers > 1 else 1.0,
            "first_last_cka": float(within[0, -1]),
        }
        rows = [
            {"layer": i, "cka_next": round(float(within[i, i + 1]), 4) if i + 1 < n_layers else 1.0}
            for i in range(n_layers)
        ]
        cross = None
        if self.compare_reference and ctx.reference is not None:
            ref_feats = self._features(ctx.reference, ctx)
            if len(ref_feats) != n_layers:
                raise SculptError(
                    f"reference has {len(ref_feats)} blocks, the model {n_layers}: "
                    "layer-wise CKA needs the same depth"
                )
            cross = torch.tensor(
                [
                    [linear_cka(feats[i], ref_feats[j]) for j in range(n_layers)]
                    for i in range(n_layers)
                ],
                dtype=torch.float64,
            )
            diag = cross.diagonal()
            for i, row in enumerate(rows):
                row["cka_to_reference"] = round(float(diag[i]), 4)
            metrics["reference_cka_mean"] = float(diag.mean())
            metrics["reference_cka_min"] = float(diag.min())
            metrics["reference_cka_min_layer"] = float(diag.argmin())
        return StageResult(
            metrics=metrics, tables={"cka": rows}, plots={"cka": self._plot(ctx, within, cross)}
        )

    @staticmethod
    def _plot(ctx: Context, within: torch.Tensor, cross: torch.Tensor | None):
        plt = pyplot()
        mats = [("model layer x model layer", within)]
        if cross is not None:
            mats.append(("model layer (rows) x reference layer", cross))
        fig, axes = plt.subplots(1, len(mats), figsize=(5.2 * len(mats), 4.4), squeeze=False)
        for ax, (title, m) in zip(axes[0], mats):
            im = ax.imshow(m.numpy(), origin="lower", cmap="magma", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, label="linear CKA")
        name = ctx.stage_name or "cka"
        return save_figure(fig, ctx.output_dir / "plots" / f"{name}.png")
