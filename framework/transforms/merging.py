"""Merging units (MLP neurons, attention heads) into the ones that stay: remove a unit and
fold what it wrote into the kept units that predict its activation.

A unit j writes W[:, j] * a_j into the residual stream (W: the output projection, a_j: the
unit's activation, its slice of W's input). If a_j is a near-duplicate of a kept unit i,
a_j ~ alpha a_i, then deleting j and adding alpha W[:, j] to W[:, i] changes nothing: the
two units are merged. Least squares generalises the pair: regress the removed units'
activations on all kept ones over the calibration tokens (A_R ~ A_K B) and add W_R B^T to
the kept columns. With H = A^T A (the output projection's input Hessian, as GPTQ's) that is
the Optimal Brain Surgeon step for a whole column group (Hassibi & Stork, 1993; ZipLM,
Kurtic et al., 2023, arXiv:2302.04089 applies it to structured units):

    cost(u) = tr(W_u [H^-1]_uu^-1 W_u^T)          (the output error removing u adds)
    W      <- W - W_u [H^-1]_uu^-1 [H^-1]_u,:     (W_u becomes zero, the rest compensates)
    H^-1   <- H^-1 - [H^-1]_:,u [H^-1]_uu^-1 [H^-1]_u,:

applied greedily, one unit at a time, cheapest first, so each choice sees the
compensation of the ones before it. Without the update (`compensate=False`) the same
choice gives plain removal, the ablation that shows what merging buys.

Near-duplicates are what makes the cost small, and the within-model counterpart of the
permutation alignment used to merge two models (Git Re-Basin, Ainsworth et al., 2023):
match units by their activations. `twin_cosine` reports, for each removed unit, the
largest cosine between its activation and a kept unit's (uncentred, from H): close to 1
for a unit merged into a twin, lower where several kept units share its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.calibration import damped_cholesky
from framework.errors import SculptError


@dataclass
class MergeResult:
    removed: torch.Tensor  # unit indices, in the order they were removed
    weight: torch.Tensor  # the output projection after removal (and compensation)
    cost: float  # the greedy sum of cost(u): the output error added, in H's units
    relative_error: float  # tr(E H E^T) / tr(W H W^T) of the returned weight, undamped H
    twin_cosine: float  # mean over removed units of max |cos(a_u, a_kept)|


@torch.no_grad()
def merge_units(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    count: int,
    unit_size: int = 1,
    damp: float = 0.01,
    compensate: bool = True,
) -> MergeResult:
    """Remove `count` units of `unit_size` consecutive input columns from `weight` [out,
    in] given the Hessian [in, in] of its input (any positive multiple of A^T A), merging
    each into the kept columns (see the module docstring). Float64 throughout."""
    out_features, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise SculptError(f"merge: Hessian {tuple(hessian.shape)} for {cols} input columns")
    if unit_size < 1 or cols % unit_size:
        raise SculptError(f"merge: {cols} columns are not units of {unit_size}")
    units = cols // unit_size
    if not 0 <= count < units:
        raise SculptError(f"merge: cannot remove {count} of {units} units")
    w0 = weight.detach().to(torch.float64)
    h = hessian.detach().to(torch.float64)
    w = w0.clone()
    hinv = _damped_inverse(h, damp)

    kept = torch.ones(units, dtype=torch.bool)
    removed: list[int] = []
    total = 0.0
    for _ in range(count):
        if unit_size == 1:  # neurons: scalar blocks, rank-one updates in place
            costs = w.pow(2).sum(dim=0) / hinv.diagonal().clamp_min(1e-300)
            costs[~kept] = float("inf")
            u = int(torch.argmin(costs))
            cost_u = float(costs[u])
            inv_uu = 1.0 / float(hinv[u, u])
            row = hinv[u].clone()
            if compensate:
                w.addr_(w[:, u].clone(), row, alpha=-inv_uu)
            w[:, u] = 0.0
            # Row and column u of H^-1 become zero: u is out of every later choice.
            hinv.addr_(row, row, alpha=-inv_uu)
        else:
            live = torch.nonzero(kept).flatten()
            # [units, size, size] diagonal blocks of H^-1, [units, out, size] column groups.
            diag = hinv.reshape(units, unit_size, units, unit_size).diagonal(dim1=0, dim2=2)
            inv_blocks = torch.linalg.inv(diag.permute(2, 0, 1)[live])
            groups = w.reshape(out_features, units, unit_size).permute(1, 0, 2)[live]
            live_costs = ((groups @ inv_blocks) * groups).sum(dim=(1, 2))
            pick = int(torch.argmin(live_costs))
            u = int(live[pick])
            cost_u = float(live_costs[pick])
            s = slice(u * unit_size, (u + 1) * unit_size)
            if compensate:
                w -= (w[:, s] @ inv_blocks[pick]) @ hinv[s, :]
            w[:, s] = 0.0
            hinv -= hinv[:, s] @ inv_blocks[pick] @ hinv[s, :]
        kept[u] = False
        removed.append(u)
        total += cost_u
    idx = torch.tensor(removed, dtype=torch.long)
    return MergeResult(
        removed=idx,
        weight=w.to(weight.dtype),
        cost=total,
        relative_error=_relative_error(w0, w, h),
        twin_cosine=_twin_cosine(h, kept, unit_size),
    )


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + d mean(diag H) I)^-1 with framework.calibration's damping rule."""
    chol, _ = damped_cholesky(h, damp, floor=1e-10, attempts=14, what="merge")
    return torch.cholesky_inverse(chol)


def _relative_error(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    e = w0 - w
    den = float(((w0 @ h) * w0).sum())
    return float(((e @ h) * e).sum()) / den if den > 0 else 0.0


def _twin_cosine(h: torch.Tensor, kept: torch.Tensor, unit_size: int) -> float:
    """Mean over removed units of the largest |cosine| between one of its activation
    columns and a kept unit's column (uncentred, over the calibration tokens)."""
    if bool(kept.all()):
        return float("nan")
    norm = h.diagonal().clamp_min(1e-30).sqrt()
    cos = (h / norm[:, None] / norm[None, :]).abs()
    col_kept = kept.repeat_interleave(unit_size)
    removed_units = torch.nonzero(~kept).flatten()
    best = []
    for u in removed_units.tolist():
        s = slice(u * unit_size, (u + 1) * unit_size)
        best.append(float(cos[s][:, col_kept].max()))
    return sum(best) / len(best)
