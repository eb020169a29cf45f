"""LEACE concept erasure (Belrose et al., 2023, "LEACE: Perfect linear concept erasure in
closed form") fitted on one layer's residual stream and folded into the weights, so the
edit saves and reloads with the model as a plain Hugging Face checkpoint.

Where the eraser can live. No exact fold puts E = I - P (the bias-free linear part of
x -> x - P(x - mu); dropping the constant P mu keeps the guarantee, (I - P) Sigma_xz = 0)
on the stream after block L of a standard Llama checkpoint while leaving everything else
as it was: the skip path carries h_L onwards unchanged, every reader sees the stream
through an RMSNorm (x / rms(x), which does not commute with a projection), and Llama's
projections have no bias. Two placements, both measured:

* ``readers`` (default): every reader after block L (q/k/v and gate/up of later blocks,
  the LM head) reads E h: each RMSNorm gain g is folded into the linears it feeds,
  W <- W diag(g) E, and set to 1. Blocks 0..L are untouched, so the eraser is fitted once
  on exactly the states it acts on. The approximation is the normaliser, rms(h) instead of
  rms(E h); the editor measures it as ``fold_approx_kl``, the KL from a model with E
  applied exactly (hooks on the stream after every block from L on) to the folded one.
  The stream itself keeps h: a probe on the raw activations after L still finds the
  concept; the verification probe reads E h, what the network downstream reads.
* ``writers``: E on every write into the stream up to block L (embedding rows, o_proj and
  down_proj of blocks 0..L), so the stream after block L is exactly E h~_L. But blocks
  0..L then read an erased stream themselves and h~_L is not the h_L the eraser was fitted
  on; the editor refits and folds again (``iterations``). Measured on SmolLM2 it neither
  converges nor preserves the function (docs/analysis.md).

A tied LM head is untied first (it must keep reading the unerased embedding or its own E).

Verification, reported in the metrics and enforced by ``max_over_baseline``: a held-out
probe (k-fold logistic regression, on the examples the eraser never saw) on the edited
layer against the majority baseline, before and after. When the data names a group per
example (the noun a sentence is about), two more readings say what that probe found: the
probe scored on groups it never saw, and the same probe on a control task that labels each
group at random (its selectivity, Hewitt & Liang 2019): a plain k-fold probe over sentences
that share nouns can score well by memorising nouns, whatever the concept. With groups the
editor also reports ``class_signal_left`` (framework.concepts): the fraction of the class
signal shared across held-out groups that the edit leaves, which is what a probe on unseen
groups can find. ``split_by: groups`` holds out whole nouns, so the check asks whether the
erasure reaches nouns it was not fitted on. The runner measures KL to the unedited model on
the evaluation windows after the stage (``eval.max_kl``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Interval
from safetensors.torch import save_file
from torch import nn

from framework.concepts import (
    class_signal_left,
    control_labels,
    groups_to_split_by,
    leace,
    load_labelled,
    probe_accuracy,
    sentence_states,
    stratified_split,
    token_covariance,
    transfer_accuracy,
)
from framework.errors import ConfigError, SculptError
from framework.eval.metrics import logits_kl
from framework.interventions import check_supported, num_layers, patch
from framework.models import blocks
from framework.plugins import Context, Editor, StageResult
from framework.transforms.readers import fold_into_readers


def class_mean_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest distance of a class-conditional mean from the overall mean, relative to the
    states' RMS norm (0: the means coincide)."""
    x = x.double()
    mu = x.mean(0)
    scale = float((x - mu).pow(2).sum(1).mean().sqrt()) or 1.0
    return max(float((x[y == c].mean(0) - mu).norm()) for c in y.unique()) / scale


