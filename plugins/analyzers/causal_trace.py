"""Causal tracing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT",
ROME, Section 2.1 and Figure 1): where in the network does the prediction of a fact live?

Three runs of one prompt: the clean run; a corrupted run, in which Gaussian noise
(``noise_scale`` times the standard deviation of the embedding matrix's entries, seeded)
is added to the embeddings of the subject's tokens, or an explicitly given corrupted
prompt of the same token length is run; and corrupted-with-restoration runs, in which one
site (residual stream, attention output or MLP output) at one (layer, position) is set
back to its clean value. The probability of the target token at the last position in each
restored run, against the corrupted one, is that state's indirect effect.

As in ROME's Figure 1, attention and MLP outputs are restored over a window of ``window``
consecutive layers centred on the layer (a single MLP state rarely carries a fact alone);
the residual stream is restored at a single layer.

Cost: one batched forward pass per (site, layer), each row restoring one position (times
``noise_samples``), started at the first restored block from the corrupted run's cached
stream (the blocks before it are unchanged by the restoration); positions before the
first corrupted token are identical in both runs, so their effect is exactly zero and
they are not run.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Annotated

import torch
from annotated_types import Ge, Gt
from torch import nn

from framework.errors import ConfigError, SculptError
from framework.interventions import (
    add_at_positions,
    capture,
    check_supported,
    num_layers,
    patch,
    run_from,
    set_positions,
)
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult

TRACE_SITES = ("residual", "attn", "mlp")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def subject_positions(tokenizer, prompt: str, subject: str) -> list[int]:
    """Token positions overlapping the first occurrence of ``subject`` in ``prompt``.

    Character spans come from decoding growing prefixes of the prompt's tokens (no offset
    mapping needed, so slow tokenizers work too); a leading space merged into the
    subject's first token (" E" + "iffel") still counts as the subject's."""
    start = prompt.find(subject)
    if start < 0:
        raise ConfigError("subject", f"'{subject}' does not occur in the prompt '{prompt}'")
    end = start + len(subject)
    full = _ids(tokenizer, prompt)
    ends = [len(tokenizer.decode(full[: i + 1])) for i in range(len(full))]
    if not ends or ends[-1] != len(prompt):
        raise SculptError("prompt: its tokens do not decode back to it; cannot place the subject")
    begins = [0, *ends[:-1]]
    found = [i for i, (b, e) in enumerate(zip(begins, ends)) if b < end and e > start]
    if not found:
        raise SculptError(f"subject: '{subject}' covers no token of the prompt")
    return found


class CausalTrace(Analyzer):
    """ROME-style causal tracing of one prompt over every layer and position.

    Args:
        prompt: the clean prompt.
        subject: the substring whose token embeddings are corrupted. Leave the first
            token out of it: in a model without a BOS token the first position is the
            attention sink, and noise there breaks every later position at once.
        target: the token whose probability is traced (e.g. " Paris"; its first token);
            null: the clean run's top-1 prediction.
        corrupted_prompt: a prompt of the same token length run as the corrupted input
            instead of noise (e.g. another subject); null: noise on the subject.
        noise_scale: noise standard deviation in units of the embedding entries' std
            (ROME: 3).
        noise_samples: independent noise draws averaged per state (ROME: 10).
        sites: which of residual, attn, mlp to trace.
        window: layers restored together for attn and mlp (ROME: 10); 1: single layers.
    """

    def __init__(
        self,
        prompt: str = "The Eiffel Tower is located in the city of",
        subject: str = "Eiffel Tower",
        target: str | None = " Paris",
        corrupted_prompt: str | None = None,
        noise_scale: Annotated[float, Gt(0)] = 3.0,
        noise_samples: Annotated[int, Ge(1)] = 1,
        sites: list[str] | None = None,
        window: Annotated[int, Ge(1)] = 10,
    ):
        if not prompt:
            raise ConfigError("prompt", "must not be empty")
        if subject not in prompt:
            raise ConfigError("subject", f"'{subject}' does not occur in the prompt '{prompt}'")
        sites = list(TRACE_SITES) if sites is None else list(sites)
        bad = [s for s in sites if s not in TRACE_SITES]
        if bad or not sites:
            raise ConfigError("sites", f"{bad or sites} not a non-empty subset of {TRACE_SITES}")
        if target == "":
            raise ConfigError("target", "must not be empty (null: the clean top-1 token)")
        self.prompt = prompt
        self.subject = subject
        self.target = target
        self.corrupted_prompt = corrupted_prompt
        self.noise_scale = noise_scale
        self.noise_samples = noise_samples
        self.sites = sites
        self.window = window

    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "causal tracing")
        started = time.perf_counter()
        tok = ctx.tokenizer
        ids = torch.tensor([_ids(tok, self.prompt)])
        n_pos = ids.shape[1]
        n_layers = num_layers(model, ctx.arch)
        subj = subject_positions(tok, self.prompt, self.subject)

        # Clean run: every site's output, and the target.
        keys = [(s, i) for s in self.sites for i in range(n_layers)]
        with capture(model, ctx.arch, keys) as clean:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        clean = dict(clean)
        if self.target is None:
            target_id = int(logits.argmax())
        else:
            target_ids = _ids(tok, self.target)
            if not target_ids:
                raise ConfigError("target", f"'{self.target}' tokenizes to nothing")
            target_id = target_ids[0]
        p_clean = float(logits.softmax(-1)[target_id])

        # The corrupted input: a batch of noise_samples rows (or the given prompt once).
        noise = torch.zeros(0)
        if self.corrupted_prompt is not None:
            corrupted = torch.tensor([_ids(tok, self.corrupted_prompt)])
            if corrupted.shape != ids.shape:
                raise ConfigError(
                    "corrupted_prompt",
                    f"{corrupted.shape[1]} tokens; the prompt has {n_pos} (they must match)",
                )
            differ = (corrupted[0] != ids[0]).nonzero().flatten().tolist()
            if not differ:
                raise ConfigError("corrupted_prompt", "is the same token sequence as the prompt")
            first = differ[0]
            samples = 1
        else:
            corrupted = ids
            first = subj[0]
            samples = self.noise_samples
            emb = model.get_submodule(ctx.arch.embed).weight
            std = float(emb.float().std())
            gen = ctx.generator()
            noise = torch.randn(samples, len(subj), emb.shape[1], generator=gen)
            noise = noise * (self.noise_scale * std)
        positions = list(range(first, n_pos))

        # The corrupted run, once: its residual stream before every block (the embeddings,
        # noised, for block 0), so a restoration from block lo on starts there.
        stream_keys = [("embed", 0)] + [("residual", i) for i in range(n_layers - 1)]
        noise_patch = (
            {}
            if self.corrupted_prompt is not None
            else {("embed", 0): add_at_positions(noise, torch.tensor(subj))}
        )
        with patch(model, ctx.arch, noise_patch), capture(model, ctx.arch, stream_keys) as st:
            out = model(input_ids=corrupted.expand(samples, -1), use_cache=False, logits_to_keep=1)
        before_block = [st[k] for k in stream_keys]  # index b: the stream entering block b
        p_corrupt = float(out.logits[:, -1].float().softmax(-1)[:, target_id].mean())

        # One batch per (site, layer): rows are (position, sample) pairs, sample fastest.
        pos_rows = torch.tensor(positions).repeat_interleave(samples)
        row_idx = torch.arange(len(pos_rows))
        grids: dict[str, torch.Tensor] = {}
        for site in self.sites:
            grid = torch.full((n_layers, n_pos), p_corrupt, dtype=torch.float64)
            half = self.window // 2 if site != "residual" else 0
            span = self.window if site != "residual" else 1
            for layer in ctx.track(range(n_layers), f"causal trace: {site}", total=n_layers):
                lo = max(0, min(layer - half, n_layers - span))
                restored = range(lo, min(n_layers, lo + span))
                patches = {
                    (site, j): set_positions(clean[(site, j)][0, pos_rows], pos_rows, row_idx)
                    for j in restored
                }
                hidden = before_block[lo].repeat(len(positions), 1, 1)
                with patch(model, ctx.arch, patches):
                    out = run_from(model, ctx.arch, lo, hidden, logits_to_keep=1)
                probs = out.logits[:, -1].float().softmax(-1)[:, target_id]
                grid[layer, first:] = probs.double().view(len(positions), samples).mean(1)
            grids[site] = grid
        seconds = time.perf_counter() - started

        labels = [f"{i}:{tok.decode([t])!r}" for i, t in enumerate(ids[0].tolist())]
        out_dir = ctx.stage_dir(ctx.stage_name or "causal_trace")
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self._write_csv(out_dir / "trace.csv", grids, labels, p_corrupt)
        plot = self._plot(ctx, grids, labels, subj, p_clean, p_corrupt, tok.decode([target_id]))
        tables = {
            f"{site}_effect": [
                {
                    "layer": layer,
                    **{
                        lab: round(float(g[layer, j]) - p_corrupt, 4)
                        for j, lab in enumerate(labels)
                    },
                }
                for layer in range(n_layers)
            ]
            for site, g in grids.items()
        }
        metrics: dict[str, float] = {
            "p_clean": p_clean,
            "p_corrupted": p_corrupt,
            "total_effect": p_clean - p_corrupt,
            "positions": float(n_pos),
            "layers": float(n_layers),
            "trace_seconds": seconds,
        }
        last_subj = subj[-1]
        for site, g in grids.items():
            effect = g - p_corrupt
            flat = int(effect.argmax())
            metrics[f"{site}_max_effect"] = float(effect.max())
            metrics[f"{site}_argmax_layer"] = float(flat // n_pos)
            metrics[f"{site}_argmax_position"] = float(flat % n_pos)
            metrics[f"{site}_last_subject_max_effect"] = float(effect[:, last_subj].max())
            metrics[f"{site}_last_subject_argmax_layer"] = float(effect[:, last_subj].argmax())
        return StageResult(
            metrics=metrics,
            artifacts={"trace_csv": csv_path},
            tables=tables,
            plots={"causal_trace": plot},
        )

    @staticmethod
    def _write_csv(
        path: Path, grids: dict[str, torch.Tensor], labels: list[str], p_corrupt: float
    ) -> Path:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["site", "layer", "position", "token", "p_target", "indirect_effect"])
            for site, g in grids.items():
                for layer in range(g.shape[0]):
                    for pos, lab in enumerate(labels):
                        p = float(g[layer, pos])
                        w.writerow([site, layer, pos, lab, f"{p:.6g}", f"{p - p_corrupt:.6g}"])
        return path

    def _plot(self, ctx, grids, labels, subj, p_clean, p_corrupt, target) -> Path:
        plt = pyplot()
        n = len(grids)
        fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 0.32 * len(labels) + 1.8), squeeze=False)
        cmaps = {"residual": "Purples", "attn": "Reds", "mlp": "Greens"}
        ticks = [lab + (" *" if i in subj else "") for i, lab in enumerate(labels)]
        for ax, (site, g) in zip(axes[0], grids.items()):
            im = ax.imshow(
                g.T.numpy(), aspect="auto", cmap=cmaps[site], vmin=min(p_corrupt, float(g.min()))
            )
            ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
            span = "" if site == "residual" or self.window == 1 else f", window {self.window}"
            ax.set_title(f"restore {site}{span}", fontsize=9)
            ax.set_xlabel("layer")
            fig.colorbar(im, ax=ax, label=f"p({target!r})")
        fig.suptitle(
            f"causal trace: p_clean={p_clean:.3f}, p_corrupted={p_corrupt:.3f} (* subject)",
            fontsize=10,
        )
        name = ctx.stage_name or "causal_trace"
        return save_figure(fig, ctx.output_dir / "plots" / f"{name}.png")
