"""framework.models.sliced_llama: the Llama with a matrix on each residual shortcut that
per-layer slicing produces. With identity shortcuts it is the Llama it was made from;
a non-identity shortcut changes its function; it saves with safetensors and reloads
through the Auto classes after `import framework.models`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import framework.models  # noqa: F401  (registers the sliced class)
from framework.models import LoadedModel, arch_for
from framework.models.sliced_llama import (
    MODEL_TYPE,
    SlicedLlamaConfig,
    SlicedLlamaForCausalLM,
    to_sliced_llama,
)
from framework.transforms.norms import untie_head


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_identity_shortcuts_are_the_llama(tiny: LoadedModel, ids, tmp_path) -> None:
    model = tiny.model.eval()
    untie_head(model, tiny.arch)
    sliced = to_sliced_llama(model).eval()
    assert sliced.config.model_type == MODEL_TYPE and arch_for(sliced) is tiny.arch
    assert torch.equal(_logits(sliced, ids), _logits(model, ids))
    extra = sum(p.numel() for p in sliced.parameters()) - sum(p.numel() for p in model.parameters())
    assert extra == 2 * 2 * 64 * 64  # two [64, 64] shortcuts per block, nothing else
    # A shortcut is in the forward pass: changing one changes the logits.
    with torch.no_grad():
        sliced.model.layers[1].mlp_shortcut.weight.mul_(0.5)
    changed = _logits(sliced, ids)
    assert not torch.allclose(changed, _logits(model, ids), atol=1e-3)
    sliced.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), SlicedLlamaConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(again) is SlicedLlamaForCausalLM
    assert torch.equal(_logits(again, ids), changed)


def test_fresh_model_has_identity_shortcuts() -> None:
    config = SlicedLlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    layer = SlicedLlamaForCausalLM(config).model.layers[0]
    for shortcut in (layer.attn_shortcut, layer.mlp_shortcut):
        assert torch.equal(shortcut.weight, torch.eye(16))


def test_tied_head_is_refused(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="untie"):
        to_sliced_llama(tiny.model)
