"""LEACE editor on the tiny Llama: the erased layer's class means coincide, the edit lives
in the weights (saves and reloads as a plain checkpoint) and the head keeps its weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from framework.concepts import transfer_accuracy
from framework.errors import ConfigError, SculptError
from framework.interventions import residual_stream
from framework.models import build_tiny_llama
from plugins.editors.leace import Leace, class_mean_gap, fold_into_readers, untie_head


@pytest.fixture
def concept_file(tmp_path):
    a = ["cat", "dog", "cow", "fox", "owl", "pig", "rat", "eel", "elk", "emu", "yak", "bee"]
    t = ["saw", "axe", "awl", "hoe", "vise", "file", "rake", "drill", "plane", "clamp"]
    frames = ["the {} is here.", "I saw a {} today.", "a {} sat there."]
    rows = [{"text": f.format(w), "label": "animal", "group": w} for w in a for f in frames]
    rows += [{"text": f.format(w), "label": "tool", "group": w} for w in t for f in frames]
    path = tmp_path / "concept.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("text", "label")}) + "\n" for r in rows))
    (tmp_path / "grouped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_writers_fold_puts_the_eraser_exactly_on_the_stream(
    tiny, ctx, concept_file, tmp_path
) -> None:
    model = tiny.model.eval()
    head_before = model.lm_head.weight.detach().clone()
    editor = Leace(data=str(concept_file), layer=0, placement="writers", max_over_baseline=None)
    result = editor.edit(model, ctx)
    assert result.metrics["head_untied"] == 1.0
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head_before)  # the head still reads the old rows

    # every write into the stream up to the layer passed through the folded map T, so on
    # any text the stream there lies in T's range: T's left null space annihilates it
    total = load_file(result.artifacts["eraser"])["eraser"].double()
    u, s, _ = torch.linalg.svd(total)
    null = u[:, s < 1e-6 * s.max()]
    assert null.shape[1] >= 1
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    stream = residual_stream(model, tiny.arch, ids)[0].double()
    assert float((stream @ null).abs().max()) < 1e-4 * float(stream.abs().max())

    with torch.no_grad():
        edited = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not reloaded.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, edited)


def test_readers_fold(tiny, ctx, concept_file) -> None:
    model = tiny.model.eval()
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # the identity folds exactly (norm gains moved into the readers)
    untie_head(model, model.model.embed_tokens, model.lm_head)
    fold_into_readers(model, tiny.arch, 0, torch.eye(64, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.model.norm.weight, torch.ones(64))

    fresh = type(tiny)(**{**tiny.__dict__, "model": build_tiny_llama().model.eval()})
    result = Leace(data=str(concept_file), layer=0, max_over_baseline=None).edit(fresh.model, ctx)
    m = result.metrics
    # fitted once on states the edit leaves alone: E h has equal class means there
    assert m["class_mean_gap_fit_after"] < 1e-9
    assert m["cross_cov_residual"] < 1e-9
    assert 0 <= m["fold_approx_kl"] < 0.05
    # a probe learned from the erased fitted half does no better than a constant on the
    # held-out half (LEACE's guarantee), while the same probe on the unedited states did
    assert m["transfer_probe_before"] > m["transfer_baseline"] + 0.2
    assert m["transfer_over_baseline_after"] <= 0.05
    assert "control_after" not in m and "class_signal_left" not in m  # the file names no groups


def test_group_checks_when_the_file_names_groups(tiny, ctx, concept_file) -> None:
    grouped = concept_file.with_name("grouped.jsonl")  # the same sentences, each with its noun
    m = Leace(data=str(grouped), layer=0, max_over_baseline=None).edit(tiny.model.eval(), ctx)
    m = m.metrics
    for when in ("before", "after"):
        for key in (f"probe_{when}_unseen_groups", f"control_{when}"):
            assert 0.0 <= m[key] <= 1.0
        assert m[f"selectivity_{when}"] == pytest.approx(m[f"probe_{when}"] - m[f"control_{when}"])
    # split by group: the held-out half holds only nouns the eraser was not fitted on
    by_noun = Leace(data=str(grouped), layer=0, split_by="groups", max_over_baseline=None)
    m = by_noun.edit(build_tiny_llama().model.eval(), ctx).metrics
    assert m["fit_examples"] == 3 * (6 + 5) and m["heldout_examples"] == 3 * (6 + 5)  # nouns
    with pytest.raises(ConfigError, match=r"split_by: groups: .*concept\.jsonl names no"):
        Leace(data=str(concept_file), layer=0, split_by="groups").edit(tiny.model, ctx)
    with pytest.raises(ConfigError, match="split_by"):
        Leace(split_by="nouns")


def test_class_signal_left_on_unseen_groups(tiny, ctx, tmp_path) -> None:
    # Each class has frames of its own, so the class is carried by words every one of its
    # nouns shares: an eraser fitted on some nouns removes much of it from the others too
    # (not all: 5 fitted nouns a class estimate the direction roughly; 0.55 here).
    words = {
        "animal": ["cat", "dog", "cow", "fox", "owl", "pig", "rat", "eel", "elk", "emu", "yak"],
        "tool": ["saw", "axe", "awl", "hoe", "vise", "file", "rake", "drill", "plane", "clamp"],
    }
    frames = {
        "animal": ["the {} ran off.", "a {} ate grass.", "my {} is asleep."],
        "tool": ["cut it with a {}.", "the {} is sharp.", "a {} on the bench."],
    }
    rows = [
        {"text": f.format(w), "label": label, "group": w}
        for label in words
        for w in words[label]
        for f in frames[label]
    ]
    path = tmp_path / "frames.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    editor = Leace(data=str(path), layer=0, split_by="groups", max_over_baseline=None)
    m = editor.edit(tiny.model.eval(), ctx).metrics
    assert 0.0 <= m["class_signal_left"] < 0.8


def test_transfer_accuracy_scores_a_probe_learned_elsewhere() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    x[:, 0] += 3.0 * y  # separable along one axis
    acc, base = transfer_accuracy(x[:100], y[:100], x[100:], y[100:])
    assert acc > 0.9 and base == pytest.approx(0.5)
    x[:, 0] -= 3.0 * y
    acc, _ = transfer_accuracy(x[:100], y[:100], x[100:], y[100:])
    assert acc < 0.7


def test_class_mean_gap() -> None:
    x = torch.tensor([[0.0, 1.0], [0.0, -1.0], [2.0, 1.0], [2.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert class_mean_gap(x, y) == pytest.approx(1 / 2**0.5)
    assert class_mean_gap(x[:, 1:], y) == 0.0


def test_bad_arguments(tiny, ctx, concept_file) -> None:
    with pytest.raises(ConfigError, match="fit_fraction"):
        Leace(data=str(concept_file), fit_fraction=1.0)
    with pytest.raises(ConfigError, match="layer"):
        Leace(data=str(concept_file), layer=7).edit(tiny.model, ctx)
    with pytest.raises(SculptError, match=r"missing\.jsonl does not exist"):
        Leace(data="missing.jsonl").edit(tiny.model, ctx)
