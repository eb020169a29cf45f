"""Persistent homology of point clouds: Vietoris-Rips diagrams (ripser), their summaries
(total persistence, counts of prominent features, Betti curves) and distances between
diagrams (sliced Wasserstein).

A diagram is a float array of shape [n, 2] with one (birth, death) row per feature; an
essential feature (the one component of H0 that never dies) has death = inf. Summaries and
distances use the finite rows only.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Literal, get_args

import numpy as np

#: the distances a point cloud is measured with (a type for plugin signatures, and its values)
Metric = Literal["euclidean", "cosine"]
METRICS: tuple[str, ...] = get_args(Metric)


def as_array(x: Any) -> np.ndarray:
    """numpy float64 view of a torch tensor or array-like (no torch import needed here)."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


def pairwise_distances(points: Any, metric: str = "euclidean") -> np.ndarray:
    """Dense [n, n] distance matrix in float64.

    euclidean: ||x_i - x_j||. cosine: the chordal distance ||x_i/|x_i| - x_j/|x_j|||
    = sqrt(2 - 2 cos), a true metric that orders pairs exactly as 1 - cos does, so the Rips
    filtration has the same combinatorics as with cosine dissimilarity.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: '{metric}' is not one of {METRICS}")
    x = as_array(points)
    if x.ndim != 2:
        raise ValueError(f"points: expected a [n, dim] array, got shape {x.shape}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    d = np.sqrt(d2)
    np.fill_diagonal(d, 0.0)
    return np.maximum(d, d.T)  # exactly symmetric despite rounding


def rips_diagrams(distances: np.ndarray, max_dim: int = 1) -> list[np.ndarray]:
    """H0..H{max_dim} Vietoris-Rips diagrams of a dense distance matrix (ripser, Z/2)."""
    from ripser import ripser

    if max_dim not in (0, 1, 2):
        raise ValueError(f"max_dim: {max_dim} is not 0, 1 or 2")
    d = np.asarray(distances)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distances: expected a square matrix, got shape {d.shape}")
    if d.shape[0] < 2:
        return [np.zeros((0, 2)) for _ in range(max_dim + 1)]
    out = ripser(d, maxdim=max_dim, distance_matrix=True)["dgms"]
    return [np.asarray(dgm, dtype=np.float64).reshape(-1, 2) for dgm in out]


def diagrams(points: Any, max_dim: int = 1, metric: str = "euclidean") -> list[np.ndarray]:
    """H0..H{max_dim} diagrams of the Rips filtration of a point cloud [n, dim]."""
    return rips_diagrams(pairwise_distances(points, metric), max_dim)


def finite(dgm: np.ndarray) -> np.ndarray:
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    return dgm[np.isfinite(dgm).all(axis=1)]


def lifetimes(dgm: np.ndarray) -> np.ndarray:
    """death - birth of the finite features."""
    f = finite(dgm)
    return f[:, 1] - f[:, 0]


def total_persistence(dgm: np.ndarray, p: float = 1.0) -> float:
    """sum over finite features of (death - birth)^p."""
    return float(np.sum(lifetimes(dgm) ** p))


def count_persistent(dgm: np.ndarray, threshold: float) -> int:
    """Finite features whose lifetime exceeds `threshold`."""
    return int(np.sum(lifetimes(dgm) > threshold))


def max_persistence(dgm: np.ndarray) -> float:
    life = lifetimes(dgm)
    return float(life.max()) if life.size else 0.0


def betti_curve(dgm: np.ndarray, grid: Any) -> np.ndarray:
    """Number of features alive at each filtration value t of `grid` (birth <= t < death);
    essential features count from their birth on."""
    dgm = np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(grid, dtype=np.float64)
    if dgm.size == 0:
        return np.zeros(t.shape, dtype=np.int64)
    alive = (dgm[:, :1] <= t[None, :]) & (t[None, :] < dgm[:, 1:])
    return alive.sum(axis=0).astype(np.int64)


def filtration_grid(dgms: Sequence[np.ndarray], steps: int = 64) -> np.ndarray:
    """`steps` evenly spaced values from 0 to the largest finite death among `dgms`."""
    deaths = [finite(d)[:, 1] for d in dgms]
    top = max((float(d.max()) for d in deaths if d.size), default=1.0)
    return np.linspace(0.0, top if top > 0 else 1.0, steps)


def _diagonal_projection(dgm: np.ndarray) -> np.ndarray:
    mid = (dgm[:, 0] + dgm[:, 1]) / 2.0
    return np.stack([mid, mid], axis=1)


def sliced_wasserstein(
    dgm_a: np.ndarray, dgm_b: np.ndarray, n_directions: int = 50, seed: int = 0
) -> float:
    """Sliced Wasserstein distance between two diagrams (Carrière, Cuturi & Oudot, 2017).

    SW(A, B) = (1/pi) * integral over theta in [-pi/2, pi/2] of the 1-Wasserstein distance
    between the projections on direction theta of A plus the diagonal projections of B, and of
    B plus the diagonal projections of A (so both sides have equally many points). The
    integral is the mean over `n_directions` evenly spaced angles whose common offset is drawn
    from `seed`: deterministic, exactly symmetric, and 0 for identical diagrams. Infinite
    (essential) features are dropped.
    """
    if n_directions < 1:
        raise ValueError(f"n_directions: {n_directions} must be >= 1")
    a, b = finite(dgm_a), finite(dgm_b)
    if a.size == 0 and b.size == 0:
        return 0.0
    step = np.pi / n_directions
    offset = np.random.default_rng(seed).uniform(0.0, step)
    theta = -np.pi / 2 + offset + step * np.arange(n_directions)
    directions = np.stack([np.cos(theta), np.sin(theta)])  # [2, n_directions]
    lhs = np.concatenate([a, _diagonal_projection(b)]) @ directions
    rhs = np.concatenate([b, _diagonal_projection(a)]) @ directions
    lhs.sort(axis=0)
    rhs.sort(axis=0)
    return float(np.abs(lhs - rhs).sum(axis=0).mean())


def compare_diagrams(
    before: Mapping[str, Sequence[np.ndarray]],
    after: Mapping[str, Sequence[np.ndarray]],
    n_directions: int = 50,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-layer sliced Wasserstein distances between two sets of diagrams.

    Both mappings are layer name -> [H0, H1, ...] diagrams (as `Topology` saves them); the
    result is layer name -> one distance per homology dimension. The layers and dimensions
    must match: a comparison of different layers is a bug, not a zero.
    """
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))
        raise ValueError(f"diagrams: the two sets cover different layers ({missing[:5]} ...)")
    out: dict[str, list[float]] = {}
    for layer, dgms_a in before.items():
        dgms_b = after[layer]
        if len(dgms_a) != len(dgms_b):
            raise ValueError(
                f"diagrams: layer {layer} has {len(dgms_a)} vs {len(dgms_b)} dimensions"
            )
        out[layer] = [sliced_wasserstein(a, b, n_directions, seed) for a, b in zip(dgms_a, dgms_b)]
    return out


class InlineExecutor(Executor):
    """An Executor that runs each call at submit time (one worker, no process)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def executor(workers: int) -> Executor:
    """Where to run ripser calls, which hold the GIL: a pool of `workers` forked processes
    (capped at the CPU count), or in-process when workers <= 1 or fork is unavailable.

    Forked workers inherit the imported modules (no start-up cost) and only run ripser on
    arrays they are sent; they never touch torch.
    """
    import ripser  # noqa: F401 - imported once here, so forked workers inherit it

    workers = min(int(workers), os.cpu_count() or 1)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return InlineExecutor()
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
