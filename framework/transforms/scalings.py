"""Per-channel scalings moved between a producer and the linear that reads it: the
SmoothQuant (Xiao et al., 2023, arXiv:2211.10438) / AWQ (Lin et al., 2024,
arXiv:2306.00978) symmetry, used there to move activation outliers into weights.

Group: the diagonal group diag(s), s > 0 (any nonzero s is exact where the producer is
linear; positive keeps signs, and is what SmoothQuant/AWQ search over), acting on

* a norm's output channels: g -> g / s in the norm, W -> W diag(s) in every reader
  (attention norm -> q, k, v; MLP norm -> gate, up). Exact: the norm is linear in g.
* the MLP's neurons through its linear branch: up rows -> times s, down columns -> / s.
  Exact because SiLU(gate) * up is linear in up; the gate's rows are NOT scalable
  (SiLU(s z) != s SiLU(z)), which the tests check.
* value channels: v rows -> times s, the output projection's matching columns of every
  query head of the kv group -> / s (attention is linear in the values).
* RoPE planes of queries and keys: q's two rows of plane (i, i + h/2) -> times c, k's ->
  / c. One scalar per plane, not per coordinate: a scalar commutes with RoPE's rotation
  of the plane, a non-uniform diagonal does not. q . k is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap
from framework.transforms.common import (
    AttentionShape,
    BlockParts,
    is_rmsnorm,
    require,
    scale_input,
    scale_output,
    set_weight,
)


def _positive(s: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if s.shape != (n,):
        raise SculptError(f"transforms: {what} scales have shape {tuple(s.shape)}, expected ({n},)")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise SculptError(f"transforms: {what} scales must be finite and positive")
    return s.double()


@torch.no_grad()
def scale_norm_readers(norm: nn.Module, readers: list[nn.Linear], s: torch.Tensor) -> None:
    """Norm output channel j divided by s_j, every reader's column j multiplied by it."""
    if not is_rmsnorm(norm):
        raise SculptError(f"transforms: {type(norm).__name__} is not a scale-only RMSNorm")
    s = _positive(s, norm.weight.shape[0], "norm")
    set_weight(norm.weight, norm.weight.data.double() / s)
    for layer in readers:
        scale_input(layer, s)


def scale_attention_input(parts: BlockParts, s: torch.Tensor) -> None:
    assert parts.attn_norm is not None
    scale_norm_readers(parts.attn_norm, [parts.q, parts.k, parts.v], s)


def scale_mlp_input(parts: BlockParts, s: torch.Tensor) -> None:
    assert parts.mlp_norm is not None
    scale_norm_readers(parts.mlp_norm, parts.mlp_in, s)


@torch.no_grad()
def scale_mlp_neurons(block: nn.Module, arch: ArchMap, s: torch.Tensor) -> None:
    """Up-projection row i times s_i, down-projection column i divided by it."""
    require(arch, "mlp_up", "the MLP input that enters linearly (Llama's up_proj)")
    assert arch.mlp_up is not None
    up = block.get_submodule(arch.mlp_up)
    down = block.get_submodule(arch.mlp_out)
    s = _positive(s, up.out_features, "MLP neuron")
    scale_output(up, s)
    scale_input(down, 1.0 / s)


@torch.no_grad()
def scale_value_channels(parts: BlockParts, shape: AttentionShape, s: torch.Tensor) -> None:
    """Value channel c (of kv_heads * head_dim) times s_c; the output projection's column
    of that channel in every query head of the group divided by it."""
    s = _positive(s, shape.kv_heads * shape.head_dim, "value channel")
    scale_output(parts.v, s)
    per_query_head = s.view(shape.kv_heads, shape.head_dim).repeat_interleave(shape.group, dim=0)
    scale_input(parts.o, 1.0 / per_query_head.reshape(-1))


@torch.no_grad()
def scale_query_key_planes(parts: BlockParts, shape: AttentionShape, c: torch.Tensor) -> None:
    """Queries' plane p of kv group g times c[g, p], keys' divided by it ([kv, h/2])."""
    half = shape.head_dim // 2
    if c.shape != (shape.kv_heads, half):
        raise SculptError(f"transforms: plane scales have shape {tuple(c.shape)}")
    c = _positive(c.reshape(-1), shape.kv_heads * half, "query/key plane").view(-1, half)
    per_dim = torch.cat([c, c], dim=1)  # plane p covers dims p and p + h/2
    scale_output(parts.q, per_dim.repeat_interleave(shape.group, dim=0).reshape(-1))
    scale_output(parts.k, (1.0 / per_dim).reshape(-1))
