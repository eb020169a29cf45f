"""A TopK sparse autoencoder (Gao et al., 2024, "Scaling and evaluating sparse
autoencoders") on one layer's activations, trained under the trainer config.

The stage collects the site's activations (residual stream after block ``layer``, or the
attention / MLP output it adds) on calibration windows, stopping each forward pass after
that block and leaving out every window's first token (the attention sink); whole windows
are held out for evaluation, so no held-out token has a training neighbour. Training is
framework.lightning.dictionary's (the method is described there); the file it leaves is
``<stage>/dictionary.safetensors`` in framework.dictionary's format, and the reported
held-out numbers are computed from that file with framework.dictionary.encode / decode:

* ``fvu``: fraction of variance unexplained, ||x - x_hat||^2 / ||x - mean||^2;
* ``l0``: mean number of nonzero latents per token (k by construction, fewer only when
  some of the top k pre-activations are <= 0);
* ``dead_features``: latents never active on the held-out tokens.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from framework.dictionary import (
    DICTIONARY_FILE,
    Dictionary,
    collect_activations,
    decode,
    encode,
    massive_mask,
    save_dictionary,
)
from framework.errors import ConfigError
from framework.interventions import check_supported, num_layers
from framework.plugins import Analyzer, Context, StageResult

log = logging.getLogger("sculpt")

#: framework.interventions.SITES less the embedding (a dictionary reads a block's site)
SaeSite = Literal["residual", "mlp", "attn"]


@torch.no_grad()
def evaluate_dictionary(
    d: Dictionary, x: torch.Tensor, chunk: int = 4096
) -> dict[str, float | torch.Tensor]:
    """Held-out numbers of ``d`` on activations x [n, dim]: fvu, l0, dead features and the
    per-feature firing counts (``counts``, a tensor)."""
    sq_err = 0.0
    counts = torch.zeros(d.features, dtype=torch.long)
    nonzero = 0
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk].float()
        f = encode(d, xs)
        active = f != 0
        nonzero += int(active.sum())
        counts += active.sum(0)
        sq_err += float((xs.double() - decode(d, f).double()).pow(2).sum())
    variance = float((x.double() - x.double().mean(0)).pow(2).sum())
    return {
        "fvu": sq_err / variance if variance > 0 else float("nan"),
        "l0": nonzero / max(len(x), 1),
        "dead_features": float(int((counts == 0).sum())),
        "counts": counts,
    }


def heldout_split(
    windows: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out windows, training windows): a seeded ``fraction`` of whole windows."""
    n_held = max(1, round(fraction * len(windows)))
    if len(windows) - n_held < 1:
        raise ConfigError("windows", f"{len(windows)} window(s) leave none to train on")
    order = torch.randperm(len(windows), generator=generator)
    return windows[order[:n_held]], windows[order[n_held:]]


