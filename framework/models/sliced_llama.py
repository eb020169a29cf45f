"""A Llama whose residual shortcuts carry a matrix: the model class of SliceGPT's
per-layer slicing (Ashkboos et al., 2024, arXiv:2401.15024; framework.transforms.slicing).

Each point of the residual stream (the input of every attention and MLP, and the final
norm's) is written in its own orthonormal basis, so a block's residual add must change
basis on the shortcut: h <- h S_attn + attn(norm(h)) and h <- h S_mlp + mlp(norm(h)), with
S [hidden, hidden] held as a bias-free nn.Linear (`attn_shortcut`, `mlp_shortcut`; weight
S^T). Everything else is stock Llama, so the ArchMap of the llama family applies.

`import framework.models` registers the config (model_type "sculpt_sliced_llama") and the
model with transformers' Auto classes: a saved folder then reloads with
`AutoModelForCausalLM.from_pretrained`, in a process that imported sculpt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import initialization as init
from transformers.initialization import no_init_weights
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

from framework.models.arch import ARCH_MAPS

MODEL_TYPE = "sculpt_sliced_llama"


class SlicedLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE


class Shortcut(nn.Linear):
    """The [hidden, hidden] change of basis on a residual shortcut (identity at init)."""

    def __init__(self, width: int):
        super().__init__(width, width, bias=False)
        nn.init.eye_(self.weight)


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with a linear map on each residual shortcut."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_shortcut = Shortcut(config.hidden_size)
        self.mlp_shortcut = Shortcut(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = self.attn_shortcut(hidden_states) + attn
        mlp = self.mlp(self.post_attention_layernorm(hidden_states))
        return self.mlp_shortcut(hidden_states) + mlp


class _IdentityShortcuts:
    """Weight init that leaves every Shortcut the identity (a fresh model is a Llama)."""

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Shortcut):
            init.eye_(module.weight)
        else:
            super()._init_weights(module)  # type: ignore[misc]


class SlicedLlamaModel(_IdentityShortcuts, LlamaModel):
    config_class = SlicedLlamaConfig

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [SlicedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()


class SlicedLlamaForCausalLM(_IdentityShortcuts, LlamaForCausalLM):
    config_class = SlicedLlamaConfig
    _no_split_modules = ("SlicedLlamaDecoderLayer",)

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        self.model = SlicedLlamaModel(config)
        self.post_init()


@torch.no_grad()
def to_sliced_llama(model: LlamaForCausalLM) -> SlicedLlamaForCausalLM:
    """The same function as `model` (a Llama-family causal LM with an untied head) in the
    sliced class, every shortcut the identity; its weights are copies."""
    if model.config.tie_word_embeddings:
        raise ValueError("to_sliced_llama: untie the LM head first (each end gets its basis)")
    settings = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
    config = SlicedLlamaConfig(**settings)
    config.architectures = [SlicedLlamaForCausalLM.__name__]
    param = next(model.parameters())
    with no_init_weights():  # every tensor is overwritten below
        out = SlicedLlamaForCausalLM(config).to(device=param.device, dtype=param.dtype)
    state = dict(model.state_dict())
    for name, value in out.state_dict().items():
        if "shortcut" in name:
            state[name] = torch.eye(value.shape[0], dtype=value.dtype)
    out.load_state_dict(state, strict=True)
    out.train(model.training)
    return out


def register() -> None:
    """Make the class loadable by the Auto classes and known to arch_for (llama's map)."""
    AutoConfig.register(MODEL_TYPE, SlicedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM, exist_ok=True)
    ARCH_MAPS.setdefault(MODEL_TYPE, ARCH_MAPS["llama"])


register()
