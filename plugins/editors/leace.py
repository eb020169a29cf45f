"""LEACE concept erasure (Belrose et al., 2023, "LEACE: Perfect linear concept erasure in
closed form") fitted on one layer's residual stream and folded into the weights, so the
edit saves and reloads with the model as a plain Hugging Face checkpoint.

Where the eraser can live. The residual stream after block L is the sum of everything
written into it: the token embedding and the outputs of the attention and MLP output
projections of blocks 0..L. A linear map E applied to each of those writers' outputs
(W <- E W for o_proj / down_proj, rows of the embedding e <- E e) therefore puts E exactly
on the stream after block L: h'_L = E h~_L. No exact fold places E on the stream after
block L while leaving blocks 0..L untouched: every later reader sees the stream through an
RMSNorm (x / rms(x), which does not commute with a projection) and the skip path carries
h_L onwards unchanged, and Llama's projections have no bias for the affine part. So:

* E is the bias-free linear part I - P of the LEACE eraser x -> x - P(x - mu). Dropping
  the constant P mu shifts the stream's mean but keeps the guarantee: (I - P) Sigma_xz = 0,
  so every class has the same conditional mean after E and no linear probe can beat a
  constant predictor on the fitting data (LEACE Theorem 3.1).
* Blocks 0..L now read an erased stream too, so h~_L is not the h_L the eraser was fitted
  on. The editor refits on the edited model's own states and folds again (``iterations``)
  until the remaining cross-covariance is below ``tolerance`` of the first one: each fold
  is an exact LEACE eraser of the current representation, and the product of the folded
  maps is the edit.
* A tied LM head is untied first (it must keep reading the unerased embedding).

Verification, reported in the metrics and enforced by ``max_over_baseline``: a held-out
probe (k-fold logistic regression, on the examples the eraser never saw) on the edited
layer against the majority baseline, before and after. The runner measures KL to the
unedited model on the evaluation windows after the stage (``eval.max_kl``).
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn

from framework.concepts import (
    leace,
    load_labelled,
    probe_accuracy,
    sentence_states,
    stratified_split,
)
from framework.errors import ConfigError, SculptError
from framework.interventions import check_supported, num_layers
from framework.models import blocks
from framework.plugins import Context, Editor, StageResult


def class_mean_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest distance of a class-conditional mean from the overall mean, relative to the
    states' RMS norm (0: the means coincide)."""
    x = x.double()
    mu = x.mean(0)
    scale = float((x - mu).pow(2).sum(1).mean().sqrt()) or 1.0
    return max(float((x[y == c].mean(0) - mu).norm()) for c in y.unique()) / scale


def untie_head(model: nn.Module, embed: nn.Module, head: nn.Module) -> bool:
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_into_writers(model: nn.Module, arch, layer: int, eraser: torch.Tensor) -> None:
    """Apply the linear map ``eraser`` ([d, d]) to every write into the residual stream up
    to and including block ``layer``: embedding rows and the attention / MLP output
    projections."""
    embed = model.get_submodule(arch.embed)
    e = eraser.to(torch.float64)
    embed.weight.copy_((embed.weight.double() @ e.T).to(embed.weight.dtype))
    for block in list(blocks(model, arch))[: layer + 1]:
        for name in (arch.o, arch.mlp_out):
            lin = block.get_submodule(name)
            if getattr(lin, "bias", None) is not None:
                lin.bias.copy_((e @ lin.bias.double()).to(lin.bias.dtype))
            lin.weight.copy_((e @ lin.weight.double()).to(lin.weight.dtype))


