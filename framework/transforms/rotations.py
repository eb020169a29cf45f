"""Orthogonal rotations that leave a Llama-family decoder's function unchanged.

Three places admit them, each with its own group:

* **The residual stream**, group O(d) (d = hidden size), one Q for the whole stream: with
  the norm scales folded (framework.transforms.norms) RMSNorm commutes with Q, so
  embedding E -> E Q, every reader of the stream (q, k, v, gate, up, head) W -> W Q,
  every writer (o, down) W -> Q^T W gives the same logits. This is SliceGPT's
  computational invariance (arXiv:2401.15024) and QuaRot's residual rotation
  (arXiv:2404.00456). Tied embeddings stay tied only if the final norm had no scale;
  otherwise the head is untied when its scale is folded (see norms.py).
* **Values and outputs per head**, group O(h)^(kv heads) (h = head width): attention mixes
  value vectors with scalar weights, so v_g -> v_g R_g commutes with it; the output
  projection's columns of every query head reading kv head g take R_g (GQA: one R per kv
  head, shared by its query heads). QuaRot folds exactly this one (its W_v/W_o Hadamard).
* **Queries and keys per head**, group SO(2)^(h/2) per kv head: RoPE rotates each plane
  (i, i + h/2) by a position-dependent angle, so only rotations inside those planes
  commute with it; q and k of a kv group take the same one, and q . k is unchanged. A
  general rotation of the head (what a model without RoPE allows) breaks the model.

Not foldable: the input of the MLP's down projection, because SiLU(gate) * up is not
rotation-equivariant (QuaRot applies that Hadamard online, at inference time; a plain
folded model cannot), and the head width's side of RoPE beyond the planes above.

Hadamard rotations: H_n / sqrt(n) with random signs, diag(s) H / sqrt(n). H_n is built
from Sylvester's doubling and Paley's constructions I (n = p + 1, p prime = 3 mod 4) and
II (n = 2(p + 1), p prime = 1 mod 4) and their Kronecker products, which covers every
SmolLM2 width: 576 = 12 * 12 * 4, 1536 = 12 * 128, 64 = 2^6 (tiny Llama: 64, 176 = 44 * 4).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap
from framework.transforms.common import (
    AttentionShape,
    BlockParts,
    attention_shape,
    block_diag_heads,
    block_parts,
    is_rmsnorm,
    require,
    set_weight,
    transform_input,
    transform_output,
)
from framework.transforms.norms import fold_norm_scales, is_tied

RotationKind = Literal["hadamard", "orthogonal"]

# ----------------------------------------------------------------------------- matrices


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _jacobsthal(p: int) -> np.ndarray:
    residues = {(x * x) % p for x in range(1, p)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, p)], dtype=np.int64)
    idx = (np.arange(p)[None, :] - np.arange(p)[:, None]) % p
    return chi[idx]


def _paley(n: int) -> np.ndarray | None:
    if _is_prime(n - 1) and (n - 1) % 4 == 3:  # Paley I
        p = n - 1
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(p)
        return np.eye(n, dtype=np.int64) + s
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:  # Paley II
        p = n // 2 - 1
        c = np.zeros((p + 1, p + 1), dtype=np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(p)
        plus = np.array([[1, 1], [1, -1]], dtype=np.int64)
        zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
        return np.kron(c, plus) + np.kron(np.eye(p + 1, dtype=np.int64), zero)
    return None


@functools.cache
def _hadamard(n: int) -> np.ndarray | None:
    if n == 1:
        return np.ones((1, 1), dtype=np.int64)
    if n == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if n % 4:
        return None
    found = _paley(n)
    if found is not None:
        return found
    for a in range(2, math.isqrt(n) + 1):
        if n % a == 0:
            for first, second in ((a, n // a), (n // a, a)):
                ha = _hadamard(first)
                if ha is not None:
                    hb = _hadamard(second)
                    if hb is not None:
                        return np.kron(ha, hb)
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """A +-1 matrix H with H H^T = n I (float64), or SculptError if none is constructible."""
    h = _checked_hadamard(n)
    if h is None:
        raise SculptError(
            f"transforms: no Hadamard matrix of order {n} is constructible here (Sylvester "
            "and Paley orders and their products); use rotation=orthogonal"
        )
    return h.clone()


@functools.cache
def _checked_hadamard(n: int) -> torch.Tensor | None:
    h = _hadamard(n)
    if h is None:
        return None
    out = torch.from_numpy(h.astype(np.float64))
    # Exact in float64 (integer entries): a wrong construction fails here, not in a model.
    if not torch.equal(out @ out.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"Hadamard construction of order {n} is wrong")
    return out


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-distributed Q in O(n): QR of a Gaussian matrix with R's diagonal made positive."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """diag(s) H_n / sqrt(n), s uniform in {-1, +1}^n (QuaRot's randomized Hadamard)."""
    signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
    return signs[:, None] * hadamard_matrix(n) / math.sqrt(n)


def random_rotation(n: int, kind: RotationKind, generator: torch.Generator) -> torch.Tensor:
    if kind == "hadamard":
        return random_hadamard(n, generator)
    if kind == "orthogonal":
        return random_orthogonal(n, generator)
    raise SculptError(f"transforms: rotation kind '{kind}' is not one of hadamard, orthogonal")


def rope_plane_rotations(angles: torch.Tensor) -> torch.Tensor:
    """[n, h/2] angles -> [n, h, h] rotations acting inside each RoPE plane (i, i + h/2)."""
    n, half = angles.shape
    cos, sin = torch.cos(angles.double()), torch.sin(angles.double())
    rots = torch.zeros(n, 2 * half, 2 * half, dtype=torch.float64)
    i = torch.arange(half)
    rots[:, i, i] = cos
    rots[:, i + half, i + half] = cos
    rots[:, i, i + half] = sin
    rots[:, i + half, i] = -sin
    return rots


def commutes_with_rope(rot: torch.Tensor, atol: float = 1e-9) -> bool:
    """True if x -> x R commutes with every RoPE rotation (rotate_half layout): R maps each
    plane (i, i + h/2) to itself as a rotation (determinant +1, not a reflection)."""
    h = rot.shape[-1]
    half = h // 2
    plane = torch.arange(h) % half
    mask = plane[:, None] == plane[None, :]
    off = rot[~mask]
    if off.numel() and float(off.abs().max()) > atol:
        return False
    j = torch.zeros(h, h, dtype=rot.dtype)
    idx = torch.arange(half)
    j[idx, idx + half], j[idx + half, idx] = 1.0, -1.0  # x J = rotate_half(x)
    return bool(torch.allclose(rot @ j, j @ rot, atol=atol))


# ----------------------------------------------------------------------------- residual


def _require_rms_everywhere(model: nn.Module, arch: ArchMap) -> None:
    require(arch, "attn_norm", "a norm in front of the attention: pre-norm decoders only")
    require(arch, "mlp_norm", "a norm in front of the MLP: pre-norm decoders only")
    require(arch, "final_norm", "a final norm in front of the LM head")
    require(arch, "head", "an LM head reading the residual stream")
    norms = [model.get_submodule(arch.final_norm)] if arch.final_norm else []
    for parts in block_parts(model, arch):
        norms += [parts.attn_norm, parts.mlp_norm]
    for norm in norms:
        if norm is None or not is_rmsnorm(norm):
            raise SculptError(
                f"transforms: {type(norm).__name__} is not a scale-only RMSNorm; residual "
                "rotations need RMSNorm (computational invariance)"
            )


@torch.no_grad()
def rotate_residual(
    model: nn.Module, arch: ArchMap, rotation: torch.Tensor, fold_norms: bool = True
) -> None:
    """Rotate the residual stream by an orthogonal Q [d, d]: x -> x Q everywhere.

    Group: O(d) acting on the residual stream. Exact once the norm scales are folded,
    which this does first (fold_norms=False skips it: then the result is only equivalent
    if the norms already carry no scale; the tests show it is not otherwise).
    """
    _require_rms_everywhere(model, arch)
    assert arch.head is not None
    d = model.get_submodule(arch.embed).weight.shape[1]
    q = rotation.to(torch.float64)
    if q.shape != (d, d):
        raise SculptError(f"transforms: rotation is {tuple(q.shape)}, residual width is {d}")
    if not torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-8):
        raise SculptError("transforms: the residual rotation is not orthogonal")
    if fold_norms:
        fold_norm_scales(model, arch)
    tied = is_tied(model, arch)  # then one tensor is both the embedding and the head
    embed = model.get_submodule(arch.embed).weight
    set_weight(embed, embed.data.double() @ q)
    for parts in block_parts(model, arch):
        for layer in (parts.q, parts.k, parts.v, *parts.mlp_in):
            transform_input(layer, q)
        for layer in (parts.o, parts.mlp_out):
            transform_output(layer, q.T)
    if not tied:
        transform_input(model.get_submodule(arch.head), q)


