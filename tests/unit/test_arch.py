"""Architecture maps: the tiny Llama's parts are found by name; an unknown family is a
clear error naming it."""

from __future__ import annotations

import pytest
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel

from framework.errors import SculptError
from framework.models import ARCH_MAPS, arch_for, block_linears, blocks, build_tiny_llama


def test_tiny_llama_map(tiny) -> None:
    arch = tiny.arch
    assert arch is ARCH_MAPS["llama"] and arch_for(tiny.model) is arch
    assert arch.family == "llama" and arch.causal
    model = tiny.model
    assert isinstance(model.get_submodule(arch.embed), nn.Embedding)
    assert isinstance(model.get_submodule(arch.head), nn.Linear)
    assert model.get_submodule(arch.final_norm) is model.model.norm
    block = blocks(model, arch)[0]
    assert block.get_submodule(arch.q) is block.self_attn.q_proj
    assert block.get_submodule(arch.o) is block.self_attn.o_proj
    assert block.get_submodule(arch.mlp_out) is block.mlp.down_proj
    assert block.get_submodule(arch.attn_norm) is block.input_layernorm
    assert block.get_submodule(arch.mlp_norm) is block.post_attention_layernorm
    assert getattr(model.config, arch.num_heads_attr) == 4


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_block_linears_are_seven_per_layer(layers: int) -> None:
    loaded = build_tiny_llama(layers=layers)
    linears = block_linears(loaded.model, loaded.arch)
    assert len(blocks(loaded.model, loaded.arch)) == layers
    assert len(linears) == 7 * layers
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert list(linears)[:7] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    named = dict(loaded.model.named_modules())
    assert all(named[name] is module for name, module in linears.items())
    # embeddings and the (tied) head are not block linears
    assert "lm_head" not in linears and not any("embed" in n for n in linears)


def test_tiny_llama_shapes() -> None:
    loaded = build_tiny_llama(hidden=64, intermediate=176, heads=4, kv_heads=2)
    linears = block_linears(loaded.model, loaded.arch)
    assert linears["model.layers.0.self_attn.q_proj"].weight.shape == (64, 64)
    assert linears["model.layers.0.self_attn.k_proj"].weight.shape == (32, 64)  # 2 kv heads
    assert linears["model.layers.1.mlp.down_proj"].weight.shape == (64, 176)


def test_unknown_model_type_names_it() -> None:
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    )
    with pytest.raises(SculptError, match=r"^model: unsupported architecture 'gpt2'") as err:
        arch_for(model)
    assert "llama" in str(err.value)  # lists what is supported


def test_model_without_config_is_unsupported() -> None:
    with pytest.raises(SculptError, match="unsupported architecture 'None'"):
        arch_for(nn.Linear(2, 2))


def test_missing_blocks_names_the_path() -> None:
    """A bare LlamaModel has model_type 'llama' but its blocks sit at 'layers'."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(SculptError, match=r"has no 'model\.layers'"):
        arch_for(LlamaModel(config))
