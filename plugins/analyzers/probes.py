"""Linear probes (Alain & Bengio, 2016, "Understanding intermediate layers using linear
classifier probes"): how linearly decodable a concept is from each layer's residual stream.

Labelled sentences come from a JSON-lines file (framework.concepts); each sentence is its
mean residual state after each block; a logistic-regression probe is scored by k-fold
cross-validation, so every accuracy is held-out, next to the majority-class baseline.

When the file gives every sentence a group (the noun it is about), two more columns say how
much of that accuracy is the concept: the probe scored on groups it never saw, and the
probe on a control task that labels each group at random (Hewitt & Liang, 2019,
"Designing and interpreting probes with control tasks"). Selectivity is the plain probe's
accuracy less the control's: a probe that memorises groups scores well on both.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from annotated_types import Ge, Interval
from torch import nn

from framework.concepts import (
    control_labels,
    groups_to_split_by,
    load_labelled,
    probe_accuracy,
    sentence_states,
    stratified_split,
)
from framework.errors import ConfigError
from framework.interventions import check_supported, num_layers
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult


class Probes(Analyzer):
    """Per-layer held-out linear probe accuracy for a labelled concept.

    Args:
        data: JSON-lines file of {"text", "label"} (relative paths: to the repository too).
        layers: block indices probed; null: all.
        folds: cross-validation folds.
        l2: L2 penalty of the logistic regression (standardised features).
        skip_fraction: leave out this stratified fraction of every class (with split_seed,
            the part an eraser such as editors/leace fitted on) and probe the rest.
        split_seed: seed of that split.
        split_by: ``examples`` or ``groups`` (whole groups left out; as editors/leace).
    """

    def __init__(
        self,
        data: str = "experiments/data/concept_animals_tools.jsonl",
        layers: list[int] | None = None,
        folds: Annotated[int, Ge(2)] = 5,
        l2: Annotated[float, Ge(0)] = 1e-2,
        skip_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.0,
        split_seed: int = 0,
        split_by: Literal["examples", "groups"] = "examples",
    ):
        self.split_by = split_by
        self.data = data
        self.layers = layers
        self.folds = folds
        self.l2 = l2
        self.skip_fraction = skip_fraction
        self.split_seed = split_seed

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "probes")
        labelled = load_labelled(self.data, "data")
        n_layers = num_layers(model, ctx.arch)
        layers = list(range(n_layers)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not -n_layers <= i < n_layers]
        if bad:
            raise ConfigError("layers", f"{bad} do not exist (model has {n_layers} blocks)")
        layers = sorted({i % n_layers for i in layers})
        idx = torch.arange(len(labelled.texts))
        if self.skip_fraction > 0:
            by_group = groups_to_split_by(labelled, self.split_by, self.data)
            _, idx = stratified_split(
                labelled.labels, self.skip_fraction, self.split_seed, by_group
            )
        texts = [labelled.texts[i] for i in idx.tolist()]
        y = labelled.labels[idx]
        groups = None if labelled.groups is None else labelled.groups[idx]
        control = None if groups is None else control_labels(y, groups, ctx.seed)
        states = sentence_states(model, ctx.arch, ctx.tokenizer, texts, layers)
        rows = []
        for layer in ctx.track(layers, "probes"):
            x = states[layer]
            acc, base = probe_accuracy(x, y, self.folds, self.l2, seed=ctx.seed)
            row = {
                "layer": layer,
                "probe_accuracy": round(acc, 4),
                "majority_baseline": round(base, 4),
                "over_baseline": round(acc - base, 4),
            }
            if control is not None:
                unseen, _ = probe_accuracy(x, y, self.folds, self.l2, ctx.seed, groups)
                ctrl, _ = probe_accuracy(x, control, self.folds, self.l2, ctx.seed)
                row |= {
                    "unseen_groups": round(unseen, 4),
                    "control": round(ctrl, 4),
                    "selectivity": round(acc - ctrl, 4),
                }
            rows.append(row)
        best = max(rows, key=lambda r: r["probe_accuracy"])
        metrics = {
            "examples": float(len(y)),
            "classes": float(len(labelled.classes)),
            "majority_baseline": float(rows[0]["majority_baseline"]),
            "best_accuracy": float(best["probe_accuracy"]),
            "best_layer": float(best["layer"]),
            "max_over_baseline": max(float(r["over_baseline"]) for r in rows),
            "mean_accuracy": sum(float(r["probe_accuracy"]) for r in rows) / len(rows),
        }
        if groups is not None:
            metrics["groups"] = float(len(groups.unique()))
            metrics["min_selectivity"] = min(float(r["selectivity"]) for r in rows)
        return StageResult(
            metrics=metrics, tables={"probes": rows}, plots={"probes": self._plot(ctx, rows)}
        )

    def _plot(self, ctx: Context, rows: list[dict]):
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.4))
        x = [r["layer"] for r in rows]
        ax.plot(x, [r["probe_accuracy"] for r in rows], marker=".", label="probe (held-out)")
        if "control" in rows[0]:
            ax.plot(x, [r["unseen_groups"] for r in rows], marker=".", label="probe, unseen groups")
            ax.plot(x, [r["control"] for r in rows], marker=".", label="control task")
        ax.plot(x, [r["majority_baseline"] for r in rows], ls="--", label="majority baseline")
        ax.set(xlabel="layer", ylabel="accuracy", ylim=(0, 1.02))
        ax.set_title(f"linear probes: {self.data.rsplit('/', 1)[-1]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        name = ctx.stage_name or "probes"
        return save_figure(fig, ctx.output_dir / "plots" / f"{name}.png")
