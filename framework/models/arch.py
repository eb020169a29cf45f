"""Architecture maps: declarative names of each family's parts, so plugins never branch on
model type. Add a family by adding one ArchMap to ARCH_MAPS."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from framework.errors import SculptError


@dataclass(frozen=True)
class ArchMap:
    family: str
    causal: bool
    blocks: str  # dotted path from the top-level model to the ModuleList of blocks
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # up (and gate) projections, relative to a block
    mlp_out: str
    attn_norm: str | None
    mlp_norm: str | None
    final_norm: str | None
    embed: str
    head: str | None  # None: no LM head (encoders)
    num_heads_attr: str = "num_attention_heads"
    # The config field holding the MLP's width (what a physically narrower MLP changes).
    intermediate_attr: str = "intermediate_size"
    # The MLP input projection that enters the block linearly (Llama's up_proj, multiplied
    # by the gate's activation): per-neuron scalings fold through it exactly. None: every
    # MLP input passes through a nonlinearity (framework.transforms needs it to scale).
    mlp_up: str | None = None
    # Rotary position embeddings in the rotate_half layout (pairs i, i + head_dim/2): only
    # rotations inside those planes commute with them (framework.transforms).
    rotary: bool = False

    def linear_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)


_LLAMA = ArchMap(
    family="llama",
    causal=True,
    blocks="model.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    final_norm="model.norm",
    embed="model.embed_tokens",
    head="lm_head",
    mlp_up="mlp.up_proj",
    rotary=True,
)

_OPT = ArchMap(
    family="opt",
    causal=True,
    blocks="model.decoder.layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    mlp_in=("fc1",),
    mlp_out="fc2",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    final_norm="model.decoder.final_layer_norm",
    embed="model.decoder.embed_tokens",
    head="lm_head",
    intermediate_attr="ffn_dim",
)

_BERT = ArchMap(
    family="bert",
    causal=False,
    blocks="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    mlp_in=("intermediate.dense",),
    mlp_out="output.dense",
    attn_norm=None,  # BERT is post-norm: its LayerNorms sit after the residual adds
    mlp_norm=None,
    final_norm=None,
    embed="embeddings.word_embeddings",
    head=None,
)

# model.config.model_type -> map. Llama-shaped decoders share one map.
ARCH_MAPS: dict[str, ArchMap] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "opt": _OPT,
    "bert": _BERT,
}


def arch_for(model: nn.Module) -> ArchMap:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCH_MAPS:
        raise SculptError(
            f"model: unsupported architecture '{model_type}' (model.config.model_type); "
            f"supported: {', '.join(sorted(ARCH_MAPS))}"
        )
    arch = ARCH_MAPS[model_type]
    # An encoder wrapped for a task (e.g. BertForMaskedLM) carries a prefix; find the blocks.
    if _get(model, arch.blocks) is None:
        raise SculptError(
            f"model: {type(model).__name__} has no '{arch.blocks}' (expected by the "
            f"{arch.family} architecture map); load the bare model class"
        )
    return arch


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    try:
        return module.get_submodule(dotted)
    except AttributeError:
        return None


def blocks(model: nn.Module, arch: ArchMap) -> nn.ModuleList:
    found = _get(model, arch.blocks)
    assert isinstance(found, nn.ModuleList)
    return found


def block_linears(model: nn.Module, arch: ArchMap) -> dict[str, nn.Linear]:
    """The nn.Linear layers inside the blocks, in block order: what PROTOCOL.md compresses."""
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks(model, arch)):
        for rel in arch.linear_names():
            layer = _get(block, rel)
            if not isinstance(layer, nn.Linear):
                raise SculptError(
                    f"model: block {i} has no nn.Linear at '{rel}' ({arch.family} map); "
                    "unsupported variant of the architecture"
                )
            out[f"{arch.blocks}.{i}.{rel}"] = layer
    return out
