"""The steer editor on the tiny Llama: ablation leaves every later reader blind to the
direction (concept means and SAE features), addition shifts the stream by alpha along it
and survives save_pretrained + from_pretrained, and bad settings name their key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from framework.dictionary import Dictionary, save_dictionary
from framework.errors import ConfigError
from framework.models import build_tiny_llama
from framework.transforms.readers import reader_groups
from plugins.editors.steer import Steer


def _unit(seed: int, width: int = 64) -> torch.Tensor:
    v = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def _assert_readers_blind(model, arch, layer: int, u: torch.Tensor) -> None:
    groups = reader_groups(model, arch, layer)
    assert len(groups) == 2 * (2 - layer - 1) + 1  # q/k/v + gate/up per later block, head
    for norm, readers in groups:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))  # gain folded
        for lin in readers:
            response = (lin.weight.double() @ u.double()).norm() / lin.weight.double().norm()
            assert response < 1e-6


def test_ablate_concept_direction(tiny, ctx) -> None:
    ids = ctx.evaluation_windows[:1]
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
    result = Steer(mode="ablate", source="concept", layer=0).edit(tiny.model, ctx)
    m = result.metrics
    assert m["projection_abs_before"] > 1e-3
    assert m["projection_abs_after_at_readers"] < 1e-9 * m["projection_abs_before"] + 1e-12
    assert m["reader_response_before"] > 0.1 and m["reader_response_after"] < 1e-6
    assert m["head_untied"] == 1.0
    # The fold (readers normalise by rms(h)) against the projection applied exactly.
    assert 0 <= m["fold_approx_kl"] < 1e-3
    with torch.no_grad():
        after = tiny.model(input_ids=ids).logits
    assert not torch.allclose(before, after)  # something was removed
    # The direction the plugin ablated: recomputed from the concept file, the readers
    # after block 0 no longer respond to it.
    from framework.concepts import load_labelled, sentence_states

    lab = load_labelled("experiments/data/concept_animals_tools.jsonl")
    fresh = build_tiny_llama()  # the same seed: blocks up to 0 are as the plugin saw them
    states = sentence_states(fresh.model, fresh.arch, fresh.tokenizer, lab.texts, [0])[0]
    pos = lab.labels == len(lab.classes) - 1
    u = states[pos].mean(0) - states[~pos].mean(0)
    _assert_readers_blind(tiny.model, tiny.arch, 0, u / u.norm())


def test_ablate_dictionary_feature(tiny, ctx, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(64, 32, generator=g)
    dec = dec / dec.norm(dim=0)
    d = Dictionary(
        encoder_weight=dec.T.clone(),
        encoder_bias=torch.zeros(32),
        decoder_weight=dec,
        decoder_bias=torch.zeros(64),
        k=4,
        layer=0,
    )
    path = save_dictionary(tmp_path / "dictionary.safetensors", d)
    result = Steer(mode="ablate", source="dictionary", path=str(path), feature=5).edit(
        tiny.model, ctx
    )
    m = result.metrics
    assert m["layer"] == 0  # the dictionary's layer
    assert "feature_mean_before" in m and "feature_mean_after_at_readers" in m
    assert m["projection_abs_after_at_readers"] < 1e-9
    _assert_readers_blind(tiny.model, tiny.arch, 0, dec[:, 5])


def test_add_shifts_the_stream_and_survives_reload(tiny, ctx, tmp_path: Path) -> None:
    u = _unit(3)
    save_file({"direction": 2.5 * u}, str(tmp_path / "v.safetensors"))
    plugin = Steer(mode="add", source="vector", path=str(tmp_path / "v.safetensors"), alpha=6.0)
    result = plugin.edit(tiny.model, ctx)
    m = result.metrics
    assert m["projection_shift"] == pytest.approx(6.0, rel=1e-4)
    assert m["promoted_prob_after"] > m["promoted_prob_before"]
    assert len(result.tables["promoted_tokens"]) == 10
    down = tiny.model.model.layers[1].mlp.down_proj  # layer null: the middle block of 2
    assert torch.allclose(down.bias, 6.0 * u, atol=1e-6)
    assert tiny.model.config.mlp_bias

    tiny.model.save_pretrained(tmp_path / "saved", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = ctx.evaluation_windows[:1]
    with torch.no_grad():
        a = tiny.model.eval()(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert torch.equal(reloaded.model.layers[1].mlp.down_proj.bias, down.bias)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"mode": "remove"}, "mode"),
        ({"source": "sae"}, "source"),
        ({"source": "dictionary", "path": "x.safetensors"}, "feature"),
        ({"alpha": float("inf")}, "alpha"),
        ({"windows": 0}, "windows"),
        ({"path": " "}, "path"),
    ],
)
def test_bad_values_are_refused(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Steer(**kwargs)
    assert info.value.argument == key


def test_bad_values_found_at_edit_time(tiny, ctx, tmp_path: Path) -> None:
    save_file({"a": _unit(0), "b": _unit(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError) as info:
        Steer(source="vector", path=str(tmp_path / "two.safetensors")).edit(tiny.model, ctx)
    assert info.value.argument == "key"
    save_file({"a": _unit(0, 10)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError) as info:
        Steer(source="vector", path=str(tmp_path / "short.safetensors")).edit(tiny.model, ctx)
    assert info.value.argument == "path"
    with pytest.raises(ConfigError) as info:
        Steer(layer=5).edit(tiny.model, ctx)
    assert info.value.argument == "layer"
    with pytest.raises(ConfigError) as info:
        Steer(positive="fish").edit(tiny.model, ctx)
    assert info.value.argument == "positive"
