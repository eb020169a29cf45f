"""Evaluation metrics per PROTOCOL.md, checked against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from framework.errors import SculptError
from framework.eval import evaluate_causal_lm, evaluate_encoder


def _metrics(result):
    """evaluate_* may also hand back a reference cache; the metrics come first."""
    return result[0] if isinstance(result, tuple) else result


def _hand_nll(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()
            nll = F.cross_entropy(logits[:-1], w[1:], reduction="sum")
            total += float(nll)
            count += w.numel() - 1
    return total / count


def test_perplexity_is_exp_of_mean_nll(tiny, tiny_windows) -> None:
    windows = tiny_windows["evaluation"]
    got = _metrics(evaluate_causal_lm(tiny.model, windows, batch_size=1))
    nll = _hand_nll(tiny.model, windows)
    assert got["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    # a random model over 384 byte tokens is close to uniform
    assert 100 < got["perplexity"] < 1000
    assert "kl" not in got and "top1_agreement" not in got


def test_batch_size_does_not_change_the_numbers(tiny, tiny_windows) -> None:
    windows = tiny_windows["calibration"]
    a = _metrics(evaluate_causal_lm(tiny.model, windows, batch_size=1))
    b = _metrics(evaluate_causal_lm(tiny.model, windows, batch_size=3))
    assert a["tokens"] == b["tokens"]
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)


def test_kl_of_a_model_to_itself(tiny, tiny_windows) -> None:
    ref = copy.deepcopy(tiny.model)
    got = _metrics(evaluate_causal_lm(tiny.model, tiny_windows["evaluation"], reference=ref))
    assert abs(got["kl"]) < 1e-6
    assert got["top1_agreement"] == 1.0


def test_kl_and_top1_against_a_perturbed_model(tiny, tiny_windows) -> None:
    """KL(ref || model) by hand, and top-1 agreement below 1, for a perturbed model."""
    windows = tiny_windows["evaluation"]
    ref = copy.deepcopy(tiny.model)
    model = tiny.model
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    got = _metrics(evaluate_causal_lm(model, windows, reference=ref, batch_size=2))
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        lr = F.log_softmax(ref(input_ids=windows).logits[:, :-1].double(), -1)
    kl = float((lr.exp() * (lr - lp)).sum(-1).mean())
    top1 = float((lr.argmax(-1) == lp.argmax(-1)).double().mean())
    assert got["kl"] > 1e-4
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(top1, abs=1e-6)
    assert got["top1_agreement"] < 1.0


def test_nan_weights_raise(tiny, tiny_windows) -> None:
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(SculptError, match=r"^eval: .*not finite during 'after rtn'"):
        evaluate_causal_lm(tiny.model, tiny_windows["evaluation"], description="after rtn")


def _tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=384,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertModel(config).eval()


def test_encoder_cosine(tiny_windows) -> None:
    windows = tiny_windows["evaluation"]
    model = _tiny_bert()
    ref = copy.deepcopy(model)
    same = _metrics(evaluate_encoder(model, windows, reference=ref))
    assert same["cosine_to_reference"] == pytest.approx(1.0, abs=1e-6)
    assert same["windows"] == windows.shape[0]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    moved = _metrics(evaluate_encoder(model, windows, reference=ref))
    assert moved["cosine_to_reference"] < 0.99
    with torch.no_grad():
        emb = model(input_ids=windows).last_hidden_state.mean(1)
        embr = ref(input_ids=windows).last_hidden_state.mean(1)
    assert moved["cosine_to_reference"] == pytest.approx(
        float(F.cosine_similarity(emb, embr, dim=-1).mean()), rel=1e-5
    )


def test_kl_helpers_against_a_hand_computation() -> None:
    """kl_per_token is KL(ref || model) over the last dim, whatever the leading shape, and
    logits_kl its mean from raw logits; an asymmetric pair tells the direction apart."""
    from framework.eval.metrics import kl_per_token, logits_kl

    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(2, 3, 7, generator=g), 3 * torch.randn(2, 3, 7, generator=g)
    p, q = ref.double().softmax(-1), other.double().softmax(-1)
    by_hand = (p * (p / q).log()).sum(-1)
    got = kl_per_token(ref.log_softmax(-1), other.log_softmax(-1))
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), by_hand, rtol=1e-5, atol=1e-6)
    assert float(logits_kl(ref, other)) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    reverse = float((q * (q / p).log()).sum(-1).mean())
    assert abs(float(logits_kl(ref, other)) - reverse) > 1e-2
    assert float(logits_kl(ref, ref)) == pytest.approx(0.0, abs=1e-6)
