"""Language-model quality, per PROTOCOL.md: perplexity (exp of the mean next-token NLL over
every predicted token, fp32), mean per-token KL(reference || model) and top-1 next-token
agreement with the reference. Encoders (no LM head) are scored by the cosine similarity of
their mean-pooled output embeddings to the reference's."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import SculptError

Track = Callable[..., Any]


@dataclass
class ReferenceCache:
    """The reference's outputs, kept small: for a causal LM the inputs of its LM head
    ([windows, seq, hidden], ~47 MB for 40x512 on SmolLM2) plus a frozen copy of the head,
    so reference logits cost one head matmul instead of a full forward pass; for an
    encoder the mean-pooled output embeddings."""

    hidden: torch.Tensor
    head: nn.Module | None = None

    def logits(self, index: slice) -> torch.Tensor:
        assert self.head is not None
        return self.head(self.hidden[index])


def _capture_head_inputs(model: nn.Module, head_name: str, store: list[torch.Tensor]):
    head = model.get_submodule(head_name)
    return head.register_forward_pre_hook(lambda _m, args: store.append(args[0].detach().clone()))


def _identity_track(iterable: Any, description: str = "", total: int | None = None) -> Any:
    return iterable


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) at every position, nats: sum over the vocabulary (last dim) of
    p_ref (log p_ref - log p_model), from log-probabilities. The one definition of the KL
    that evaluation reports, distillation and learned slicing train on and editors check
    their edits with, so those numbers are the same quantity."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def logits_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(ref || model), from two sets of logits (taken in fp32)."""
    return kl_per_token(ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)).mean()


def _compare(ref_logits: torch.Tensor, logp: torch.Tensor, kl_mean: Any, top1_mean: Any) -> None:
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = kl_per_token(ref_logp, logp)
    kl_mean.update(kl.reshape(-1))
    top1_mean.update((ref_logp.argmax(-1) == logp.argmax(-1)).float().reshape(-1))


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceCache | None = None,
    batch_size: int = 4,
    track: Track = _identity_track,
    description: str = "evaluate",
    cache_head: str | None = None,
    previous: ReferenceCache | None = None,
) -> tuple[dict[str, float], ReferenceCache | None] | dict[str, float]:
    """Metrics of `model` on `windows`; against `reference` (a model, or the cache a
    previous call returned) also KL and top-1 agreement; against `previous` (the cache of
    an earlier model of the same run, e.g. the one before an edit) also ``kl_to_previous``
    and ``top1_to_previous``. With cache_head (the LM head's module name) it also returns
    the ReferenceCache of this model's outputs."""
    from torchmetrics.aggregation import MeanMetric, SumMetric  # heavy: only when evaluating

    model.eval()
    # nan_strategy="disable": torchmetrics' default drops NaNs with a warning, which would
    # score a NaN model as perplexity 1.0; keep them so _check_finite refuses the result.
    nll_sum, token_count = SumMetric(nan_strategy="disable"), SumMetric(nan_strategy="disable")
    kl_mean, top1_mean = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
    kl_prev, top1_prev = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
    batches = list(windows.split(batch_size))
    captured: list[torch.Tensor] = []
    hook = _capture_head_inputs(model, cache_head, captured) if cache_head else None
    start = 0
    try:
        for batch in track(batches, description=description, total=len(batches)):
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            logp = F.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll_sum.update(nll.sum())
            token_count.update(torch.tensor(float(nll.numel())))
            index = slice(start, start + batch.shape[0])
            start += batch.shape[0]
            if previous is not None:
                _compare(previous.logits(index), logp, kl_prev, top1_prev)
            if reference is None:
                continue
            if isinstance(reference, ReferenceCache):
                ref_logits = reference.logits(index)
            else:
                ref_logits = reference(input_ids=batch).logits
            _compare(ref_logits, logp, kl_mean, top1_mean)
    finally:
        if hook is not None:
            hook.remove()
    tokens = float(token_count.compute())
    mean_nll = float(nll_sum.compute()) / tokens
    out = {"nll": mean_nll, "perplexity": math.exp(mean_nll), "tokens": tokens}
    if reference is not None:
        out["kl"] = float(kl_mean.compute())
        out["top1_agreement"] = float(top1_mean.compute())
    if previous is not None:
        out["kl_to_previous"] = float(kl_prev.compute())
        out["top1_to_previous"] = float(top1_prev.compute())
    _check_finite(out, description)
    if cache_head is None:
        return out
    head = copy.deepcopy(model.get_submodule(cache_head)).eval()
    return out, ReferenceCache(hidden=torch.cat(captured), head=head)


@torch.no_grad()
def evaluate_encoder(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceCache | None = None,
    batch_size: int = 8,
    track: Track = _identity_track,
    description: str = "evaluate",
    cache: bool = False,
) -> tuple[dict[str, float], ReferenceCache | None] | dict[str, float]:
    """Cosine similarity of mean-pooled output embeddings to the reference's."""
    from torchmetrics.aggregation import MeanMetric

    model.eval()
    cos_mean, norm_mean = MeanMetric(nan_strategy="disable"), MeanMetric(nan_strategy="disable")
    batches = list(windows.split(batch_size))
    pooled: list[torch.Tensor] = []
    start = 0
    for batch in track(batches, description=description, total=len(batches)):
        emb = model(input_ids=batch).last_hidden_state.float().mean(dim=1)
        pooled.append(emb)
        norm_mean.update(emb.norm(dim=-1))
        index = slice(start, start + batch.shape[0])
        start += batch.shape[0]
        if reference is not None:
            if isinstance(reference, ReferenceCache):
                ref = reference.hidden[index]
            else:
                ref = reference(input_ids=batch).last_hidden_state.float().mean(dim=1)
            cos_mean.update(F.cosine_similarity(emb, ref, dim=-1))
    out = {"embedding_norm": float(norm_mean.compute()), "windows": float(windows.shape[0])}
    if reference is not None:
        out["cosine_to_reference"] = float(cos_mean.compute())
    _check_finite(out, description)
    return (out, ReferenceCache(hidden=torch.cat(pooled))) if cache else out


def _check_finite(metrics: dict[str, float], where: str) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise SculptError(
            f"eval: {', '.join(bad)} is not finite during '{where}' (NaN/Inf in the model's outputs)"
        )