# ----------------------------------------------------------------------------- attention


@torch.no_grad()
def rotate_value_heads(parts: BlockParts, shape: AttentionShape, rots: torch.Tensor) -> None:
    """v_g -> v_g R_g for each kv head g ([kv_heads, h, h] orthogonal), and the output
    projection's columns of every query head of group g -> times R_g.

    Group: O(h)^kv_heads. Exact for any invertible R_g in fact (attention is linear in
    the values); orthogonal ones keep the weights' norms."""
    if rots.shape != (shape.kv_heads, shape.head_dim, shape.head_dim):
        raise SculptError(f"transforms: value rotations have shape {tuple(rots.shape)}")
    rots = rots.double()
    transform_output(parts.v, block_diag_heads(rots.transpose(1, 2)))
    transform_input(parts.o, block_diag_heads(rots, repeat=shape.group))


@torch.no_grad()
def rotate_query_key_heads(
    parts: BlockParts, shape: AttentionShape, rots: torch.Tensor, rotary: bool = True
) -> None:
    """q and k of kv group g -> times R_g ([kv_heads, h, h]). With RoPE (rotary=True) each
    R_g must commute with it (rope_plane_rotations), else SculptError.

    Group: SO(2)^(h/2) per kv head with RoPE; O(h) per kv head without."""
    if rots.shape != (shape.kv_heads, shape.head_dim, shape.head_dim):
        raise SculptError(f"transforms: query/key rotations have shape {tuple(rots.shape)}")
    if rotary and not all(commutes_with_rope(r) for r in rots.double()):
        raise SculptError(
            "transforms: a query/key rotation mixes RoPE planes (i, i + head_dim/2); "
            "only rotations inside each plane preserve the model"
        )
    left = rots.double().transpose(1, 2)
    transform_output(parts.q, block_diag_heads(left, repeat=shape.group))
    transform_output(parts.k, block_diag_heads(left))


def rotate_values(
    model: nn.Module, arch: ArchMap, kind: RotationKind, generator: torch.Generator
) -> None:
    """A fresh random R_g per layer and kv head (rotate_value_heads)."""
    shape = attention_shape(model, arch)
    for parts in block_parts(model, arch):
        rots = torch.stack(
            [random_rotation(shape.head_dim, kind, generator) for _ in range(shape.kv_heads)]
        )
        rotate_value_heads(parts, shape, rots)


def rotate_queries_keys(model: nn.Module, arch: ArchMap, generator: torch.Generator) -> None:
    """Random in-plane RoPE rotations per layer and kv head (rotate_query_key_heads)."""
    shape = attention_shape(model, arch)
    if shape.head_dim % 2:
        raise SculptError(f"transforms: head width {shape.head_dim} is odd (RoPE needs pairs)")
    for parts in block_parts(model, arch):
        angles = torch.rand(shape.kv_heads, shape.head_dim // 2, generator=generator) * 2 * math.pi
        rotate_query_key_heads(parts, shape, rope_plane_rotations(angles), rotary=arch.rotary)
