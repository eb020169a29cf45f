"""ROME fact editing (Meng et al., 2022, "Locating and Editing Factual Associations in
GPT", Section 3): a rank-one update of one block's MLP output projection (``arch.mlp_out``,
Llama's ``down_proj``) rewrites (subject, relation, object) to a new object.

The MLP's output projection is read as a linear associative memory W: keys k (its inputs,
the gated activations) map to values v = W k (what the block adds to the residual stream).
For each request:

1. Key k*: the down_proj input at the subject's last token, averaged over the plain
   prompt and ``prefixes`` short texts sampled from the model itself and put in front of
   it ("<sampled text>. The Eiffel Tower is located in the city of"), so the key stands for
   the subject rather than one context.
2. Value v*: W k* + delta, where delta is added to the down_proj output at the subject's
   last token of every such context and optimised by Adam so the new object becomes likely
   (mean NLL of its tokens), with ROME's regularisers: KL(unedited || edited) of the next
   token after "{subject} is a" (the essence prompt: what the subject is must not drift),
   an L2 penalty on ||delta|| / ||W k*|| and a hard clamp ||delta|| <= clamp_norm ||W k*||.
3. The closed form that makes W' k* = v* while moving W as little as possible on the
   keys of ordinary text (least squares weighted by C, the uncentred second moment of
   down_proj inputs on calibration windows):
   W' = W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*).

``mode: sequential``: several requests are applied one after another (each on the model
the previous ones left; C does not change, since the edited projection is the one whose
inputs it measures), as in ROME's sequential setting. Every update is rank one and lies in
the one chosen ``down_proj``. Later updates can undo earlier ones whose keys are close
(two car makers swapping countries).

``mode: joint`` (default): every k*_i and v*_i is computed on the unedited model and one
update satisfies all of them at once, the equality-constrained form of the same least
squares (the single-layer relative of MEMIT's batch update, Meng et al., 2023):
minimise ||Delta C^{1/2}|| subject to (W + Delta) K = V, solved by
Delta = R (K^T C^-1 K)^-1 (C^-1 K)^T with R = V - W K, a rank-n update for n requests
(a ridge of ``joint_ridge`` x mean diagonal keeps K^T C^-1 K invertible when two keys
nearly coincide).

Scoring follows CounterFact (Meng et al., 2022, Section 4.2): an object's score is the
summed log-probability of its tokens after the prompt (multi-token objects are allowed;
the shipped request set uses single-token objects). Before and after the edits:

* efficacy: fraction of requests with p(new) > p(true) on the rewrite prompt;
* paraphrase: the same on paraphrase prompts (averaged per request, then over requests);
* neighbourhood (specificity): fraction of neighbourhood prompts (other subjects with the
  same true object) where p(true) > p(new) (averaged per request, then over requests);

plus the magnitudes (mean p(new), p(true) and their differences). Thresholds
(``min_efficacy``, ``min_paraphrase``, ``min_specificity``) fail the run naming the key.
The runner measures KL and perplexity against the unedited model on the evaluation windows.

A request file is JSON lines: ``subject``, ``prompt`` (with ``{}`` for the subject),
``target_true``, ``target_new`` (with their leading space), ``paraphrase_prompts`` and
``neighborhood_prompts`` (lists of full prompts; may be empty).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from annotated_types import Ge, Gt, Interval
from safetensors.torch import save
from torch import nn

from framework.concepts import resolve_path
from framework.errors import ConfigError, SculptError
from framework.interventions import capture, check_supported, num_layers, patch, run_from
from framework.io import atomic_write_bytes, atomic_write_json
from framework.models import ArchMap, blocks
from framework.plugins import Context, Editor, StageResult

# Words the sampled prefixes start from (ROME starts its context templates the same way):
# a model with no BOS token needs some first token to sample from.
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You", "It", "In", "We")


@dataclass
class Request:
    subject: str
    prompt: str  # with "{}" for the subject
    target_true: str
    target_new: str
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


def load_requests(path: str, key: str = "data") -> list[Request]:
    file = resolve_path(path, key)
    out: list[Request] = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{key}: {file}:{n}"
        try:
            row = json.loads(line)
            req = Request(
                subject=str(row["subject"]),
                prompt=str(row["prompt"]),
                target_true=str(row["target_true"]),
                target_new=str(row["target_new"]),
                paraphrase_prompts=[str(p) for p in row.get("paraphrase_prompts", [])],
                neighborhood_prompts=[str(p) for p in row.get("neighborhood_prompts", [])],
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SculptError(
                f"{where}: expected subject, prompt, target_true, target_new ({exc})"
            ) from exc
        if req.prompt.count("{}") != 1:
            raise SculptError(f"{where}: the prompt needs exactly one '{{}}' for the subject")
        if not req.subject.strip() or not req.target_true or not req.target_new:
            raise SculptError(f"{where}: subject and targets must not be empty")
        if req.target_true == req.target_new:
            raise SculptError(f"{where}: target_new equals target_true")
        out.append(req)
    if not out:
        raise SculptError(f"{key}: {file} holds no requests")
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def last_subject_token(tokenizer, text: str, subject: str) -> int:
    """Index of the last token overlapping the last occurrence of ``subject`` in ``text``
    (character spans from decoding growing prefixes, so any tokenizer works)."""
    start = text.rfind(subject)
    if start < 0:
        raise SculptError(f"data: subject '{subject}' does not occur in '{text}'")
    end = start + len(subject)
    ids = _ids(tokenizer, text)
    ends = [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    for i, e in enumerate(ends):
        if e >= end:
            return i
    raise SculptError(f"data: '{text}' does not decode back to itself; cannot place the subject")


def _pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    # Right padding and no attention mask: causal attention keeps every real token blind
    # to the pads after it, and positions stay 0..n-1 as in an unpadded run.
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def logits_at(
    model: nn.Module,
    arch: ArchMap,
    run: Callable[[], object],
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits [n, vocab] at (rows[i], positions[i]) of the forward pass ``run`` makes.

    The LM head is applied to those states only (the final norm's output is captured): on
    a 49k vocabulary the head over every position would cost a third of the whole pass."""
    if arch.final_norm is None or arch.head is None:
        raise SculptError(f"model: the {arch.family} map names no final norm / LM head")
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _a: object, out: torch.Tensor) -> None:
        store["h"] = out

    handle = model.get_submodule(arch.final_norm).register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return model.get_submodule(arch.head)(store["h"][rows, positions])


