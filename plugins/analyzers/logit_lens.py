"""The logit lens (nostalgebraist, 2020; Belrose et al., 2023, "Eliciting Latent Predictions
from Transformers with the Tuned Lens", Section 2): decode every layer's residual stream with
the model's own final norm and LM head, and see how the prediction forms layer by layer.

Per layer, over every position of the evaluation windows: top-1 agreement with the model's
final prediction, KL(final || lens) in nats per token, the lens distribution's entropy, and
its next-token cross-entropy. The last layer's lens is the model's output (agreement 1,
KL 0), which the table shows as a check.
"""

from __future__ import annotations

from typing import Annotated

import torch
from annotated_types import Ge
from torch import nn

from framework.errors import SculptError
from framework.interventions import check_supported, lens_logits, num_layers, residual_stream
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult


class LogitLens(Analyzer):
    """Layer-by-layer prediction on the evaluation windows.

    Args:
        windows: evaluation windows decoded (each costs one LM-head product per layer);
            null: all of them.
    """

    def __init__(self, windows: Annotated[int, Ge(1)] | None = 2):
        self.windows = windows

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "the logit lens")
        if ctx.evaluation_windows is None:
            raise SculptError("data.evaluation: the logit lens needs evaluation windows")
        windows = ctx.evaluation_windows[: self.windows]
        n_layers = num_layers(model, ctx.arch)
        sums = torch.zeros(n_layers, 4, dtype=torch.float64)  # agree, kl, entropy, nll
        tokens = 0
        for window in ctx.track(list(windows), "logit lens"):
            ids = window.unsqueeze(0)
            stream = residual_stream(model, ctx.arch, ids)
            final = lens_logits(model, ctx.arch, stream[n_layers - 1])[0].float()
            final_logp = final.log_softmax(-1)
            final_top = final.argmax(-1)
            nxt = window[1:]
            tokens += window.numel()
            for layer in range(n_layers):
                logp = lens_logits(model, ctx.arch, stream[layer])[0].float().log_softmax(-1)
                p = logp.exp()
                sums[layer, 0] += float((logp.argmax(-1) == final_top).sum())
                sums[layer, 1] += float((final_logp.exp() * (final_logp - logp)).sum())
                sums[layer, 2] += float(-(p * logp).sum())
                # next-token NLL over the positions that have a next token; scaled below
                nll = -logp[:-1].gather(1, nxt.unsqueeze(1)).mean()
                sums[layer, 3] += float(nll) * window.numel()
        means = sums / tokens
        rows = [
            {
                "layer": layer,
                "top1_agreement": round(float(means[layer, 0]), 4),
                "kl_to_final": round(float(means[layer, 1]), 4),
                "entropy": round(float(means[layer, 2]), 4),
                "next_token_nll": round(float(means[layer, 3]), 4),
            }
            for layer in range(n_layers)
        ]
        agree = means[:, 0]
        reached = (agree >= 0.5).nonzero()
        metrics = {
            "layers": float(n_layers),
            "tokens": float(tokens),
            # first layer whose lens agrees with the final prediction on half the tokens
            "first_layer_top1_over_half": float(reached[0]) if len(reached) else -1.0,
            "mean_top1_agreement": float(agree.mean()),
            "mean_kl_to_final": float(means[:, 1].mean()),
            "last_layer_kl": float(means[-1, 1]),
            "min_next_token_nll": float(means[:, 3].min()),
        }
        return StageResult(
            metrics=metrics,
            tables={"logit_lens": rows},
            plots={"logit_lens": self._plot(rows, ctx)},
        )

    @staticmethod
    def _plot(rows: list[dict], ctx: Context):
        plt = pyplot()
        keys = [
            ("top1_agreement", "top-1 agreement with final"),
            ("kl_to_final", "KL(final || lens), nats"),
            ("entropy", "entropy, nats"),
            ("next_token_nll", "next-token NLL, nats"),
        ]
        fig, axes = plt.subplots(1, len(keys), figsize=(16, 3.3))
        x = [r["layer"] for r in rows]
        for ax, (key, title) in zip(axes, keys):
            ax.plot(x, [r[key] for r in rows], marker=".")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        fig.suptitle("logit lens: final norm + LM head on each layer's residual stream")
        name = ctx.stage_name or "logit_lens"
        return save_figure(fig, ctx.output_dir / "plots" / f"{name}.png")
