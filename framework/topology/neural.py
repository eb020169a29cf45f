"""Neural persistence of a weight matrix (Rieck et al., "Neural Persistence: A Complexity
Measure for Deep Neural Networks Using Algebraic Topology", ICLR 2019).

A linear layer is a complete bipartite graph between its input and output neurons with edge
weights w' = |w| / max|w| in [0, 1]. The filtration adds every vertex at 1 and then the edges
from the strongest down. Its 0-dimensional diagram has one point (1, w'_e) per edge e that
merges two components, i.e. per edge of a maximum spanning tree (Kruskal's algorithm is
exactly that sweep), plus the one component that never dies, which the authors' code pairs
with the filtration's end value 0. Neural persistence is the p-norm of the lifetimes,

    NP = ( sum_{e in MST} (1 - w'_e)^p + 1 )^(1/p),

and the normalised value divides by its upper bound (|V| - 1)^(1/p), reached when every tree
edge but the strongest has weight 0; the strongest edge always has w' = 1 and lifetime 0.
So the normalised neural persistence lies in [0, 1].

One deviation from the paper's Algorithm 1, which divides by the largest |w| of the whole
network: each matrix is normalised by its own largest |w|, which makes the value invariant to
rescaling one matrix (normalisation layers make per-matrix scale arbitrary in transformers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from framework.topology.persistence import as_array


def max_spanning_tree_weights(adjacency: np.ndarray) -> np.ndarray:
    """Edge weights of a maximum spanning tree of the complete bipartite graph whose
    biadjacency matrix is `adjacency` [m, n] (m + n - 1 values, in the order Prim adds them).

    Prim's algorithm on the dense graph, O((m + n)^2) with O(m + n) numpy work per step: for
    a 1536 x 576 matrix about 40 ms on one core, far below a Kruskal sort of its 885k edges.
    """
    a = np.array(adjacency, dtype=np.float64)  # a private copy: joined vertices are blanked
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"adjacency: expected a non-empty [m, n] matrix, got shape {a.shape}")
    m, n = a.shape
    out = np.empty(m + n - 1)
    # key_*: best edge weight from the tree to each vertex outside it; a vertex that joins is
    # parked at -inf, and its row / column of `a` is blanked so later updates keep it there.
    key_rows = np.full(m, -np.inf)
    key_cols = a[0].copy()
    a[0, :] = -np.inf  # start from row 0
    for t in range(m + n - 1):
        i = int(np.argmax(key_rows))
        j = int(np.argmax(key_cols))
        if key_rows[i] >= key_cols[j]:
            out[t] = key_rows[i]
            np.maximum(key_cols, a[i], out=key_cols)
            key_rows[i] = -np.inf
            a[i, :] = -np.inf
        else:
            out[t] = key_cols[j]
            np.maximum(key_rows, a[:, j], out=key_rows)
            key_cols[j] = -np.inf
            a[:, j] = -np.inf
    return out


def neural_persistence_diagram(weight: Any) -> np.ndarray:
    """The 0-dimensional diagram [(1, w'_e) for the tree edges] + [(1, 0)] of a weight matrix."""
    w = np.abs(as_array(weight))
    top = float(w.max()) if w.size else 0.0
    if w.ndim != 2 or top == 0.0 or not np.isfinite(top):
        raise ValueError("weight: expected a finite, non-zero [out, in] matrix")
    deaths = np.append(max_spanning_tree_weights(w / top), 0.0)
    return np.stack([np.ones_like(deaths), deaths], axis=1)


def neural_persistence(weight: Any, p: float = 2.0, normalize: bool = True) -> float:
    """Neural persistence of one weight matrix; normalised to [0, 1] by default."""
    dgm = neural_persistence_diagram(weight)
    value = float(np.sum((dgm[:, 0] - dgm[:, 1]) ** p) ** (1.0 / p))
    if not normalize:
        return value
    n_vertices = sum(np.shape(weight))
    return value / float((n_vertices - 1) ** (1.0 / p))