@torch.no_grad()
def object_logprobs(
    model: nn.Module,
    arch: ArchMap,
    tokenizer,
    pairs: list[tuple[str, str]],
    batch_size: int = 32,
) -> torch.Tensor:
    """Summed log-probability of each ``target``'s tokens after its ``prompt`` (float64)."""
    pad_id = _pad_id(tokenizer)
    seqs, spans = [], []
    for prompt, target in pairs:
        p, t = _ids(tokenizer, prompt), _ids(tokenizer, target)
        if not p or not t:
            raise SculptError(f"data: '{prompt}' / '{target}' tokenizes to nothing")
        seqs.append(p + t)
        spans.append((len(p), t))
    out = torch.zeros(len(pairs), dtype=torch.float64)
    for lo in range(0, len(seqs), batch_size):
        chunk = spans[lo : lo + batch_size]
        ids = _pad(seqs[lo : lo + batch_size], pad_id)
        rows = torch.tensor([j for j, (_, t) in enumerate(chunk) for _ in t])
        pos = torch.tensor([n - 1 + i for n, t in chunk for i in range(len(t))])
        tgt = torch.tensor([x for _, t in chunk for x in t])
        logits = logits_at(
            model,
            arch,
            lambda ids=ids: model(input_ids=ids, use_cache=False, logits_to_keep=1),
            rows,
            pos,
        )
        logp = logits.double().log_softmax(-1)[torch.arange(len(tgt)), tgt]
        out[lo : lo + len(chunk)] = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows, logp
        )
    return out


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter needs a gradient while delta is optimised (only delta does)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _Enough(Exception):
    """Raised once the edited block's down_proj has run: later blocks are not needed."""


