"""Language-model quality, per PROTOCOL.md: perplexity (exp of the mean next-token NLL over
every predicted token, fp32), mean per-token KL(reference || model) and top-1 next-token
agreement with the reference. Encoders (no LM head) are scored by the cosine similarity of
their mean-pooled output embeddings to the reference's."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric, SumMetric

from framework.errors import SculptError

Track = Callable[..., Any]


def _identity_track(iterable: Any, description: str = "", total: int | None = None) -> Any:
    return iterable


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 4,
    track: Track = _identity_track,
    description: str = "evaluate",
) -> dict[str, float]:
    model.eval()
    nll_sum, token_count = SumMetric(), SumMetric()
    kl_mean, top1_mean = MeanMetric(), MeanMetric()
    batches = list(windows.split(batch_size))
    for batch in track(batches, description=description, total=len(batches)):
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_sum.update(nll.sum())
        token_count.update(torch.tensor(float(nll.numel())))
        if reference is not None:
            ref_logp = F.log_softmax(reference(input_ids=batch).logits[:, :-1].float(), dim=-1)
            # KL(ref || model) per token = sum_v p_ref (log p_ref - log p_model)
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
            kl_mean.update(kl.reshape(-1))
            top1_mean.update((ref_logp.argmax(-1) == logp.argmax(-1)).float().reshape(-1))
    tokens = float(token_count.compute())
    mean_nll = float(nll_sum.compute()) / tokens
    out = {"nll": mean_nll, "perplexity": math.exp(mean_nll), "tokens": tokens}
    if reference is not None:
        out["kl"] = float(kl_mean.compute())
        out["top1_agreement"] = float(top1_mean.compute())
    _check_finite(out, description)
    return out


@torch.no_grad()
def evaluate_encoder(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | None = None,
    batch_size: int = 8,
    track: Track = _identity_track,
    description: str = "evaluate",
) -> dict[str, float]:
    model.eval()
    cos_mean, norm_mean = MeanMetric(), MeanMetric()
    batches = list(windows.split(batch_size))
    for batch in track(batches, description=description, total=len(batches)):
        emb = model(input_ids=batch).last_hidden_state.float().mean(dim=1)
        norm_mean.update(emb.norm(dim=-1))
        if reference is not None:
            ref = reference(input_ids=batch).last_hidden_state.float().mean(dim=1)
            cos_mean.update(F.cosine_similarity(emb, ref, dim=-1))
    out = {"embedding_norm": float(norm_mean.compute()), "windows": float(windows.shape[0])}
    if reference is not None:
        out["cosine_to_reference"] = float(cos_mean.compute())
    _check_finite(out, description)
    return out


def _check_finite(metrics: dict[str, float], where: str) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise SculptError(f"eval: {', '.join(bad)} is not finite during '{where}' (NaN/Inf in the model's outputs)")
