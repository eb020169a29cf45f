"""Permutations of MLP neurons and attention heads.

* **MLP neurons**, group S_n (n = intermediate size): the activation acts elementwise, so
  permuting the rows of every MLP input projection (gate and up) and the columns of the
  output projection by the same permutation is exact. Permuting them differently is not.
* **Attention heads**, group S_kv wr S_r (the wreath product; kv = key/value heads, r =
  query heads per kv head): under GQA a query head must stay with the kv head it reads, so
  a permutation moves whole kv groups (k and v rows, with their query heads) and may
  reorder the query heads inside each group (q rows and the output projection's columns).
  Heads move as wholes, so RoPE's planes (i, i + h/2) inside each head stay paired.

Both are the alignments that neuron/head merging needs (e.g. Git Re-Basin, Ainsworth et
al., 2023, arXiv:2209.04836), and leave the model's function unchanged.
"""

from __future__ import annotations

import torch

from framework.errors import SculptError
from framework.transforms.common import AttentionShape, BlockParts


def _check_perm(perm: torch.Tensor, n: int, what: str) -> torch.Tensor:
    perm = torch.as_tensor(perm, dtype=torch.long)
    if perm.shape != (n,) or not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise SculptError(f"transforms: {what} permutation is not a permutation of {n}")
    return perm


@torch.no_grad()
def permute_mlp_neurons(parts: BlockParts, perm: torch.Tensor) -> None:
    """New neuron i = old neuron perm[i]."""
    n = parts.mlp_out.in_features
    perm = _check_perm(perm, n, "MLP neuron")
    for layer in parts.mlp_in:
        layer.weight.data = layer.weight.data[perm].contiguous()
        if layer.bias is not None:
            layer.bias.data = layer.bias.data[perm].contiguous()
    parts.mlp_out.weight.data = parts.mlp_out.weight.data[:, perm].contiguous()


def kv_permutation_of(head_perm: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """The kv-head permutation a query-head permutation implies, or SculptError if it
    splits a GQA group (new group j must hold exactly the query heads of one old group)."""
    head_perm = _check_perm(head_perm, shape.heads, "attention head")
    groups = (head_perm // shape.group).view(shape.kv_heads, shape.group)
    if not bool((groups == groups[:, :1]).all()):
        raise SculptError(
            "transforms: the head permutation splits a GQA group (query heads must move "
            f"with their key/value head, {shape.group} per group)"
        )
    return _check_perm(groups[:, 0], shape.kv_heads, "key/value head")


@torch.no_grad()
def permute_heads(parts: BlockParts, shape: AttentionShape, head_perm: torch.Tensor) -> None:
    """New query head i = old query head head_perm[i]; k/v heads follow their groups."""
    kv_perm = kv_permutation_of(head_perm, shape)
    _permute_heads_unchecked(parts, shape, head_perm, kv_perm)


def _permute_heads_unchecked(
    parts: BlockParts, shape: AttentionShape, head_perm: torch.Tensor, kv_perm: torch.Tensor
) -> None:
    h = shape.head_dim
    q_rows = (head_perm[:, None] * h + torch.arange(h)[None, :]).reshape(-1)
    kv_rows = (kv_perm[:, None] * h + torch.arange(h)[None, :]).reshape(-1)
    for layer, rows in ((parts.q, q_rows), (parts.k, kv_rows), (parts.v, kv_rows)):
        layer.weight.data = layer.weight.data[rows].contiguous()
        if layer.bias is not None:
            layer.bias.data = layer.bias.data[rows].contiguous()
    parts.o.weight.data = parts.o.weight.data[:, q_rows].contiguous()


def random_head_permutation(shape: AttentionShape, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random element of S_kv wr S_r, as a query-head permutation."""
    kv_perm = torch.randperm(shape.kv_heads, generator=generator)
    rows = [
        kv_perm[g] * shape.group + torch.randperm(shape.group, generator=generator)
        for g in range(shape.kv_heads)
    ]
    return torch.cat(rows)
