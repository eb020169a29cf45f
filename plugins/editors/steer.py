"""Edit one direction of the residual stream after block ``layer``, in the weights.

Where the direction comes from (``source``):

* ``dictionary``: feature ``feature`` of a sparse dictionary file (framework/dictionary.py,
  written by the sae analyzer): its decoder column;
* ``concept``: the difference of class means of a labelled JSON-lines file
  (framework.concepts: each sentence's residual stream after the block, averaged over its
  tokens after the first), ``positive``'s mean minus the other classes';
* ``vector``: a safetensors file holding one vector (key ``key``, or its only tensor).

It is normalised to a unit vector u. What is done with it (``mode``):

* ``ablate``: every reader of the stream after the block (q/k/v and gate/up of later blocks,
  the LM head) reads (I - u u^T) h: the rank-one projection is folded into the readers
  (framework.transforms.readers, as LEACE does), a tied head untied first. Readers are then
  blind to u in the stream, including what later blocks write along it. The readers still
  normalise by rms(h), not rms((I - u u^T) h): ``fold_approx_kl`` measures that against
  the projection applied exactly by hooks. For an SAE feature this is a linear
  approximation of removing f_i(x) d_i: it removes the whole component of h along d_i,
  which other features with overlapping directions also contribute to, and it leaves the
  encoder's f_i(Eh) free to be nonzero (reported as ``feature_after``).
* ``add``: alpha * u is added to the stream after the block for every token, permanently:
  as the bias of that block's MLP output projection (``config.mlp_bias`` = true, every
  other MLP projection given a zero bias so the saved folder's state dict is complete;
  save_pretrained + from_pretrained reloads it, tests/plugins/test_steer.py checks the
  logits match).

Reported: the direction's projection u^T h (and, for a dictionary, the feature's activation)
on calibration tokens before and after; for ``ablate`` how much of u every reader still
responds to (||W' u|| / ||W diag(g) u||, ~1e-8 after); for ``add`` the tokens the
direction promotes by the logit lens (final norm's gain and LM head applied to u) and the
probability the model puts on them before and after. The runner measures KL and
perplexity against the unedited model after the stage.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import torch
from annotated_types import Ge
from torch import nn

from framework.concepts import load_labelled, resolve_path, sentence_states
from framework.dictionary import Dictionary, collect_activations, encode, load_dictionary
from framework.errors import ConfigError, SculptError
from framework.eval.metrics import logits_kl
from framework.interventions import check_supported, num_layers, patch
from framework.models.arch import blocks
from framework.plugins import Context, Editor, StageResult
from framework.transforms.norms import untie_head
from framework.transforms.readers import fold_into_readers, reader_groups

log = logging.getLogger("sculpt")

Mode = Literal["ablate", "add"]
Source = Literal["dictionary", "concept", "vector"]


def enable_mlp_bias(model: nn.Module, arch) -> int:
    """Give every MLP projection a (zero) bias and set config.mlp_bias, so the model saves
    and reloads with them; returns how many biases were created."""
    made = 0
    for block in blocks(model, arch):
        for name in (*arch.mlp_in, arch.mlp_out):
            lin = block.get_submodule(name)
            if getattr(lin, "bias", None) is None:
                w = lin.weight
                lin.bias = nn.Parameter(
                    torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                    requires_grad=w.requires_grad,
                )
                made += 1
    model.config.mlp_bias = True
    return made


class Steer(Editor):
    """Ablate or add one direction of the residual stream after block ``layer``.

    Args:
        mode: ``ablate`` (project it out of what every later reader sees) or ``add`` (add
            ``alpha`` x the unit direction to the stream after the block).
        source: ``dictionary``, ``concept`` or ``vector`` (module docstring).
        path: the dictionary file, labelled JSON-lines file or vector file (relative paths:
            to the repository too).
        feature: the dictionary feature (source=dictionary).
        positive: the class whose mean the direction points to (source=concept; null: the
            last class in sorted order).
        key: the tensor's name in a vector file (null: its only tensor).
        layer: block after which the stream is edited (null: the dictionary's layer, else
            the middle block; negative: from the end).
        alpha: size of the addition (mode=add), in the stream's units; u has norm 1.
        windows: calibration windows the before / after numbers are measured on.
    """

    needs_calibration = True

    def __init__(
        self,
        mode: Mode = "ablate",
        source: Source = "concept",
        path: str = "experiments/data/concept_animals_tools.jsonl",
        feature: int | None = None,
        positive: str | None = None,
        key: str | None = None,
        layer: int | None = None,
        alpha: float = 8.0,
        windows: Annotated[int, Ge(1)] = 4,
    ):
        if not str(path).strip():
            raise ConfigError("path", "must name a file")
        if source == "dictionary" and (feature is None or feature < 0):
            raise ConfigError(
                "feature", f"source=dictionary needs a feature id >= 0, got {feature}"
            )
        if not (alpha == alpha and abs(alpha) != float("inf")):
            raise ConfigError("alpha", f"must be finite, got {alpha}")
        self.mode, self.source, self.path = mode, source, str(path)
        self.feature, self.positive, self.key = feature, positive, key
        self.layer, self.alpha, self.windows = layer, alpha, windows

    def _direction(
        self, model: nn.Module, ctx: Context, n_layers: int
    ) -> tuple[torch.Tensor, int, Dictionary | None, str]:
        """(unit direction float64 [d], layer, dictionary or None, description)."""
        default = n_layers // 2
        if self.source == "dictionary":
            assert self.feature is not None
            d = load_dictionary(resolve_path(self.path, "path"))
            if self.feature >= d.features:
                raise ConfigError("feature", f"{self.feature} >= the dictionary's {d.features}")
            layer = d.layer if self.layer is None else self.layer
            layer = self._check_layer(layer, n_layers)
            if layer != d.layer:
                log.warning("editor.layer=%d but the dictionary was trained on %d", layer, d.layer)
            u = d.direction(self.feature).double()
            return u, layer, d, f"feature {self.feature} of {self.path}"
        layer = self._check_layer(default if self.layer is None else self.layer, n_layers)
        if self.source == "vector":
            from safetensors.torch import load_file

            tensors = load_file(str(resolve_path(self.path, "path")))
            if self.key is None and len(tensors) != 1:
                raise ConfigError("key", f"{self.path} holds {sorted(tensors)}; name one")
            name = self.key if self.key is not None else next(iter(tensors))
            if name not in tensors:
                raise ConfigError("key", f"'{name}' is not in {self.path} ({sorted(tensors)})")
            u = tensors[name].double().flatten()
            return u, layer, None, f"'{name}' of {self.path}"
        labelled = load_labelled(self.path, "path")
        positive = self.positive if self.positive is not None else labelled.classes[-1]
        if positive not in labelled.classes:
            raise ConfigError("positive", f"'{positive}' is not a label ({labelled.classes})")
        states = sentence_states(model, ctx.arch, ctx.tokenizer, labelled.texts, [layer])[layer]
        pos = labelled.labels == labelled.classes.index(positive)
        u = states[pos].mean(0) - states[~pos].mean(0)
        return u, layer, None, f"mean('{positive}') - mean(rest) of {self.path}"

    @staticmethod
    def _check_layer(layer: int, n_layers: int) -> int:
        if not -n_layers <= layer < n_layers:
            raise ConfigError("layer", f"{layer} does not exist (model has {n_layers} blocks)")
        return layer % n_layers

    @torch.no_grad()
    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "steering")
        arch = ctx.arch
        n_layers = num_layers(model, arch)
        u, layer, dictionary, described = self._direction(model, ctx, n_layers)
        width = model.get_submodule(arch.embed).weight.shape[1]
        if u.numel() != width:
            raise ConfigError("path", f"the direction has {u.numel()} entries, the stream {width}")
        norm = float(u.norm())
        if not norm > 0:
            raise SculptError(f"editor.path: the direction from {described} is zero")
        u = u / norm
        was_training = model.training
        model.eval()
        windows = ctx.calibration(self.windows)

        def stream() -> torch.Tensor:
            return collect_activations(model, arch, windows, layer, "residual").double()

        h = stream()
        proj_before = h @ u
        metrics: dict[str, float] = {
            "layer": float(layer),
            "direction_norm": norm,
            "stream_rms_norm": float(h.pow(2).sum(1).mean().sqrt()),
            "projection_mean_before": float(proj_before.mean()),
            "projection_abs_before": float(proj_before.abs().mean()),
        }
        feature_before = None
        if dictionary is not None:
            feature_before = encode(dictionary, h.float())[:, self.feature]
            metrics["feature_mean_before"] = float(feature_before.mean())
            metrics["feature_active_before"] = float((feature_before > 0).float().mean())

        ids = windows[:1]
        logits_before = model(input_ids=ids, use_cache=False).logits.float()
        rows: list[dict[str, object]] = []
        if self.mode == "ablate":
            eraser = torch.eye(width, dtype=torch.float64) - torch.outer(u, u)
            # What the fold approximates: the projection applied exactly to the stream after
            # every block from `layer` on (the readers then normalise Eh by its own rms).
            e32 = eraser.float()
            exact_patches = {
                ("residual", j): (lambda out: out @ e32.T) for j in range(layer, n_layers)
            }
            with patch(model, arch, exact_patches):
                exact = model(input_ids=ids, use_cache=False).logits.float()
            response_before = self._reader_response(model, arch, layer, u)
            untied = untie_head(model, arch)
            fold_into_readers(model, arch, layer, eraser)
            response_after = self._reader_response(model, arch, layer, u)
            folded = model(input_ids=ids, use_cache=False).logits.float()
            seen = h @ eraser  # what every later reader reads of the stream after the block
            proj_after = seen @ u
            metrics.update(
                {
                    "reader_response_before": response_before,
                    "reader_response_after": response_after,
                    "projection_abs_after_at_readers": float(proj_after.abs().mean()),
                    "projection_mean_after_at_readers": float(proj_after.mean()),
                    "head_untied": float(untied),
                    "fold_approx_kl": float(logits_kl(exact, folded)),
                    "window_kl": float(logits_kl(logits_before, folded)),
                }
            )
            if dictionary is not None:
                f_after = encode(dictionary, seen.float())[:, self.feature]
                metrics["feature_mean_after_at_readers"] = float(f_after.mean())
                metrics["feature_active_after_at_readers"] = float((f_after > 0).float().mean())
            rows.append(
                {
                    "when": "before",
                    "projection_abs": round(metrics["projection_abs_before"], 5),
                    "reader_response": round(response_before, 6),
                }
            )
            rows.append(
                {
                    "when": "after (at the readers)",
                    "projection_abs": round(metrics["projection_abs_after_at_readers"], 8),
                    "reader_response": float(f"{response_after:.3g}"),
                }
            )
        else:
            promoted, lens = self._logit_lens(model, arch, u)
            p_before = logits_before.softmax(-1)[..., promoted].sum(-1).mean()
            created = enable_mlp_bias(model, arch)
            down = blocks(model, arch)[layer].get_submodule(arch.mlp_out)
            down.bias += (self.alpha * u).to(down.bias.dtype)
            proj_after = stream() @ u
            logits_after = model(input_ids=ids, use_cache=False).logits.float()
            p_after = logits_after.softmax(-1)[..., promoted].sum(-1).mean()
            metrics.update(
                {
                    "alpha": self.alpha,
                    "projection_mean_after": float(proj_after.mean()),
                    "projection_shift": float((proj_after - proj_before).mean()),
                    "biases_created": float(created),
                    "promoted_prob_before": float(p_before),
                    "promoted_prob_after": float(p_after),
                    "window_kl": float(logits_kl(logits_before, logits_after)),
                }
            )
            if dictionary is not None:
                f_after = encode(dictionary, stream().float())[:, self.feature]
                metrics["feature_mean_after"] = float(f_after.mean())
                metrics["feature_active_after"] = float((f_after > 0).float().mean())
            for rank, (tok, score) in enumerate(zip(promoted.tolist(), lens, strict=True)):
                rows.append(
                    {
                        "rank": rank + 1,
                        "token": ctx.tokenizer.decode([tok]) if ctx.tokenizer else str(tok),
                        "token_id": tok,
                        "lens_logit": round(float(score), 4),
                    }
                )
        model.train(was_training)
        table = "ablation" if self.mode == "ablate" else "promoted_tokens"
        log.info("steer %s at block %d along %s", self.mode, layer, described)
        return StageResult(metrics=metrics, tables={table: rows})

    @staticmethod
    def _reader_response(model: nn.Module, arch, layer: int, u: torch.Tensor) -> float:
        """The largest ||W diag(g) u|| / ||W diag(g)||_2-row-mean over the readers of the
        stream after ``layer``: how strongly any reader responds to the direction."""
        worst = 0.0
        for norm, readers in reader_groups(model, arch, layer):
            gu = norm.weight.double() * u
            for lin in readers:
                w = lin.weight.double()
                worst = max(worst, float((w @ gu).norm() / w.norm(dim=1).mean()))
        return worst

    @staticmethod
    def _logit_lens(model: nn.Module, arch, u: torch.Tensor, top: int = 10):
        """The tokens u promotes: LM head applied to g * u (the final norm's gain; the
        normaliser is a positive scalar and does not change the ranking)."""
        g = model.get_submodule(arch.final_norm).weight.double()
        head = model.get_submodule(arch.head).weight.double()
        scores = head @ (g * u)
        values, index = scores.topk(top)
        return index, values.tolist()
