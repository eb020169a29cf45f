"""What every transform needs: the parts of a block found through the ArchMap, the
attention shape (heads, key/value heads, head width), and exact in-place updates of a
linear's input or output side, computed in float64 and stored back in the weight's dtype.

Conventions: a linear computes y = x W^T + b with W [out, in] and activations as row
vectors. An input-side change is written as the matrix the weights are multiplied by on
the right (W' = W A, the bias unchanged), an output-side change as the matrix they are
multiplied by on the left (W' = B W, b' = B b), so each transform states both factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap, blocks


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA): query head h reads kv head h // group."""
        return self.heads // self.kv_heads


@dataclass
class BlockParts:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_in: list[nn.Linear]
    mlp_out: nn.Linear
    attn_norm: nn.Module | None
    mlp_norm: nn.Module | None


def _module(root: nn.Module, dotted: str, what: str) -> nn.Module:
    try:
        return root.get_submodule(dotted)
    except AttributeError as exc:
        raise SculptError(f"transforms: no module '{dotted}' ({what})") from exc


def _linear(root: nn.Module, dotted: str, what: str) -> nn.Linear:
    layer = _module(root, dotted, what)
    if not isinstance(layer, nn.Linear):
        raise SculptError(f"transforms: '{dotted}' ({what}) is {type(layer).__name__}, not Linear")
    return layer


def block_parts(model: nn.Module, arch: ArchMap) -> list[BlockParts]:
    out = []
    for block in blocks(model, arch):
        out.append(
            BlockParts(
                q=_linear(block, arch.q, "query projection"),
                k=_linear(block, arch.k, "key projection"),
                v=_linear(block, arch.v, "value projection"),
                o=_linear(block, arch.o, "attention output projection"),
                mlp_in=[_linear(block, n, "MLP input projection") for n in arch.mlp_in],
                mlp_out=_linear(block, arch.mlp_out, "MLP output projection"),
                attn_norm=_module(block, arch.attn_norm, "attention norm")
                if arch.attn_norm
                else None,
                mlp_norm=_module(block, arch.mlp_norm, "MLP norm") if arch.mlp_norm else None,
            )
        )
    return out


def require(arch: ArchMap, field: str, why: str) -> None:
    """A transform that needs a part the family's map does not name fails here, naming it."""
    if getattr(arch, field) in (None, False):
        raise SculptError(
            f"transforms: the '{arch.family}' architecture map has no {field} ({why}); "
            "supported: llama-family decoders (llama, mistral, qwen2)"
        )


def attention_shape(model: nn.Module, arch: ArchMap) -> AttentionShape:
    config = getattr(model, "config", None)
    heads = getattr(config, arch.num_heads_attr, None)
    if not isinstance(heads, int):
        raise SculptError(f"transforms: model.config has no '{arch.num_heads_attr}'")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q = _linear(blocks(model, arch)[0], arch.q, "query projection")
    k = _linear(blocks(model, arch)[0], arch.k, "key projection")
    head_dim = getattr(config, "head_dim", None) or q.out_features // heads
    if q.out_features != heads * head_dim or k.out_features != kv_heads * head_dim:
        raise SculptError(
            f"transforms: q/k widths {q.out_features}/{k.out_features} do not match "
            f"{heads} heads, {kv_heads} kv heads of width {head_dim}"
        )
    if heads % kv_heads:
        raise SculptError(f"transforms: {heads} heads not divisible by {kv_heads} kv heads")
    partial = getattr(config, "partial_rotary_factor", 1.0)
    if arch.rotary and partial not in (None, 1.0):
        raise SculptError(
            f"transforms: partial rotary embeddings (partial_rotary_factor={partial}) "
            "are not supported"
        )
    return AttentionShape(heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def is_rmsnorm(norm: nn.Module) -> bool:
    """Scale-only norm x / rms(x) * g: a weight vector, no bias, no mean subtraction."""
    return (
        not isinstance(norm, nn.LayerNorm)
        and isinstance(getattr(norm, "weight", None), torch.Tensor)
        and getattr(norm, "bias", None) is None
        and "rms" in type(norm).__name__.lower()
    )


@torch.no_grad()
def set_weight(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def transform_input(layer: nn.Linear, right: torch.Tensor) -> None:
    """W' = W A (the input side; the bias is unchanged)."""
    w = layer.weight.data.double()
    set_weight(layer.weight, w @ right.to(device=w.device, dtype=torch.float64))


@torch.no_grad()
def transform_output(layer: nn.Linear, left: torch.Tensor) -> None:
    """W' = B W, b' = B b (the output side)."""
    b64 = left.to(device=layer.weight.device, dtype=torch.float64)
    set_weight(layer.weight, b64 @ layer.weight.data.double())
    if layer.bias is not None:
        set_weight(layer.bias, b64 @ layer.bias.data.double())


@torch.no_grad()
def scale_input(layer: nn.Linear, scale: torch.Tensor) -> None:
    """W' = W diag(s): column j times s_j."""
    w = layer.weight.data.double()
    set_weight(layer.weight, w * scale.to(device=w.device, dtype=torch.float64)[None, :])


@torch.no_grad()
def scale_output(layer: nn.Linear, scale: torch.Tensor) -> None:
    """W' = diag(s) W, b' = s * b: row i times s_i."""
    s = scale.to(device=layer.weight.device, dtype=torch.float64)
    set_weight(layer.weight, layer.weight.data.double() * s[:, None])
    if layer.bias is not None:
        set_weight(layer.bias, layer.bias.data.double() * s)


def block_diag_heads(mats: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """[n, h, h] -> the block-diagonal [n*repeat*h, ...] matrix, each block repeated
    `repeat` times in a row (one per query head of a GQA group)."""
    blocks_ = mats.repeat_interleave(repeat, dim=0) if repeat > 1 else mats
    return torch.block_diag(*blocks_)
