"""Folding a linear map on the residual stream into every reader after a block.

Shared by the LEACE eraser (plugins/editors/leace.py) and direction ablation
(plugins/editors/steer.py): a Llama's stream is read only through RMSNorms in front of
q/k/v, gate/up and the LM head, so "every later reader sees E h" becomes W <- W diag(g) E
with the norm's gain g set to 1. Unlike the transforms beside it this is an edit, not a
symmetry: the readers still divide by rms(h), not rms(E h), and that is the one
approximation (the callers measure it).
"""

from __future__ import annotations

import torch
from torch import nn

from framework.models.arch import ArchMap, blocks


def reader_groups(model: nn.Module, arch: ArchMap, layer: int) -> list[tuple[nn.Module, list]]:
    """(norm, linears reading it) for every reader of the stream after block ``layer``: the
    attention and MLP input projections of later blocks, and the LM head."""
    later = list(blocks(model, arch))[layer + 1 :]
    groups = [
        (
            block.get_submodule(arch.attn_norm),
            [block.get_submodule(n) for n in (arch.q, arch.k, arch.v)],
        )
        for block in later
    ] + [
        (block.get_submodule(arch.mlp_norm), [block.get_submodule(n) for n in arch.mlp_in])
        for block in later
    ]
    groups.append((model.get_submodule(arch.final_norm), [model.get_submodule(arch.head)]))
    return groups


@torch.no_grad()
def fold_into_readers(model: nn.Module, arch, layer: int, eraser: torch.Tensor) -> None:
    """Make every reader of the residual stream after block ``layer`` (the attention and
    MLP input projections of later blocks, and the LM head) read ``eraser @ h`` instead of
    ``h``, up to the RMS normalisation: each RMSNorm's gain g is folded into the linears
    it feeds, W <- W diag(g) E, and set to 1. The one approximation: the readers divide by
    rms(h), not rms(E h). A tied LM head must be untied first (the embedding would change
    with it)."""
    e = eraser.to(torch.float64)
    for norm, readers in reader_groups(model, arch, layer):
        gain = norm.weight.double()
        for lin in readers:
            lin.weight.copy_((lin.weight.double() * gain @ e).to(lin.weight.dtype))
        norm.weight.fill_(1.0)
