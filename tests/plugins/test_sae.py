"""The TopK sparse autoencoder analyzer on the tiny Llama: it trains under the trainer
config (conf/trainer/cpu.yaml), its dictionary file round-trips through
framework.dictionary and reproduces the reported held-out numbers, and bad settings are
refused naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from framework.config import CONF_DIR, build
from framework.dictionary import (
    DICTIONARY_FILE,
    collect_activations,
    decode,
    encode,
    fvu,
    load_dictionary,
    save_dictionary,
)
from framework.errors import ConfigError, SculptError
from framework.lightning.spec import TrainerSpec
from plugins.analyzers.sae import SparseAutoencoder, heldout_split

FEATURES, K = 128, 4


def cpu_trainer(**overrides: object) -> TrainerSpec:
    """conf/trainer/cpu.yaml, as the runner builds it, with test-sized overrides."""
    node = OmegaConf.merge(OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml"), overrides)
    spec = build(node, "trainer")
    assert isinstance(spec, TrainerSpec)
    return spec


@pytest.fixture
def trained(tiny, make_ctx, tmp_path: Path):
    ctx = make_ctx(tiny, tmp_path, stage_name="sae")
    ctx.trainer = cpu_trainer(max_steps=100, batch_size=2, log_every_n_steps=10)
    plugin = SparseAutoencoder(layer=1, features=FEATURES, k=K, heldout_fraction=0.25)
    result = plugin.analyze(tiny.model, ctx)
    return tiny, ctx, plugin, result


def test_sae_learns_and_the_file_reproduces_its_numbers(trained) -> None:
    tiny, ctx, _plugin, result = trained
    m = result.metrics
    # A random tiny Llama's stream, 189 training tokens: far below the mean's FVU of 1.
    assert m["fvu"] < 0.5, m
    assert m["fvu_train_sample"] < 0.1, m
    assert m["loss_last"] < 0.3 * m["loss_first"]
    assert m["l0"] == K  # TopK: exactly k active latents per token
    assert m["steps"] == 100 and m["batch_tokens"] == min(2 * 63, m["train_tokens"])

    path = ctx.stage_dir("sae") / DICTIONARY_FILE
    assert Path(result.artifacts["dictionary"]) == path
    d = load_dictionary(path)
    assert d.encoder_weight.shape == (FEATURES, 64) and d.decoder_weight.shape == (64, FEATURES)
    assert d.encoder_bias.shape == (FEATURES,) and d.decoder_bias.shape == (64,)
    assert torch.allclose(d.decoder_weight.norm(dim=0), torch.ones(FEATURES), atol=1e-5)
    assert (d.k, d.layer, d.site) == (K, 1, "residual")
    assert d.metadata["activation"] == "topk" and "model" in d.metadata

    # The held-out windows the plugin used, collected again: encode/decode from the file
    # give the reported FVU, L0 and dead-feature count.
    held, _ = heldout_split(ctx.calibration(), 0.25, ctx.generator())
    x = collect_activations(tiny.model, ctx.arch, held, layer=1)
    f = encode(d, x)
    assert (f != 0).sum(-1).float().mean().item() == pytest.approx(m["l0"])
    assert fvu(x, decode(d, f)) == pytest.approx(m["fvu"], rel=1e-5)
    assert int(((f != 0).sum(0) == 0).sum()) == m["dead_features"]

    assert Path(result.plots["loss"]).exists()
    assert result.tables["dictionary"][0]["k"] == K
    assert result.tables["loss"][-1]["step"] == 100


def test_dictionary_file_format(tmp_path: Path) -> None:
    from safetensors import safe_open

    from framework.dictionary import Dictionary

    g = torch.Generator().manual_seed(0)
    dec = torch.randn(8, 16, generator=g)
    d = Dictionary(
        encoder_weight=torch.randn(16, 8, generator=g),
        encoder_bias=torch.randn(16, generator=g),
        decoder_weight=dec / dec.norm(dim=0),
        decoder_bias=torch.randn(8, generator=g),
        k=3,
        layer=5,
        site="mlp",
        model="m",
    )
    path = save_dictionary(tmp_path / "d.safetensors", d)
    with safe_open(str(path), framework="pt") as fh:
        assert set(fh.keys()) == {
            "encoder.weight",
            "encoder.bias",
            "decoder.weight",
            "decoder.bias",
        }
        meta = fh.metadata()
    assert {k: meta[k] for k in ("layer", "site", "k", "activation", "model")} == {
        "layer": "5",
        "site": "mlp",
        "k": "3",
        "activation": "topk",
        "model": "m",
    }
    x = torch.randn(20, 8, generator=g)
    f = encode(load_dictionary(path), x)
    # topk(relu(W_e (x - b_d) + b_e)) by hand
    pre = torch.relu((x - d.decoder_bias) @ d.encoder_weight.T + d.encoder_bias)
    top = pre.topk(3, dim=-1)
    assert torch.allclose(f, torch.zeros_like(pre).scatter(-1, top.indices, top.values))
    assert torch.allclose(decode(d, f), f @ d.decoder_weight.T + d.decoder_bias)

    from safetensors.torch import save_file

    save_file({"encoder.weight": d.encoder_weight}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(SculptError, match=r"decoder\.weight"):
        load_dictionary(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"site": "embed"}, "site"),
        ({"features": 1}, "features"),
        ({"k": 0}, "k"),
        ({"features": 16, "k": 16}, "k"),
        ({"lr": 0.0}, "lr"),
        ({"aux_k": -1}, "aux_k"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"windows": 1}, "windows"),
        ({"batch_tokens": 0}, "batch_tokens"),
    ],
)
def test_bad_values_are_refused(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        SparseAutoencoder(**kwargs)
    assert info.value.argument == key


def test_bad_layer_and_missing_trainer(tiny, make_ctx, tmp_path: Path) -> None:
    ctx = make_ctx(tiny, tmp_path, stage_name="sae")
    with pytest.raises(ConfigError, match="trainer"):
        SparseAutoencoder(features=16, k=2).analyze(tiny.model, ctx)
    ctx.trainer = cpu_trainer(max_steps=1)
    with pytest.raises(ConfigError) as info:
        SparseAutoencoder(layer=7, features=16, k=2).analyze(tiny.model, ctx)
    assert info.value.argument == "layer"


@pytest.mark.slow
def test_smollm2_sae_briefly(compose_cfg) -> None:
    """experiment=sae on SmolLM2, cut to a few windows and steps: it runs end to end and the
    dictionary explains a good part of the held-out variance already."""
    from framework.run import run

    cfg = compose_cfg(
        [
            "experiment=sae",
            "data.calibration.windows=12",
            "data.evaluation.windows=1",
            "trainer.max_steps=40",
        ]
    )
    result = run(cfg)
    sae = next(r for r in result.stages if r.name == "analyzer")
    assert sae.metrics["l0"] == 32
    assert sae.metrics["fvu"] < 0.8
    d = load_dictionary(sae.artifacts["dictionary"])
    assert (d.layer, d.features, d.width) == (15, 4096, 576)