class SparseAutoencoder(Analyzer):
    """Train a TopK sparse dictionary on one layer and report it on held-out tokens.

    Args:
        layer: block whose site is read (negative: from the end; null: the middle block).
        site: ``residual`` (the stream after the block), ``mlp`` or ``attn`` (what the
            block's MLP / attention adds to it).
        features: dictionary size F.
        k: active latents per token (the L0).
        lr: Adam's learning rate; null: 4e-4 x sqrt(4096 / features) (Gao et al.'s 1/sqrt(F)
            scaling).
        aux_k: dead latents used by the AuxK loss (0: off).
        aux_coef: weight of the AuxK loss.
        dead_after_tokens: training tokens without firing after which a latent is dead.
        windows: calibration windows to collect (null: all of data.calibration).
        heldout_fraction: share of those windows (whole windows) held out for evaluation.
        batch_tokens: activations per optimizer step; null: trainer.batch_size windows'
            worth (batch_size x tokens per window, drawn shuffled across all windows).
        collect_batch: windows per forward pass while collecting.
        massive_ratio: tokens whose activation norm exceeds this x the median (massive
            activations at sink-like positions) are left out of training and evaluation
            and counted (``massive_tokens``); null: keep every token.
    """

    needs_calibration = True
    needs_gradients = True

    def __init__(
        self,
        layer: int | None = None,
        site: SaeSite = "residual",
        features: Annotated[int, Ge(2)] = 4096,
        k: Annotated[int, Ge(1)] = 32,
        lr: Annotated[float, Gt(0)] | None = None,
        aux_k: Annotated[int, Ge(0)] = 256,
        aux_coef: Annotated[float, Ge(0)] = 1 / 32,
        dead_after_tokens: Annotated[int, Ge(1)] = 50_000,
        windows: Annotated[int, Ge(2)] | None = None,
        heldout_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.1,
        batch_tokens: Annotated[int, Ge(1)] | None = None,
        collect_batch: Annotated[int, Ge(1)] = 8,
        massive_ratio: Annotated[float, Gt(1)] | None = 10.0,
    ):
        if not k < features:
            raise ConfigError("k", f"must be in [1, features={features}), got {k}")
        self.layer, self.site, self.features, self.k = layer, site, features, k
        self.lr, self.aux_k, self.aux_coef = lr, aux_k, aux_coef
        self.dead_after_tokens, self.windows = dead_after_tokens, windows
        self.heldout_fraction, self.batch_tokens = heldout_fraction, batch_tokens
        self.collect_batch = collect_batch
        self.massive_ratio = massive_ratio

    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        from framework.lightning.dictionary import DictionaryConfig, default_lr, train_dictionary
        from framework.plots import line_plot

        check_supported(ctx.arch, "sparse autoencoders")
        if ctx.trainer is None:
            raise ConfigError("trainer", "the SAE trains under the trainer config (none was built)")
        n_layers = num_layers(model, ctx.arch)
        layer = n_layers // 2 if self.layer is None else self.layer
        if not -n_layers <= layer < n_layers:
            raise ConfigError("layer", f"{layer} does not exist (model has {n_layers} blocks)")
        layer %= n_layers

        windows = ctx.calibration(self.windows)
        held_w, train_w = heldout_split(windows, self.heldout_fraction, ctx.generator())

        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            grab = dict(layer=layer, site=self.site, batch_size=self.collect_batch)
            x_train = collect_activations(model, ctx.arch, train_w, track=ctx.track, **grab)
            x_held = collect_activations(model, ctx.arch, held_w, **grab)
        finally:
            model.train(was_training)
        collect_seconds = time.perf_counter() - start
        massive = 0
        if self.massive_ratio is not None:
            median = float(x_train.norm(dim=-1).median())
            drop_train = massive_mask(x_train, self.massive_ratio, median)
            drop_held = massive_mask(x_held, self.massive_ratio, median)
            massive = int(drop_train.sum()) + int(drop_held.sum())
            x_train, x_held = x_train[~drop_train], x_held[~drop_held]

        spec = ctx.trainer
        per_window = max(windows.shape[1] - 1, 1)
        batch_tokens = self.batch_tokens or spec.batch_size * per_window
        config = DictionaryConfig(
            features=self.features,
            k=self.k,
            lr=self.lr if self.lr is not None else default_lr(self.features),
            aux_k=self.aux_k,
            aux_coef=self.aux_coef,
            dead_after_tokens=self.dead_after_tokens,
        )
        model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        log.info(
            "SAE: %d train / %d held-out tokens of %s@%d (d=%d), F=%d, k=%d, %d steps x %d",
            len(x_train),
            len(x_held),
            self.site,
            layer,
            x_train.shape[1],
            self.features,
            self.k,
            spec.max_steps,
            batch_tokens,
        )
        outcome = train_dictionary(
            spec,
            x_train,
            config,
            batch_tokens=batch_tokens,
            seed=ctx.seed * 1_000_003 + layer,
            layer=layer,
            site=self.site,
            model_name=model_name,
        )
        d = outcome.dictionary
        d.metadata.update(
            {
                "features": str(self.features),
                "train_tokens": str(len(x_train)),
                "steps": str(outcome.steps),
            }
        )
        out_dir = ctx.stage_dir(ctx.stage_name or "sae")
        path = save_dictionary(out_dir / DICTIONARY_FILE, d)

        held = evaluate_dictionary(d, x_held)
        # The same numbers on (a sample of) the training tokens: the gap is overfitting.
        sample = x_train[torch.randperm(len(x_train), generator=ctx.generator())[: len(x_held)]]
        train_eval = evaluate_dictionary(d, sample)
        counts = held.pop("counts")
        assert isinstance(counts, torch.Tensor)
        losses = outcome.losses
        every = max(spec.log_every_n_steps, 1)
        plot = line_plot(
            out_dir / "loss.png",
            {"batch FVU": (list(range(1, len(losses) + 1)), losses)},
            title=f"TopK SAE {self.site}@{layer}: F={self.features}, k={self.k}",
            xlabel="step",
            ylabel="FVU (training batch)",
            logy=True,
        )
        metrics = {
            "layer": float(layer),
            "features": float(self.features),
            "k": float(self.k),
            "fvu": float(held["fvu"]),
            "l0": float(held["l0"]),
            "dead_features": float(held["dead_features"]),
            "dead_fraction": float(held["dead_features"]) / self.features,
            "fvu_train_sample": float(train_eval["fvu"]),
            "dead_in_training": float(outcome.dead_at_end),
            "train_tokens": float(len(x_train)),
            "heldout_tokens": float(len(x_held)),
            "massive_tokens": float(massive),
            "steps": float(outcome.steps),
            "batch_tokens": float(min(batch_tokens, len(x_train))),
            "lr": config.lr,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "collect_seconds": collect_seconds,
            "train_seconds": outcome.seconds,
        }
        summary = [
            {
                "site": f"{self.site}@{layer}",
                "features": self.features,
                "k": self.k,
                "heldout_fvu": round(metrics["fvu"], 4),
                "train_fvu": round(metrics["fvu_train_sample"], 4),
                "l0": round(metrics["l0"], 2),
                "dead_features": int(metrics["dead_features"]),
                "train_tokens": len(x_train),
                "steps": outcome.steps,
                "train_seconds": round(outcome.seconds, 1),
            }
        ]
        curve = [
            {"step": i + 1, "batch_fvu": round(v, 5), "aux": round(outcome.aux_losses[i], 5)}
            for i, v in enumerate(losses)
            if (i + 1) % every == 0 or i == len(losses) - 1
        ]
        return StageResult(
            metrics=metrics,
            artifacts={"dictionary": path},
            tables={"dictionary": summary, "loss": curve},
            plots={"loss": plot},
        )
