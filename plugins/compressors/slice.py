"""SliceGPT-style slicing (Ashkboos et al., 2024, arXiv:2401.15024): fold the norm scales,
rotate the residual stream into the principal axes of its calibration activations, and
delete the `sparsity` fraction of directions that carry the least of them. The result is
a smaller model of the same class (hidden_size shrinks, attention heads and MLP width do
not) that saves and reloads with plain `from_pretrained`.

What this implementation chose (framework/transforms/slicing.py has the details):

* basis=global: one PCA basis for the whole residual stream. Every shortcut stays an
  identity, so the sliced model is a plain LlamaForCausalLM. The basis diagonalises the
  sum over every norm input (2 per block + the final one) of the second moment of the
  RMS-normalised residual, so each layer and each token weigh the same whatever the
  stream's growing scale.
* basis=per_layer: SliceGPT's own scheme, one basis per norm input, each the PCA of the
  stream as the model sliced so far produces it (sequential, block by block). Each
  residual shortcut then carries a [k, k] change of basis, so the result is a
  framework.models.sliced_llama.SlicedLlamaForCausalLM (model_type sculpt_sliced_llama;
  reloads with AutoModelForCausalLM.from_pretrained once sculpt's framework.models is
  imported). The 2 k^2 shortcut weights per block are counted: in the parameters, in
  block_weights_kept and in the rate (shortcut_weights reports them alone).
* rotation_steps > 0 (basis=global): the PCA basis is only the start; a rotation of it is
  learned on KL(original || sliced) over the calibration windows, the weights frozen
  (framework.transforms.learned_slicing, SpinQuant's recipe aimed at the kept subspace).
  Still one basis, so still a plain model of the original class; no longer free of
  training (the kept subspace, k (d - k) degrees of freedom, is fitted on the calibration
  text), and reported as such.
* The PCA weighs every token's residual after dividing it by its RMS (weighting=token);
  the alternative, raw second moments (weighting=layer; with basis=global each norm input
  scaled to unit trace, with per_layer SliceGPT's own choice), was worse for the global
  basis on SmolLM2 (perplexity x8.4 against x6.8 at 25% on a 2-window KJV check).
* Each RMSNorm's scale after slicing is the calibration estimate of the factor the
  narrower norm is off by, sqrt(d / k * kept energy fraction at that norm).
* The LM head is untied from the embedding when the final norm's scale is folded into it
  (SmolLM2), and always with per_layer (the two ends have different bases): the saved
  model holds two vocab x k matrices. Parameter counts are reported with and without
  embeddings so the saving is not overstated.

Rate: every tensor the slicing changed (all of them) is written at full precision
(framework.codecs.raw); the 210 block linears (and per_layer's shortcuts) count in
bits/weight (32: nothing is quantized, the saving is in how many weights remain),
embedding, head and norms are outside the rate, as for every other method.
`block_weights_kept` is the fraction of the block linears' weights that remain
(shortcuts included).

SliceGPT's own figure: OPT-125M, WikiText-2 perplexity 27.64 -> 37.74 at 25% slicing.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt, Interval
from torch import nn

from framework.calibration import BatchSize, CalibrationWindows
from framework.codecs import write_container
from framework.codecs.raw import encode_raw
from framework.errors import ConfigError, SculptError
from framework.models import ArchMap, block_linears
from framework.models.sliced_llama import Shortcut
from framework.plugins import Compressor, Context, StageResult
from framework.transforms.learned_slicing import learn_slicing_rotation
from framework.transforms.slicing import (
    kept_fraction,
    norm_gain,
    norm_paths,
    pca_basis,
    slice_per_layer,
    slice_residual,
    token_moment,
)

log = logging.getLogger("sculpt")


class _Stop(Exception):
    """Ends a calibration forward at the final norm: the LM head's output is not needed."""


