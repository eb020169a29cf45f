"""Topology shared by several plugins: persistence diagrams of point clouds and their
summaries and distances, neural persistence of weight matrices, TwoNN intrinsic dimension,
and a safe on-disk format for diagrams."""

from framework.topology.clouds import (
    ResidualTopology,
    block_outputs,
    normalize_cloud,
    residual_topology,
    sample_tokens,
)
from framework.topology.intrinsic import twonn_dimension
from framework.topology.neural import (
    max_spanning_tree_weights,
    neural_persistence,
    neural_persistence_diagram,
)
from framework.topology.persistence import (
    METRICS,
    Metric,
    betti_curve,
    compare_diagrams,
    count_persistent,
    diagrams,
    executor,
    filtration_grid,
    finite,
    lifetimes,
    max_persistence,
    pairwise_distances,
    rips_diagrams,
    sliced_wasserstein,
    total_persistence,
)
from framework.topology.store import DiagramSet, load_diagrams, save_diagrams

__all__ = [
    "METRICS",
    "DiagramSet",
    "Metric",
    "ResidualTopology",
    "betti_curve",
    "block_outputs",
    "compare_diagrams",
    "count_persistent",
    "diagrams",
    "executor",
    "filtration_grid",
    "finite",
    "lifetimes",
    "load_diagrams",
    "max_persistence",
    "max_spanning_tree_weights",
    "neural_persistence",
    "neural_persistence_diagram",
    "normalize_cloud",
    "pairwise_distances",
    "residual_topology",
    "rips_diagrams",
    "sample_tokens",
    "save_diagrams",
    "sliced_wasserstein",
    "total_persistence",
    "twonn_dimension",
]