class Leace(Editor):
    """Erase a labelled concept from the residual stream after block ``layer``.

    Args:
        data: JSON-lines file of {"text", "label"} (relative paths: to the repository too).
        layer: block whose output stream is erased.
        fit_fraction: stratified fraction of every class the eraser is fitted on; the rest
            is held out for verification.
        split_seed: seed of that split (probes' skip_fraction/split_seed pick the same).
        shrinkage: Sigma + shrinkage * tr(Sigma)/d * I in the whitening (0: exact LEACE on
            the range of Sigma).
        iterations: refit-and-fold rounds at most (see the module docstring).
        tolerance: stop when the fitted states' cross-covariance norm falls below this
            fraction of the first round's.
        folds: cross-validation folds of the verification probe.
        l2: L2 penalty of the verification probe.
        max_over_baseline: fail the run when the held-out probe beats the majority baseline
            by more than this (accuracy fraction); null: report only.
    """

    def __init__(
        self,
        data: str = "experiments/data/concept_animals_tools.jsonl",
        layer: int = 10,
        fit_fraction: float = 0.5,
        split_seed: int = 0,
        shrinkage: float = 0.0,
        iterations: int = 4,
        tolerance: float = 1e-3,
        folds: int = 5,
        l2: float = 1e-2,
        max_over_baseline: float | None = 0.02,
    ):
        if not 0 < fit_fraction < 1:
            raise ConfigError("fit_fraction", f"{fit_fraction} must be in (0, 1)")
        if shrinkage < 0:
            raise ConfigError("shrinkage", f"{shrinkage} must be >= 0")
        if iterations < 1:
            raise ConfigError("iterations", f"{iterations} must be >= 1")
        if tolerance <= 0:
            raise ConfigError("tolerance", f"{tolerance} must be > 0")
        if folds < 2:
            raise ConfigError("folds", f"{folds} must be >= 2")
        if max_over_baseline is not None and max_over_baseline < 0:
            raise ConfigError("max_over_baseline", f"{max_over_baseline} must be >= 0")
        self.data = data
        self.layer = layer
        self.fit_fraction = fit_fraction
        self.split_seed = split_seed
        self.shrinkage = shrinkage
        self.iterations = iterations
        self.tolerance = tolerance
        self.folds = folds
        self.l2 = l2
        self.max_over_baseline = max_over_baseline

    @torch.no_grad()
    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "LEACE erasure")
        labelled = load_labelled(self.data, "data")
        n_layers = num_layers(model, ctx.arch)
        if not -n_layers <= self.layer < n_layers:
            raise ConfigError("layer", f"{self.layer} does not exist (model has {n_layers} blocks)")
        layer = self.layer % n_layers
        fit_idx, held_idx = stratified_split(labelled.labels, self.fit_fraction, self.split_seed)
        fit_texts = [labelled.texts[i] for i in fit_idx.tolist()]
        held_texts = [labelled.texts[i] for i in held_idx.tolist()]
        y_fit, y_held = labelled.labels[fit_idx], labelled.labels[held_idx]
        n_classes = len(labelled.classes)

        def states(texts: list[str]) -> torch.Tensor:
            return sentence_states(model, ctx.arch, ctx.tokenizer, texts, [layer])[layer]

        held_before = states(held_texts)
        acc_before, baseline = probe_accuracy(held_before, y_held, self.folds, self.l2, ctx.seed)
        gap_before = class_mean_gap(held_before, y_held)

        arch = ctx.arch
        untied = untie_head(model, model.get_submodule(arch.embed), model.get_submodule(arch.head))
        total = torch.eye(held_before.shape[1], dtype=torch.float64)
        first_norm = None
        rounds = 0
        for _ in ctx.track(range(self.iterations), "LEACE fit + fold"):
            x = states(fit_texts)
            xc = x - x.mean(0)
            zc = nn.functional.one_hot(y_fit, n_classes).double()
            zc = zc - zc.mean(0)
            cross = float(torch.linalg.matrix_norm(xc.T @ zc / len(x)))
            first_norm = first_norm if first_norm is not None else cross
            residual = cross / first_norm if first_norm > 0 else 0.0
            if rounds and residual < self.tolerance:
                break
            proj, _ = leace(x, y_fit, n_classes, self.shrinkage)
            eraser = torch.eye(x.shape[1], dtype=torch.float64) - proj
            fold_into_writers(model, arch, layer, eraser)
            total = eraser @ total
            rounds += 1
        fit_after = states(fit_texts)
        xc = fit_after - fit_after.mean(0)
        zc = nn.functional.one_hot(y_fit, n_classes).double()
        cross_after = float(torch.linalg.matrix_norm(xc.T @ (zc - zc.mean(0)) / len(xc)))
        held_after = states(held_texts)
        acc_after, baseline_after = probe_accuracy(
            held_after, y_held, self.folds, self.l2, ctx.seed
        )
        metrics = {
            "layer": float(layer),
            "fit_examples": float(len(fit_idx)),
            "heldout_examples": float(len(held_idx)),
            "rounds": float(rounds),
            "erased_rank": float(
                round(float(torch.linalg.matrix_rank(torch.eye(len(total)) - total.float())))
            ),
            "probe_before": acc_before,
            "probe_after": acc_after,
            "majority_baseline": baseline_after,
            "over_baseline_before": acc_before - baseline,
            "over_baseline_after": acc_after - baseline_after,
            "class_mean_gap_fit_after": class_mean_gap(fit_after, y_fit),
            "class_mean_gap_heldout_before": gap_before,
            "class_mean_gap_heldout_after": class_mean_gap(held_after, y_held),
            "head_untied": float(untied),
            # cross-covariance with the label left on the fitted half, / before the edit
            "cross_cov_residual": cross_after / first_norm if first_norm else 0.0,
        }
        if (
            self.max_over_baseline is not None
            and metrics["over_baseline_after"] > self.max_over_baseline
        ):
            raise SculptError(
                f"editor.max_over_baseline: after erasure the held-out probe on layer {layer} "
                f"scores {acc_after:.4f}, {acc_after - baseline_after:+.4f} over the majority "
                f"baseline {baseline_after:.4f} (limit {self.max_over_baseline})"
            )
        rows = [
            {
                "when": "before",
                "probe_accuracy": round(acc_before, 4),
                "majority_baseline": round(baseline, 4),
                "class_mean_gap": round(gap_before, 4),
            },
            {
                "when": "after",
                "probe_accuracy": round(acc_after, 4),
                "majority_baseline": round(baseline_after, 4),
                "class_mean_gap": round(metrics["class_mean_gap_heldout_after"], 4),
            },
        ]
        out_dir = ctx.stage_dir(ctx.stage_name or "leace")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "eraser.safetensors"
        save_file(
            {"eraser": total.float().contiguous()},
            str(path),
            metadata={"layer": str(layer), "rounds": str(rounds), "data": str(self.data)},
        )
        return StageResult(metrics=metrics, tables={"erasure": rows}, artifacts={"eraser": path})
