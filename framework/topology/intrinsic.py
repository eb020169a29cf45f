"""Intrinsic dimension from the two nearest neighbours (TwoNN; Facco, d'Errico, Rodriguez &
Laio, "Estimating the intrinsic dimension of datasets by a minimal neighborhood information",
Scientific Reports 7, 2017).

For each point, mu = r2 / r1 (distances to its second and first nearest neighbours) follows
a Pareto law with exponent d on a locally uniform d-dimensional manifold, so
-log(1 - F(mu)) = d log(mu). The estimate is the slope of that line through the origin, fitted
on the empirical CDF F(mu_(i)) = i / N after discarding the largest `discard_fraction` of mu
(10% in the paper), where the tail is noisy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from framework.topology.persistence import pairwise_distances


def twonn_dimension(
    points: Any = None,
    *,
    distances: np.ndarray | None = None,
    metric: str = "euclidean",
    discard_fraction: float = 0.1,
) -> float:
    """TwoNN intrinsic dimension of a point cloud [n, dim] or of a distance matrix [n, n].

    Points with a duplicate (r1 = 0) are left out. NaN when fewer than 3 usable points.
    """
    if (points is None) == (distances is None):
        raise ValueError("twonn_dimension: pass exactly one of points or distances")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction: {discard_fraction} must be in [0, 1)")
    d = (
        pairwise_distances(points, metric)
        if distances is None
        else np.array(distances, dtype=np.float64)
    )
    n = d.shape[0]
    if n < 3:
        return float("nan")
    np.fill_diagonal(d, np.inf)
    nearest = np.partition(d, 1, axis=1)[:, :2]
    r1, r2 = nearest[:, 0], nearest[:, 1]
    ok = r1 > 0
    mu = np.sort(r2[ok] / r1[ok])
    n = mu.size
    if n < 3:
        return float("nan")
    keep = max(int(np.floor(n * (1.0 - discard_fraction))), 2)
    keep = min(keep, n - 1)  # F = 1 at the last point: -log(0)
    x = np.log(mu[:keep])
    y = -np.log(1.0 - np.arange(1, keep + 1) / n)
    denom = float(x @ x)
    return float(x @ y / denom) if denom > 0 else float("nan")
