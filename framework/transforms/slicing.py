"""Slicing the residual stream: rotate it into a basis ordered by how much signal each
direction carries, then delete the last directions (SliceGPT, Ashkboos et al., 2024,
arXiv:2401.15024). Lossy by design: only the rotation is exact; the deletion removes what
the calibration data put in the discarded directions.

One basis for the whole stream. SliceGPT uses a basis per layer and pays for it with a
[k, k] matrix on every residual shortcut, which a plain Hugging Face decoder layer has no
place for. With one global basis every residual add stays an identity, and the sliced
model is an ordinary model of the same class with hidden_size = k (head_dim written
explicitly, so attention keeps its width): `save_pretrained` / `from_pretrained` round-trip
it with plain transformers, no custom code. The price is a basis that fits all layers
on average instead of each one (the error budget is spent where the layers disagree).

RMSNorm after slicing: a k-wide norm divides by sqrt(||x_k||^2 / k) where the full one
divided by sqrt(||x||^2 / d), so the sliced norm's output is off by sqrt(d / k) *
||x_k|| / ||x|| per token. Each norm's scale (1 after folding) is set to that factor's
calibration estimate, sqrt(d / k * kept energy fraction at that norm).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap, blocks
from framework.transforms.common import attention_shape, block_parts, set_weight
from framework.transforms.norms import is_tied
from framework.transforms.rotations import rotate_residual


def norm_paths(model: nn.Module, arch: ArchMap) -> list[str]:
    """Dotted paths of every norm that reads the residual stream, in forward order."""
    assert arch.attn_norm is not None and arch.mlp_norm is not None
    assert arch.final_norm is not None
    out = []
    for i, _ in enumerate(blocks(model, arch)):
        out += [f"{arch.blocks}.{i}.{arch.attn_norm}", f"{arch.blocks}.{i}.{arch.mlp_norm}"]
    return [*out, arch.final_norm]


def _cut_linear(layer: nn.Linear, rows: int | None = None, cols: int | None = None) -> None:
    w = layer.weight.data
    if cols is not None:
        w = w[:, :cols]
        layer.in_features = cols
    if rows is not None:
        w = w[:rows]
        layer.out_features = rows
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.data[:rows].clone(), requires_grad=False)
    layer.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)


@torch.no_grad()
def slice_residual(
    model: nn.Module,
    arch: ArchMap,
    basis: torch.Tensor,
    keep: int,
    norm_gains: dict[str, float] | None = None,
) -> nn.Module:
    """Rotate the residual stream by `basis` ([d, d] orthogonal, columns in decreasing
    importance), keep its first `keep` directions, and shrink every tensor touching the
    stream. The model is changed in place (same class, hidden_size = keep) and returned.

    norm_gains: norm path (norm_paths) -> scale of that norm after slicing; missing ones
    get sqrt(d / keep), exact when the discarded directions carry nothing.
    """
    shape = attention_shape(model, arch)
    d = model.get_submodule(arch.embed).weight.shape[1]
    if not 0 < keep <= d:
        raise SculptError(f"transforms: cannot keep {keep} of {d} residual dimensions")
    rotate_residual(model, arch, basis)
    assert arch.head is not None
    tied = is_tied(model, arch)
    embed = model.get_submodule(arch.embed)
    embed.weight = nn.Parameter(embed.weight.data[:, :keep].contiguous().clone())
    embed.embedding_dim = keep
    for parts in block_parts(model, arch):
        for layer in (parts.q, parts.k, parts.v, *parts.mlp_in):
            _cut_linear(layer, cols=keep)
        for layer in (parts.o, parts.mlp_out):
            _cut_linear(layer, rows=keep)
    head = model.get_submodule(arch.head)
    if tied:
        head.weight = embed.weight
    else:
        _cut_linear(head, cols=keep)
    gains = norm_gains or {}
    default = math.sqrt(d / keep)
    for path in norm_paths(model, arch):
        norm = model.get_submodule(path)
        gain = gains.get(path, default)
        norm.weight = nn.Parameter(torch.full((keep,), float(gain), dtype=norm.weight.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.hidden_size = keep
    # Attention's width no longer follows hidden_size / heads: pin it for from_pretrained.
    model.config.head_dim = shape.head_dim
    return model


def kept_fraction(cov: torch.Tensor, basis: torch.Tensor, keep: int) -> float:
    """Share of a second-moment matrix's energy inside the first `keep` basis columns."""
    top = basis[:, :keep].to(cov.dtype)
    total = float(torch.trace(cov))
    return float(torch.trace(top.T @ cov @ top)) / total if total > 0 else 1.0


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of a symmetric second-moment matrix, by decreasing eigenvalue."""
    values, vectors = torch.linalg.eigh(cov.double())
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]


def set_norm_gains(model: nn.Module, gains: dict[str, float]) -> None:
    for path, gain in gains.items():
        norm = model.get_submodule(path)
        set_weight(norm.weight, torch.full_like(norm.weight, float(gain)))