def _cross_norm(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> float:
    """Frobenius norm of the cross-covariance of x with the one-hot label."""
    xc = x - x.mean(0)
    z = nn.functional.one_hot(y, n_classes).double()
    return float(torch.linalg.matrix_norm(xc.T @ (z - z.mean(0)) / len(x)))


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
        placement: where the eraser is folded (module docstring): ``readers`` (every
            reader after the block reads the erased stream; blocks up to it unchanged) or
            ``writers`` (every write up to the block, refitted ``iterations`` times).
        whiten_on: ``text``: LEACE's whitening uses the second moment of token states on
            ``whiten_windows`` calibration windows, so the eraser moves generic text as
            little as possible (the least-squares eraser for that text); ``concept``: the
            covariance of the labelled sentences (the original LEACE).
        whiten_windows: calibration windows for ``whiten_on: text``.
        fit_fraction: stratified fraction of every class the eraser is fitted on; the rest
            is held out for verification.
        split_seed: seed of that split (probes' skip_fraction/split_seed pick the same).
        split_by: ``examples`` (a stratified share of the sentences) or ``groups`` (a share of
            every class's groups, whole: the held-out half then holds only nouns the eraser
            never saw, which tests whether the erasure generalises beyond them).
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
        placement: Literal["readers", "writers"] = "readers",
        whiten_on: Literal["text", "concept"] = "text",
        whiten_windows: Annotated[int, Ge(1)] = 8,
        fit_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.5,
        split_seed: int = 0,
        split_by: Literal["examples", "groups"] = "examples",
        shrinkage: Annotated[float, Ge(0)] = 0.0,
        iterations: Annotated[int, Ge(1)] = 4,
        tolerance: Annotated[float, Gt(0)] = 1e-3,
        folds: Annotated[int, Ge(2)] = 5,
        l2: float = 1e-2,
        max_over_baseline: Annotated[float, Ge(0)] | None = 0.02,
    ):
        self.data = data
        self.layer = layer
        self.placement = placement
        self.whiten_on = whiten_on
        self.whiten_windows = whiten_windows
        self.needs_calibration = whiten_on == "text"  # type: ignore[misc]
        self.fit_fraction = fit_fraction
        self.split_seed = split_seed
        self.split_by = split_by
        self.shrinkage = shrinkage
        self.iterations = iterations
        self.tolerance = tolerance
        self.folds = folds
        self.l2 = l2
        self.max_over_baseline = max_over_baseline

    @staticmethod
    @torch.no_grad()
    def _exact_logits(
        model: nn.Module, ctx: Context, layer: int, eraser: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Logits with E applied exactly to the stream after every block from ``layer`` on
        (hooks; the readers then normalise E h by its own RMS), on one evaluation window:
        what the folded weights approximate."""
        if ctx.evaluation_windows is None or not len(ctx.evaluation_windows):
            return None
        ids = ctx.evaluation_windows[:1]
        e = eraser.float()
        n = num_layers(model, ctx.arch)
        patches = {("residual", j): (lambda out: out @ e.T) for j in range(layer, n)}
        with patch(model, ctx.arch, patches):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        return ids, logits

    def _group_checks(
        self,
        states: dict[str, tuple[torch.Tensor, float]],
        y: torch.Tensor,
        groups: torch.Tensor,
        seed: int,
    ) -> dict[str, float]:
        """With the data's groups, for each of ``states`` (when -> (held-out states, plain
        probe accuracy)): the probe scored on groups it never saw, and the plain probe on a
        control task (a random label per group). A plain probe that scores no better on the
        concept than on the control is reading group identity, not the concept
        (selectivity <= 0)."""
        out: dict[str, float] = {}
        control = control_labels(y, groups, seed)
        for when, (x, plain) in states.items():
            unseen, _ = probe_accuracy(x, y, self.folds, self.l2, seed, groups)
            ctrl, _ = probe_accuracy(x, control, self.folds, self.l2, seed)
            out[f"probe_{when}_unseen_groups"] = unseen
            out[f"control_{when}"] = ctrl
            out[f"selectivity_{when}"] = plain - ctrl
        return out

    @torch.no_grad()
    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "LEACE erasure")
        labelled = load_labelled(self.data, "data")
        n_layers = num_layers(model, ctx.arch)
        if not -n_layers <= self.layer < n_layers:
            raise ConfigError("layer", f"{self.layer} does not exist (model has {n_layers} blocks)")
        layer = self.layer % n_layers
        fit_idx, held_idx = stratified_split(
            labelled.labels,
            self.fit_fraction,
            self.split_seed,
            groups_to_split_by(labelled, self.split_by, self.data),
        )
        fit_texts = [labelled.texts[i] for i in fit_idx.tolist()]
        held_texts = [labelled.texts[i] for i in held_idx.tolist()]
        y_fit, y_held = labelled.labels[fit_idx], labelled.labels[held_idx]
        g_held = None if labelled.groups is None else labelled.groups[held_idx]
        n_classes = len(labelled.classes)

        def states(texts: list[str]) -> torch.Tensor:
            return sentence_states(model, ctx.arch, ctx.tokenizer, texts, [layer])[layer]

        held_before = states(held_texts)
        acc_before, baseline = probe_accuracy(held_before, y_held, self.folds, self.l2, ctx.seed)
        gap_before = class_mean_gap(held_before, y_held)

        arch = ctx.arch
        untied = untie_head(model, model.get_submodule(arch.embed), model.get_submodule(arch.head))
        fit_before = states(fit_texts)
        first_norm = _cross_norm(fit_before, y_fit, n_classes)
        approx_kl = float("nan")
        sigma = None
        if self.placement == "readers":
            # Blocks up to the layer are untouched, so one exact fit suffices; the probe
            # reads what every later reader sees, E h.
            x = fit_before
            if self.whiten_on == "text":
                windows = ctx.calibration(self.whiten_windows)
                # Uncentred: the folded eraser is bias-free (E h, not E h + P mu), and
                # whitening with E[h h^T] makes it the least-squares bias-free eraser on
                # that text; with the centred covariance the stream's large mean leaks
                # into v^T h and every token moves (KL 0.47 at layer 4 on SmolLM2).
                sigma = token_covariance(model, arch, windows, layer, centered=False)
            proj, _ = leace(x, y_fit, n_classes, self.shrinkage, sigma)
            total = torch.eye(x.shape[1], dtype=torch.float64) - proj
            exact = self._exact_logits(model, ctx, layer, total)
            fold_into_readers(model, arch, layer, total)
            if exact is not None:
                with torch.no_grad():
                    folded = model(input_ids=exact[0], use_cache=False).logits.float()
                approx_kl = float(logits_kl(exact[1], folded))
            rounds = 1
            fit_after = x @ total.T
            held_after = held_before @ total.T
        else:
            total = torch.eye(held_before.shape[1], dtype=torch.float64)
            rounds = 0
            for _ in ctx.track(range(self.iterations), "LEACE fit + fold"):
                x = states(fit_texts)
                residual = _cross_norm(x, y_fit, n_classes) / first_norm if first_norm else 0.0
                if rounds and residual < self.tolerance:
                    break
                proj, _ = leace(x, y_fit, n_classes, self.shrinkage)
                eraser = torch.eye(x.shape[1], dtype=torch.float64) - proj
                fold_into_writers(model, arch, layer, eraser)
                total = eraser @ total
                rounds += 1
            fit_after = states(fit_texts)
            held_after = states(held_texts)
        cross_after = _cross_norm(fit_after, y_fit, n_classes)
        acc_after, baseline_after = probe_accuracy(
            held_after, y_held, self.folds, self.l2, ctx.seed
        )
        acc_fit, base_fit = probe_accuracy(fit_after, y_fit, self.folds, self.l2, ctx.seed)
        grouped = {}
        if g_held is not None:
            held = {"before": (held_before, acc_before), "after": (held_after, acc_after)}
            grouped = self._group_checks(held, y_held, g_held, ctx.seed)
            # the concept signal shared across held-out groups that the edit leaves, in the
            # metric the eraser was fitted in (readers with whiten_on=text) or the states' own
            left = class_signal_left(held_before, held_after, y_held, g_held, sigma, ctx.seed)
            if left is not None:
                grouped["class_signal_left"] = left
        # LEACE's own guarantee: a probe learned from the erased fitted half, scored on the
        # held-out half (before: the same probe on the unedited states).
        transfer_before, transfer_base = transfer_accuracy(
            fit_before, y_fit, held_before, y_held, self.l2
        )
        transfer_after, _ = transfer_accuracy(fit_after, y_fit, held_after, y_held, self.l2)
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
            # the same probe on the half the eraser was fitted on (k-fold: each example
            # still scored by a probe that never saw it)
            "probe_after_fit": acc_fit,
            # trained on the erased fitted half, scored on the held-out half
            "transfer_probe_before": transfer_before,
            "transfer_probe_after": transfer_after,
            "transfer_baseline": transfer_base,
            "transfer_over_baseline_after": transfer_after - transfer_base,
            "over_baseline_after_fit": acc_fit - base_fit,
            "class_mean_gap_fit_after": class_mean_gap(fit_after, y_fit),
            "class_mean_gap_heldout_before": gap_before,
            "class_mean_gap_heldout_after": class_mean_gap(held_after, y_held),
            "head_untied": float(untied),
            # readers: KL(exact E on the stream || folded weights), one evaluation window
            "fold_approx_kl": approx_kl if approx_kl == approx_kl else -1.0,
            # cross-covariance with the label left on the fitted half, / before the edit
            "cross_cov_residual": cross_after / first_norm if first_norm else 0.0,
            **grouped,
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
            metadata={
                "layer": str(layer),
                "placement": self.placement,
                "rounds": str(rounds),
                "data": str(self.data),
            },
        )
        return StageResult(metrics=metrics, tables={"erasure": rows}, artifacts={"eraser": path})
