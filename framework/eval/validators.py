"""Limits that stop a run when a stage did not preserve what it should, or did not do what
it claimed: every limit names its config key and the measured value in one line.

Three kinds, all under the ``eval`` config node:

* whole-model limits against the reference (``max_ppl_increase``, ``max_kl``, ``min_top1``,
  ``min_cosine``), checked after every stage that changes weights;
* edit limits (``max_edit_kl``, ``max_edit_ppl_increase``, ``min_edit_top1``), checked after
  every editor against the model *just before the edit*: in a compress-then-edit pipeline
  the unedited model is the compressed one, not the reference, and an edit is judged by
  what it changed itself;
* ``limits``: any metric of any stage, its own (an edit's efficacy, a probe's accuracy) or
  its evaluation's: ``{stage: {metric: {min: x, max: y}}}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.errors import SculptError

_REFERENCE_LIMITS = (
    ("max_kl", "kl", "max"),
    ("min_top1", "top1_agreement", "min"),
    ("min_cosine", "cosine_to_reference", "min"),
)
_EDIT_LIMITS = (
    ("max_edit_kl", "kl_to_unedited", "max"),
    ("max_edit_ppl_increase", "ppl_change_vs_unedited", "max"),
    ("min_edit_top1", "top1_to_unedited", "min"),
)
EDIT_LIMIT_KEYS = tuple(key for key, _, _ in _EDIT_LIMITS)


def _violates(value: float, bound: float, side: str) -> bool:
    # NaN never passes a limit.
    return not (value <= bound if side == "max" else value >= bound)


def check_limits_config(eval_cfg: DictConfig | None, stage_names: Iterable[str]) -> None:
    """Refuse an ``eval.limits`` entry that names no stage of this run, or a bound that is
    not {min, max} with a number, before any model is loaded."""
    if eval_cfg is None or eval_cfg.get("limits") is None:
        return
    limits = OmegaConf.to_container(eval_cfg.limits, resolve=True)
    names = list(stage_names)
    if not isinstance(limits, dict):
        raise SculptError("eval.limits: expected a mapping {stage: {metric: {min|max: number}}}")
    for stage, metrics in limits.items():
        key = f"eval.limits.{stage}"
        if stage not in names:
            raise SculptError(
                f"{key}: this run has no stage named '{stage}' (stages: {', '.join(names)})"
            )
        if not isinstance(metrics, dict):
            raise SculptError(f"{key}: expected {{metric: {{min|max: number}}}}")
        for metric, bound in metrics.items():
            if not isinstance(bound, dict) or not bound or set(bound) - {"min", "max"}:
                raise SculptError(
                    f"{key}.{metric}: expected {{min: number}} and/or {{max: number}}"
                )
            for side, value in bound.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise SculptError(f"{key}.{metric}.{side}: {value!r} is not a number")


def edit_metrics(
    got: Mapping[str, float], unedited: Mapping[str, float], unedited_is_reference: bool
) -> dict[str, float]:
    """``got`` with what the edit changed, against the model before it: its perplexity
    relative to that model's evaluation (``unedited``), and KL / top-1 agreement to it,
    which the evaluation measured as ``kl`` / ``top1_agreement`` when that model was the
    reference, else as ``kl_to_previous`` / ``top1_to_previous`` (renamed here)."""
    out = {k: v for k, v in got.items() if k not in ("kl_to_previous", "top1_to_previous")}
    if "perplexity" in got and "perplexity" in unedited:
        out["ppl_change_vs_unedited"] = got["perplexity"] / unedited["perplexity"] - 1.0
    source = (
        ("kl", "top1_agreement")
        if unedited_is_reference
        else ("kl_to_previous", "top1_to_previous")
    )
    for name, metric in zip(("kl_to_unedited", "top1_to_unedited"), source, strict=True):
        if metric in got:
            out[name] = got[metric]
    return out


def check_stage(
    eval_cfg: DictConfig,
    stage: str,
    kind: str,
    reference: Mapping[str, float],
    own: Mapping[str, float],
    evaluation: Mapping[str, float],
) -> None:
    """Raise SculptError at the first limit the stage broke."""
    if evaluation:
        limit = eval_cfg.get("max_ppl_increase")
        if limit is not None and "perplexity" in evaluation:
            rise = evaluation["perplexity"] / reference["perplexity"] - 1.0
            if _violates(rise, float(limit), "max"):
                raise SculptError(
                    f"eval.max_ppl_increase: stage '{stage}' raised perplexity by {rise:+.1%} "
                    f"({reference['perplexity']:.3f} -> {evaluation['perplexity']:.3f}), "
                    f"limit {float(limit):+.1%}"
                )
        checks = list(_REFERENCE_LIMITS) + (list(_EDIT_LIMITS) if kind == "editor" else [])
        for key, metric, side in checks:
            threshold = eval_cfg.get(key)
            if threshold is None or metric not in evaluation:
                continue
            if _violates(evaluation[metric], float(threshold), side):
                raise SculptError(
                    f"eval.{key}: stage '{stage}' has {metric}={evaluation[metric]:.4g}, "
                    f"limit {side} {float(threshold):g}"
                )
    limits: Any = eval_cfg.get("limits")
    if not limits or stage not in limits:
        return
    measured = {**own, **evaluation}
    for metric, bound in OmegaConf.to_container(limits[stage], resolve=True).items():  # type: ignore[union-attr]
        key = f"eval.limits.{stage}.{metric}"
        if metric not in measured:
            known = ", ".join(sorted(measured)) or "none"
            raise SculptError(
                f"{key}: stage '{stage}' reported no metric '{metric}' (it has: {known})"
            )
        value = float(measured[metric])
        for side in ("min", "max"):
            if side in bound and _violates(value, float(bound[side]), side):
                shown = f"{value:.4g}" if math.isfinite(value) else str(value)
                raise SculptError(
                    f"{key}: stage '{stage}' has {metric}={shown}, limit {side} {float(bound[side]):g}"
                )
