"""Folding norm scales into the linears that read the norm.

An RMSNorm computes n(x) * g with n(x) = x / sqrt(mean(x^2) + eps). Every reader of its
output computes (n(x) * g) W^T = n(x) (W diag(g))^T, so W <- W diag(g), g <- 1 gives the
same function exactly (up to float rounding). After folding, the norms carry no scale and
n commutes with any orthogonal Q: n(x Q) = n(x) Q because ||x Q|| = ||x||; this is the
"computational invariance" of SliceGPT (Ashkboos et al., 2024, arXiv:2401.15024, Thm. 1)
and QuaRot (Ashkboos et al., 2024, arXiv:2404.00456), and the first step of every
residual rotation in framework.transforms.rotations.

The final norm's scale goes into the LM head. With tied embeddings (SmolLM2) the head and
the embedding are one tensor, and folding a scale into one of them only is not a tied
model any more: the head is untied first (a separate copy; config.tie_word_embeddings is
set to false so the saved folder reloads untied). That costs one vocab x hidden matrix
more on disk (28.3M weights for SmolLM2-135M); callers report it.

Only scale-only norms (RMSNorm) are folded: a LayerNorm subtracts the mean, which no
rotation of the residual commutes with, and BERT-style post-norm models have no norm in
front of their linears at all; both are refused with an error naming the part.
"""

from __future__ import annotations

import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap
from framework.transforms.common import block_parts, is_rmsnorm, require, scale_input, set_weight


def _check_rms(norm: nn.Module, where: str) -> torch.Tensor:
    if not is_rmsnorm(norm):
        raise SculptError(
            f"transforms: {where} is {type(norm).__name__}; folding needs a scale-only "
            "RMSNorm (LayerNorm's mean subtraction does not commute with rotations)"
        )
    return norm.weight


def is_tied(model: nn.Module, arch: ArchMap) -> bool:
    if arch.head is None:
        return False
    head = model.get_submodule(arch.head).weight
    embed = model.get_submodule(arch.embed).weight
    return head is embed or head.data_ptr() == embed.data_ptr()


def untie_head(model: nn.Module, arch: ArchMap) -> bool:
    """Give the LM head its own copy of the tied embedding; True if it was tied."""
    if not is_tied(model, arch):
        return False
    assert arch.head is not None
    head = model.get_submodule(arch.head)
    embed = model.get_submodule(arch.embed).weight
    head.weight = nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
    # Saved with this flag the folder reloads with two tensors, not one tied to the other.
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", None)
    if callable(text) and text() is not model.config:
        text().tie_word_embeddings = False
    return True


@torch.no_grad()
def fold_norm_scales(model: nn.Module, arch: ArchMap) -> int:
    """Fold every RMSNorm scale of a pre-norm decoder into the linears reading it.

    Group: none is removed; this moves diag(g) (the positive-or-not diagonal group acting
    on the norm's output) entirely into the readers, leaving g = 1. Returns how many norms
    carried a scale other than 1 (0: already folded; calling again changes nothing).
    """
    require(arch, "attn_norm", "a norm in front of the attention: pre-norm decoders only")
    require(arch, "mlp_norm", "a norm in front of the MLP: pre-norm decoders only")
    require(arch, "final_norm", "a final norm in front of the LM head")
    require(arch, "head", "an LM head to take the final norm's scale")
    assert arch.head is not None and arch.final_norm is not None
    folded = 0
    for i, parts in enumerate(block_parts(model, arch)):
        assert parts.attn_norm is not None and parts.mlp_norm is not None
        for norm, readers, where in (
            (parts.attn_norm, [parts.q, parts.k, parts.v], arch.attn_norm),
            (parts.mlp_norm, parts.mlp_in, arch.mlp_norm),
        ):
            g = _check_rms(norm, f"block {i} '{where}'")
            folded += _fold(g, readers)
    final = model.get_submodule(arch.final_norm)
    g = _check_rms(final, f"'{arch.final_norm}'")
    if not bool((g == 1).all()):
        untie_head(model, arch)
    folded += _fold(g, [model.get_submodule(arch.head)])
    return folded


def _fold(g: torch.Tensor, readers: list[nn.Linear]) -> int:
    if bool((g == 1).all()):
        return 0
    scale = g.detach().double().clone()
    for layer in readers:
        scale_input(layer, scale)
    set_weight(g, torch.ones_like(scale))
    return 1