@torch.no_grad()
def residual_second_moments(
    model: nn.Module,
    paths: list[str],
    windows: torch.Tensor,
    batch_size: int,
    normalize_tokens: bool = True,
) -> dict[str, torch.Tensor]:
    """Per norm path: mean over tokens of u u^T ([d, d], float64), u = the norm's input
    divided by its RMS (normalize_tokens) or as it is. The last path ends each pass."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    handles = []

    def hook(path: str):
        def run(_module: nn.Module, args: tuple[Any, ...]) -> None:
            gram, _ = token_moment(args[0], normalize_tokens)
            sums[path] = sums[path] + gram if path in sums else gram
            if path == paths[-1]:
                raise _Stop

        return run

    device = next(model.parameters()).device
    try:
        for path in paths:
            handles.append(model.get_submodule(path).register_forward_pre_hook(hook(path)))
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start : start + batch_size].to(device)
            try:
                model(input_ids=chunk, use_cache=False)
            except _Stop:
                pass
            else:
                raise SculptError("slice: the model's forward never reached its final norm")
            tokens += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    return {p: s / tokens for p, s in sums.items()}


def _params(model: nn.Module, exclude: tuple[str, ...] = ()) -> int:
    skip = {id(model.get_submodule(e).weight) for e in exclude}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _shortcut_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, Shortcut))


class Slice(Compressor):
    """Delete the least-used directions of the (rotated) residual stream.

    Args:
        sparsity: fraction of the residual width to delete, in [0, 1).
        calibration_windows: calibration windows for the PCA (null: all of the run's).
        batch_size: windows per forward chunk.
        round_to: keep a multiple of this many dimensions (rounded down, at least one).
        norm_correction: set each norm's scale from the calibration (see the module
            docstring); false: the plain sqrt(d / k) width correction.
        weighting: how tokens and norms weigh in the PCA. layer: each norm input's raw
            second moment scaled to unit mean eigenvalue (tokens weigh by their size, so
            an attention sink's huge residual is kept); token: every token's residual
            divided by its RMS first (each token weighs the same).
        basis: global: one basis for the whole stream (a plain model of the same class);
            per_layer: SliceGPT's basis per norm input, calibrated sequentially on the
            sliced model's own activations, with a [k, k] matrix on every shortcut.
        global_mix: per_layer only, in [0, 1]: weight of the global basis's second moment
            (the original model's, as basis=global computes it) in each point's PCA; 0:
            SliceGPT's own per-layer bases; 1: every basis the global one, but the norm
            gains calibrated sequentially. Costs one more forward pass when > 0.
        refit: per_layer only: after slicing each linear, refit it by least squares so that
            on the sliced model's own inputs it reproduces the original layer's output on
            the original model's inputs (a writer: in the new basis). Layer-wise
            reconstruction from the calibration windows, solved exactly; the original model
            runs beside the sliced one (about 3x the slicing's forward passes).
        refit_damp: the refit's ridge, as a fraction of the mean diagonal of X^T X.
        refit_target: layer: every linear matches the original layer's output; stream: the
            writers (o, down) match what the original stream holds after them, less what
            the sliced shortcut carries, so they also absorb the error accumulated so far.
        rotation_steps: basis=global only: Adam steps of a rotation of the PCA basis learned
            on KL(original || sliced) over the calibration windows, the weights frozen
            (framework.transforms.learned_slicing; about 3 forward passes per step). 0:
            the PCA basis as it is (SliceGPT, free of training).
        rotation_lr: the rotation's learning rate (Adam, on the skew generator).
        rotation_batch_size: calibration windows per rotation step.
    """

    needs_calibration = True

    def __init__(
        self,
        sparsity: Annotated[float, Interval(ge=0, lt=1)] = 0.25,
        calibration_windows: CalibrationWindows = 32,
        batch_size: BatchSize = 4,
        round_to: Annotated[int, Ge(1)] = 8,
        norm_correction: bool = True,
        weighting: Literal["token", "layer"] = "token",
        basis: Literal["global", "per_layer"] = "global",
        global_mix: Annotated[float, Interval(ge=0, le=1)] = 0.0,
        refit: bool = False,
        refit_damp: Annotated[float, Gt(0)] = 0.01,
        refit_target: Literal["layer", "stream"] = "layer",
        rotation_steps: Annotated[int, Ge(0)] = 0,
        rotation_lr: Annotated[float, Gt(0)] = 1e-3,
        rotation_batch_size: BatchSize = 2,
    ):
        self.sparsity = float(sparsity)
        self.calibration_windows = calibration_windows
        self.batch_size = batch_size
        self.round_to = round_to
        self.norm_correction = norm_correction
        self.weighting = weighting
        self.basis = basis
        if global_mix > 0 and basis != "per_layer":
            raise ConfigError("global_mix", "only basis=per_layer mixes in the global basis")
        self.global_mix = float(global_mix)
        if not isinstance(refit, bool):
            raise ConfigError("refit", f"must be true or false, got {refit!r}")
        if refit and basis != "per_layer":
            raise ConfigError("refit", "the least-squares refit runs with basis=per_layer")
        self.refit = refit
        self.refit_target = refit_target
        self.refit_damp = float(refit_damp)
        if rotation_steps and basis != "global":
            raise ConfigError("rotation_steps", "the learned rotation turns basis=global's basis")
        self.rotation_steps = rotation_steps
        self.rotation_lr = float(rotation_lr)
        self.rotation_batch_size = rotation_batch_size

    def kept_width(self, d: int) -> int:
        keep = d - math.floor(d * self.sparsity + 1e-9)
        return max(self.round_to, keep // self.round_to * self.round_to)

    @torch.no_grad()
    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        arch = ctx.arch
        if arch.head is None or arch.final_norm is None:
            raise SculptError(f"slice: the '{arch.family}' map has no LM head / final norm")
        embed_names = (arch.embed, arch.head)
        d = model.get_submodule(arch.embed).weight.shape[1]
        keep = self.kept_width(d)
        block_before = sum(w.weight.numel() for w in block_linears(model, arch).values())
        params_before = _params(model)
        params_before_no_embed = _params(model, embed_names)

        windows = ctx.calibration(self.calibration_windows)
        refit_errors: dict[str, tuple[float, float]] = {}
        rotation: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        try:
            if self.basis == "global":
                fractions, spectrum_kept = self._slice_global(
                    model, arch, windows, keep, ctx, rotation
                )
            else:
                anchor = (
                    sum(self._moments(model, arch, windows).values())
                    if self.global_mix > 0
                    else None
                )
                model, fractions = slice_per_layer(
                    model,
                    arch,
                    windows,
                    keep,
                    self.batch_size,
                    self.weighting == "token",
                    self.norm_correction,
                    anchor,
                    self.global_mix,
                    self.refit_damp if self.refit else None,
                    refit_errors,
                    self.refit_target,
                    lambda blocks: ctx.track(blocks, description="slice blocks"),
                )
                spectrum_kept = sum(fractions.values()) / len(fractions)
        finally:
            model.train(was_training)

        linears = {f"{n}.weight" for n in block_linears(model, arch)}
        linears |= {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Shortcut)}
        encoded = {
            name: encode_raw(t, in_rate=name in linears)
            for name, t in model.state_dict().items()
            if t.is_floating_point()
        }
        path = write_container(
            ctx.stage_dir("compressed"),
            encoded,
            meta={
                "method": "slice",
                "basis": self.basis,
                "hidden_before": d,
                "hidden_after": keep,
            },
        )
        shortcuts = _shortcut_weights(model)
        block_after = shortcuts + sum(w.weight.numel() for w in block_linears(model, arch).values())
        frac = list(fractions.values())
        extra_metrics: dict[str, float] = {}
        tables = {"energy_kept": [{"norm": p, "kept": f} for p, f in fractions.items()]}
        if rotation:
            tables["rotation"] = [
                {"step": i + 1, "kl": loss} for i, loss in enumerate(rotation["losses"])
            ]
            extra_metrics["rotation_kl_before"] = rotation["kl_before"]
            extra_metrics["rotation_kl_after"] = rotation["kl_after"]
            log.info(
                "slice rotation: %d steps, calibration KL %.4f -> %.4f",
                self.rotation_steps,
                rotation["kl_before"],
                rotation["kl_after"],
            )
        if refit_errors:
            tables["refit"] = [
                {"linear": n, "error_before": b, "error_after": a}
                for n, (b, a) in refit_errors.items()
            ]
            before = [b for b, _ in refit_errors.values()]
            after = [a for _, a in refit_errors.values()]
            extra_metrics["refit_error_before_mean"] = sum(before) / len(before)
            extra_metrics["refit_error_after_mean"] = sum(after) / len(after)
            log.info(
                "slice refit: mean relative layer error %.4f -> %.4f over %d linears",
                extra_metrics["refit_error_before_mean"],
                extra_metrics["refit_error_after_mean"],
                len(before),
            )
        log.info(
            "slice (%s basis): residual %d -> %d, block weights kept %.1f%%, "
            "energy kept %.2f%% (min %.2f%%)",
            self.basis,
            d,
            keep,
            100 * block_after / block_before,
            100 * sum(frac) / len(frac),
            100 * min(frac),
        )
        return StageResult(
            metrics={
                "hidden_before": float(d),
                "hidden_after": float(keep),
                "sliced_fraction": 1.0 - keep / d,
                "block_weights_kept": block_after / block_before,
                "shortcut_weights": float(shortcuts),
                "params_before": float(params_before),
                "params_after": float(_params(model)),
                "params_no_embeddings_before": float(params_before_no_embed),
                "params_no_embeddings_after": float(_params(model, embed_names)),
                "energy_kept_mean": sum(frac) / len(frac),
                "energy_kept_min": min(frac),
                "pca_spectrum_kept": spectrum_kept,
                "calibration_windows": float(windows.shape[0]),
                **extra_metrics,
            },
            artifacts={"compressed": path},
            tables=tables,
            model=model,
        )

    def _slice_global(
        self,
        model: nn.Module,
        arch: ArchMap,
        windows: torch.Tensor,
        keep: int,
        ctx: Context,
        rotation: dict[str, Any],
    ) -> tuple[dict[str, float], float]:
        """One basis from the original model's activations at every norm (PCA, then the
        learned rotation if any, its log into `rotation`); returns the kept energy
        fraction per norm and the share of the summed spectrum kept."""
        d = model.get_submodule(arch.embed).weight.shape[1]
        moments = self._moments(model, arch, windows)
        total = sum(moments.values())
        _, basis = pca_basis(total)
        if self.rotation_steps:
            basis, log_ = learn_slicing_rotation(
                model,
                arch,
                basis,
                keep,
                moments,
                windows,
                self.rotation_steps,
                self.rotation_lr,
                self.rotation_batch_size,
                ctx.generator(),
                lambda steps: ctx.track(steps, description="slice rotation"),
                self.norm_correction,
            )
            rotation.update(log_)
        fractions = {p: kept_fraction(c, basis, keep) for p, c in moments.items()}
        gains = {
            p: norm_gain(d, keep, f if self.norm_correction else None) for p, f in fractions.items()
        }
        slice_residual(model, arch, basis, keep, gains)
        return fractions, kept_fraction(total, basis, keep)

    def _moments(
        self, model: nn.Module, arch: ArchMap, windows: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The original model's second moment at every norm input, as the PCA weighs it."""
        moments = residual_second_moments(
            model, norm_paths(model, arch), windows, self.batch_size, self.weighting == "token"
        )
        if self.weighting == "layer":
            moments = {
                p: c / torch.trace(c).clamp_min(1e-30) * c.shape[0] for p, c in moments.items()
            }
        return moments