class Rome(Editor):
    """Rank-one fact edits of one block's MLP output projection (see the module docstring).

    Args:
        data: JSON-lines request file (relative paths: from the repository).
        requests: use the first this many requests; null: all.
        layer: block whose ``down_proj`` is edited (negative: from the end); null: block
            n_blocks // 6, early-middle, where causal tracing finds the subject's MLP
            effect (SmolLM2's 30 blocks: 5; the tiny test Llama's 2: 0).
        prefixes: sampled texts put in front of the prompt for the key and the value
            optimisation (ROME: 20; the plain prompt is always one more context).
        prefix_tokens: tokens per sampled prefix.
        cov_windows: calibration windows the second moment C of down_proj inputs is
            estimated on.
        cov_shrinkage: C + s * tr(C)/d * I before inverting (keeps a rank-deficient C
            invertible; 0: C as measured).
        steps: Adam steps of the value optimisation (ROME: 20).
        lr: Adam learning rate (ROME: 0.5).
        kl_weight: weight of KL(unedited || edited) after ``kl_prompt`` (ROME: 0.0625).
        kl_prompt: the essence prompt, "{}" for the subject (ROME: "{} is a").
        weight_decay: weight of (||delta|| / ||W k*||)^2 in the loss (ROME: 0.5).
        clamp_norm: ||delta|| is clamped to this times ||W k*|| after each step (ROME: 4).
        early_stop_nll: stop optimising once the new object's mean NLL is below this.
        batch_size: sequences per forward pass when scoring prompts.
        mode: ``joint`` (one update for all requests, computed on the unedited model) or
            ``sequential`` (one rank-one update per request, in file order).
        joint_ridge: relative ridge on K^T C^-1 K in the joint solve.
        min_efficacy: fail the run when the efficacy score after the edits is below this;
            null: report only. Likewise min_paraphrase and min_specificity (the
            neighbourhood score).
    """

    needs_calibration = True

    def __init__(
        self,
        data: str = "experiments/data/fact_requests.jsonl",
        requests: Annotated[int, Ge(1)] | None = None,
        layer: int | None = None,
        prefixes: Annotated[int, Ge(0)] = 3,
        prefix_tokens: Annotated[int, Ge(1)] = 6,
        cov_windows: Annotated[int, Ge(1)] = 8,
        cov_shrinkage: Annotated[float, Ge(0)] = 1e-3,
        steps: Annotated[int, Ge(1)] = 20,
        lr: Annotated[float, Gt(0)] = 0.5,
        kl_weight: Annotated[float, Ge(0)] = 0.0625,
        kl_prompt: str = "{} is a",
        weight_decay: Annotated[float, Ge(0)] = 0.5,
        clamp_norm: Annotated[float, Gt(0)] = 4.0,
        early_stop_nll: Annotated[float, Ge(0)] = 0.05,
        batch_size: Annotated[int, Ge(1)] = 32,
        mode: Literal["joint", "sequential"] = "joint",
        joint_ridge: Annotated[float, Ge(0)] = 1e-4,
        min_efficacy: Annotated[float, Interval(ge=0, le=1)] | None = None,
        min_paraphrase: Annotated[float, Interval(ge=0, le=1)] | None = None,
        min_specificity: Annotated[float, Interval(ge=0, le=1)] | None = None,
    ):
        if kl_prompt.count("{}") != 1:
            raise ConfigError("kl_prompt", f"'{kl_prompt}' needs exactly one '{{}}'")
        self.data = data
        self.requests = requests
        self.layer = layer
        self.prefixes = prefixes
        self.prefix_tokens = prefix_tokens
        self.cov_windows = cov_windows
        self.cov_shrinkage = cov_shrinkage
        self.steps = steps
        self.lr = lr
        self.kl_weight = kl_weight
        self.kl_prompt = kl_prompt
        self.weight_decay = weight_decay
        self.clamp_norm = clamp_norm
        self.early_stop_nll = early_stop_nll
        self.batch_size = batch_size
        self.mode = mode
        self.joint_ridge = joint_ridge
        self.min_efficacy = min_efficacy
        self.min_paraphrase = min_paraphrase
        self.min_specificity = min_specificity

    # -- pieces -------------------------------------------------------------------------

    def _down_proj(self, model: nn.Module, ctx: Context, layer: int) -> nn.Linear:
        module = blocks(model, ctx.arch)[layer].get_submodule(ctx.arch.mlp_out)
        if not isinstance(module, nn.Linear):
            raise SculptError(f"model: {ctx.arch.mlp_out} of block {layer} is not a Linear")
        return module

    @torch.no_grad()
    def _second_moment(self, model: nn.Module, ctx: Context, layer: int) -> torch.Tensor:
        """E[k k^T] (float64) of down_proj inputs over every token of the calibration
        windows; the forward pass stops after the edited block."""
        proj = self._down_proj(model, ctx, layer)
        d = proj.in_features
        total = torch.zeros(d, d, dtype=torch.float64)
        count = 0

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            nonlocal total, count
            k = args[0].reshape(-1, d).double()
            total += k.T @ k
            count += len(k)
            raise _Enough

        windows = ctx.calibration(self.cov_windows)
        handle = proj.register_forward_pre_hook(hook)
        try:
            for window in ctx.track(windows, "ROME second moment", total=len(windows)):
                with suppress(_Enough):
                    model(input_ids=window[None], use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        c = total / max(count, 1)
        if self.cov_shrinkage:
            c = c + self.cov_shrinkage * torch.trace(c) / d * torch.eye(d, dtype=torch.float64)
        return c

    @torch.no_grad()
    def _sample_prefixes(self, model: nn.Module, ctx: Context) -> list[str]:
        """Short texts sampled from the model (top-5, seeded by the run), ROME's context
        templates: each is used as "<text>. <prompt>"."""
        if not self.prefixes:
            return []
        gen = ctx.generator()
        tok = ctx.tokenizer
        starts = [_ids(tok, PREFIX_STARTS[i % len(PREFIX_STARTS)]) for i in range(self.prefixes)]
        seqs = [list(s) for s in starts]
        for _ in range(self.prefix_tokens):
            ids = _pad(seqs, _pad_id(tok))
            last = torch.tensor([len(s) - 1 for s in seqs])

            def run(ids: torch.Tensor = ids) -> object:
                return model(input_ids=ids, use_cache=False, logits_to_keep=1)

            logits = logits_at(model, ctx.arch, run, torch.arange(len(seqs)), last).float()
            for i, s in enumerate(seqs):
                top = logits[i].topk(5)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                s.append(int(top.indices[pick]))
        texts = []
        for s in seqs:
            text = tok.decode(s, skip_special_tokens=True)
            # braces would be read as format fields; newlines would make the prompt a
            # new paragraph rather than a continuation
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            texts.append(f"{text}. ")
        return texts

    def _contexts(self, req: Request, prefixes: list[str]) -> list[str]:
        return [req.text, *(p + req.text for p in prefixes)]

    @torch.no_grad()
    def _key(
        self, model: nn.Module, ctx: Context, layer: int, texts: list[str], subject: str
    ) -> torch.Tensor:
        """k*: the down_proj input at the subject's last token, averaged over ``texts``."""
        proj = self._down_proj(model, ctx, layer)
        tok = ctx.tokenizer
        seqs = [_ids(tok, t) for t in texts]
        pos = torch.tensor([last_subject_token(tok, t, subject) for t in texts])
        store: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            store["k"] = args[0].detach()
            raise _Enough

        handle = proj.register_forward_pre_hook(hook)
        try:
            model(input_ids=_pad(seqs, _pad_id(tok)), use_cache=False, logits_to_keep=1)
        except _Enough:
            pass
        finally:
            handle.remove()
        return store["k"][torch.arange(len(seqs)), pos].double().mean(0)

    def _optimise_delta(
        self,
        model: nn.Module,
        ctx: Context,
        layer: int,
        req: Request,
        contexts: list[str],
        scale: float,
    ) -> tuple[torch.Tensor, float, int]:
        """delta added to the down_proj output at the subject's last token of every context
        (and of the essence prompt) so the new object becomes likely. Returns delta, the
        new object's final mean NLL and the steps taken."""
        tok = ctx.tokenizer
        target = _ids(tok, req.target_new)
        if not target:
            raise SculptError(f"data: target_new '{req.target_new}' tokenizes to nothing")
        rewrite = [_ids(tok, c) for c in contexts]
        seqs = [r + target[:-1] for r in rewrite]
        subj = [last_subject_token(tok, c, req.subject) for c in contexts]
        kl_text = self.kl_prompt.format(req.subject)
        seqs.append(_ids(tok, kl_text))
        subj.append(last_subject_token(tok, kl_text, req.subject))
        ids = _pad(seqs, _pad_id(tok))
        n_rw = len(rewrite)
        rows = torch.arange(len(seqs))
        subj_pos = torch.tensor(subj)
        # next-token positions of the new object's tokens in each rewrite row
        tgt_rows = torch.arange(n_rw).repeat_interleave(len(target))
        tgt_pos = torch.tensor([len(r) - 1 + i for r in rewrite for i in range(len(target))])
        tgt_ids = torch.tensor(target * n_rw)
        kl_pos = len(seqs[-1]) - 1

        # The stream before the edited block is the same on every step: run it once.
        with torch.no_grad():
            if layer == 0:
                hidden = model.get_submodule(ctx.arch.embed)(ids)
            else:
                with capture(model, ctx.arch, [("residual", layer - 1)]) as st, suppress(_Enough):
                    _run_until(model, ctx, layer - 1, ids)
                hidden = st[("residual", layer - 1)]
        hidden = hidden.detach()

        width = self._down_proj(model, ctx, layer).out_features
        delta = torch.zeros(width, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.lr)

        def add_delta(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[rows, subj_pos] = out[rows, subj_pos] + delta.to(out.dtype)
            return out

        # the head runs on the new object's positions and the essence prompt's last one
        rows_at = torch.cat([tgt_rows, torch.tensor([n_rw])])
        pos_at = torch.cat([tgt_pos, torch.tensor([kl_pos])])

        def run() -> object:
            return run_from(model, ctx.arch, layer, hidden, logits_to_keep=1)

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            with patch(model, ctx.arch, {("mlp", layer): add_delta}):
                logp = logits_at(model, ctx.arch, run, rows_at, pos_at).float().log_softmax(-1)
            nll = -logp[torch.arange(len(tgt_ids)), tgt_ids].mean()
            return nll, logp[-1]

        with torch.no_grad():
            _, kl_ref = forward()  # delta = 0: the unedited essence distribution
        nll_value, taken = math.inf, 0
        with _frozen(model), torch.enable_grad():
            for step in range(self.steps):
                nll, kl_logp = forward()
                nll_value = float(nll.detach())
                if nll_value < self.early_stop_nll:
                    break
                kl = (kl_ref.exp() * (kl_ref - kl_logp)).sum()
                decay = (delta.norm() / scale) ** 2
                loss = nll + self.kl_weight * kl + self.weight_decay * decay
                opt.zero_grad()
                loss.backward()
                opt.step()
                taken = step + 1
                with torch.no_grad():
                    limit = self.clamp_norm * scale
                    norm = float(delta.norm())
                    if norm > limit:
                        delta.mul_(limit / norm)
            else:
                with torch.no_grad():
                    nll_value = float(forward()[0])
        return delta.detach().double(), nll_value, taken

    # -- scoring ------------------------------------------------------------------------

    def _score(
        self, model: nn.Module, arch: ArchMap, tokenizer, requests: list[Request]
    ) -> list[dict[str, torch.Tensor]]:
        """Per request: log p(true), log p(new) on the rewrite, paraphrase and
        neighbourhood prompts (one batched pass over all of them)."""
        pairs: list[tuple[str, str]] = []
        index: list[tuple[int, str]] = []
        for i, r in enumerate(requests):
            for kind, prompts in (
                ("rewrite", [r.text]),
                ("paraphrase", r.paraphrase_prompts),
                ("neighborhood", r.neighborhood_prompts),
            ):
                for p in prompts:
                    pairs += [(p, r.target_true), (p, r.target_new)]
                    index.append((i, kind))
        lp = object_logprobs(model, arch, tokenizer, pairs, self.batch_size).view(-1, 2)
        out: list[dict[str, list[torch.Tensor]]] = [
            {"rewrite": [], "paraphrase": [], "neighborhood": []} for _ in requests
        ]
        for (i, kind), row in zip(index, lp, strict=True):
            out[i][kind].append(row)
        return [
            {
                k: torch.stack(v) if v else torch.zeros(0, 2, dtype=torch.float64)
                for k, v in d.items()
            }
            for d in out
        ]

    @staticmethod
    def _summary(scores: list[dict[str, torch.Tensor]], suffix: str) -> dict[str, float]:
        """CounterFact's scores (fractions) and magnitudes (probabilities) over requests."""

        def per_request(kind: str, new_wins: bool) -> list[float]:
            vals = []
            for s in scores:
                x = s[kind]
                if len(x):
                    win = x[:, 1] > x[:, 0] if new_wins else x[:, 0] > x[:, 1]
                    vals.append(float(win.double().mean()))
            return vals

        def mean(vals: list[float]) -> float:
            return sum(vals) / len(vals) if vals else float("nan")

        def prob(kind: str, col: int) -> float:
            return mean([float(s[kind][:, col].exp().mean()) for s in scores if len(s[kind])])

        m = {
            "efficacy": mean(per_request("rewrite", True)),
            "paraphrase": mean(per_request("paraphrase", True)),
            "neighborhood": mean(per_request("neighborhood", False)),
        }
        for kind, short in (
            ("rewrite", ""),
            ("paraphrase", "paraphrase_"),
            ("neighborhood", "neighborhood_"),
        ):
            m[f"{short}p_true"] = prob(kind, 0)
            m[f"{short}p_new"] = prob(kind, 1)
        m["efficacy_magnitude"] = m["p_new"] - m["p_true"]
        m["paraphrase_magnitude"] = m["paraphrase_p_new"] - m["paraphrase_p_true"]
        m["neighborhood_magnitude"] = m["neighborhood_p_true"] - m["neighborhood_p_new"]
        # nan (no prompts of a kind) would break the finite-metrics contract: -1 marks it
        return {f"{k}{suffix}": (v if v == v else -1.0) for k, v in m.items()}

    # -- the edit -----------------------------------------------------------------------

    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "ROME editing")
        started = time.perf_counter()
        requests = load_requests(self.data, "data")
        if self.requests is not None:
            requests = requests[: self.requests]
        n_layers = num_layers(model, ctx.arch)
        chosen = n_layers // 6 if self.layer is None else self.layer
        if not -n_layers <= chosen < n_layers:
            raise ConfigError("layer", f"{chosen} does not exist (model has {n_layers} blocks)")
        layer = chosen % n_layers
        tok = ctx.tokenizer
        was_training = model.training
        model.eval()

        before = self._score(model, ctx.arch, tok, requests)
        c = self._second_moment(model, ctx, layer)
        proj = self._down_proj(model, ctx, layer)
        w_before = proj.weight.detach().clone()
        prefixes = self._sample_prefixes(model, ctx)

        per_request: list[dict[str, float]] = []
        lefts: list[torch.Tensor] = []
        rights: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []
        residuals: list[torch.Tensor] = []
        for req in ctx.track(requests, "ROME edits", total=len(requests)):
            contexts = self._contexts(req, prefixes)
            k = self._key(model, ctx, layer, contexts, req.subject)
            w = proj.weight.detach().double()
            v0 = w @ k
            scale = float(v0.norm()) or 1.0
            delta, nll, taken = self._optimise_delta(model, ctx, layer, req, contexts, scale)
            per_request.append(
                {
                    "delta_norm_rel": float(delta.norm()) / scale,
                    "final_nll": nll,
                    "steps": float(taken),
                }
            )
            if self.mode == "joint":
                keys.append(k)
                residuals.append(delta)  # v* - W k*, against the unedited W
                continue
            # v* = W k* + delta, so v* - W k* = delta; u = C^-1 k* spreads it over keys
            # in proportion to their C-weighted alignment with k*.
            u = torch.linalg.solve(c, k)
            denom = float(u @ k)
            if not denom > 0:
                raise SculptError(f"data: request '{req.text}': k*^T C^-1 k* = {denom} <= 0")
            with torch.no_grad():
                proj.weight += torch.outer(delta, u / denom).to(proj.weight.dtype)
            lefts.append(delta.float())
            rights.append((u / denom).float())
            own = object_logprobs(
                model, ctx.arch, tok, [(req.text, req.target_true), (req.text, req.target_new)]
            )
            per_request[-1]["own_success"] = float(own[1] > own[0])
        if self.mode == "joint":
            key_matrix = torch.stack(keys, dim=1).to(c.dtype)  # [d_in, n]
            u_matrix = torch.linalg.solve(c, key_matrix)  # C^-1 K
            gram = key_matrix.T @ u_matrix  # K^T C^-1 K, [n, n]
            ridge = self.joint_ridge * float(gram.diagonal().mean())
            gram = gram + ridge * torch.eye(len(keys), dtype=gram.dtype)
            left = torch.linalg.solve(gram, torch.stack(residuals, dim=1).to(c.dtype).T).T  # R G^-1
            with torch.no_grad():
                proj.weight += (left @ u_matrix.T).to(proj.weight.dtype)
            lefts.extend(left.T.float())
            rights.extend(u_matrix.T.float())
        after = self._score(model, ctx.arch, tok, requests)
        model.train(was_training)
        if self.mode == "joint":  # one update for all: "right after its own" is the end
            for r, a in zip(per_request, after, strict=True):
                r["own_success"] = float(a["rewrite"][0, 1] > a["rewrite"][0, 0])

        change = (proj.weight.detach() - w_before).double()
        metrics: dict[str, float] = {
            "layer": float(layer),
            "joint": float(self.mode == "joint"),
            "requests": float(len(requests)),
            "contexts": float(len(prefixes) + 1),
            **self._summary(before, "_before"),
            **self._summary(after, ""),
            "known_before": sum(float(s["rewrite"][0, 0] > s["rewrite"][0, 1]) for s in before)
            / len(requests),
            "own_success": sum(r["own_success"] for r in per_request) / len(per_request),
            "mean_delta_norm_rel": sum(r["delta_norm_rel"] for r in per_request) / len(per_request),
            "mean_final_nll": sum(r["final_nll"] for r in per_request) / len(per_request),
            "mean_steps": sum(r["steps"] for r in per_request) / len(per_request),
            "weight_change_rel": float(change.norm() / w_before.double().norm()),
            "edit_seconds": time.perf_counter() - started,
        }

        rows = []
        for r, b, a, p in zip(requests, before, after, per_request, strict=True):
            rows.append(
                {
                    "subject": r.subject,
                    "prompt": r.text,
                    "true": r.target_true.strip(),
                    "new": r.target_new.strip(),
                    "p_true_before": round(float(b["rewrite"][0, 0].exp()), 4),
                    "p_new_before": round(float(b["rewrite"][0, 1].exp()), 4),
                    "p_true_after": round(float(a["rewrite"][0, 0].exp()), 4),
                    "p_new_after": round(float(a["rewrite"][0, 1].exp()), 4),
                    "efficacy": int(a["rewrite"][0, 1] > a["rewrite"][0, 0]),
                    # right after its own update, before the later requests' updates
                    "own_success": int(p["own_success"]),
                    "paraphrase": _frac(a["paraphrase"], new_wins=True),
                    "neighborhood": _frac(a["neighborhood"], new_wins=False),
                    "neighborhood_before": _frac(b["neighborhood"], new_wins=False),
                    "delta_norm_rel": round(p["delta_norm_rel"], 3),
                    "final_nll": round(p["final_nll"], 4),
                    "steps": int(p["steps"]),
                }
            )
        out_dir = ctx.stage_dir(ctx.stage_name or "rome")
        out_dir.mkdir(parents=True, exist_ok=True)
        table_path = atomic_write_json(
            out_dir / "requests.json", {"metrics": metrics, "rows": rows}
        )
        # The updates themselves: W_after = W_before + sum_i left_i right_i^T (in order).
        update_path = out_dir / "updates.safetensors"
        atomic_write_bytes(
            update_path,
            save(
                {
                    "left": torch.stack(lefts).contiguous(),
                    "right": torch.stack(rights).contiguous(),
                },
                metadata={"layer": str(layer), "module": ctx.arch.mlp_out, "data": str(self.data)},
            ),
        )
        self._check_thresholds(metrics)
        return StageResult(
            metrics=metrics,
            tables={"requests": rows},
            artifacts={"requests": table_path, "updates": update_path},
        )

    def _check_thresholds(self, metrics: dict[str, float]) -> None:
        for key, metric, what in (
            ("min_efficacy", "efficacy", "efficacy score"),
            ("min_paraphrase", "paraphrase", "paraphrase score"),
            ("min_specificity", "neighborhood", "neighbourhood score"),
        ):
            limit = getattr(self, key)
            if limit is not None and not metrics[metric] >= limit:
                # ConfigError: the runner prefixes the node's key (editor.min_efficacy: ...)
                raise ConfigError(
                    key,
                    f"{what} after the edits is {metrics[metric]:.4f} "
                    f"(before {metrics[metric + '_before']:.4f}), below the limit {limit}",
                )


def _frac(x: torch.Tensor, new_wins: bool) -> float:
    if not len(x):
        return -1.0
    win = x[:, 1] > x[:, 0] if new_wins else x[:, 0] > x[:, 1]
    return round(float(win.double().mean()), 4)


def _run_until(model: nn.Module, ctx: Context, last: int, ids: torch.Tensor) -> None:
    """Forward pass that stops (raises _Enough) once block ``last`` has run."""

    def stop(*_: object) -> None:
        raise _Enough

    handle = blocks(model, ctx.arch)[last].register_forward_hook(stop)
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
