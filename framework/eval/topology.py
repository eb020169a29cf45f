"""Topology preservation as an evaluation: the distance between each block's persistence
diagrams (residual stream, H0 and H1) of the reference and of the model after a stage, on
the same tokens. Turned on for any run with ``eval.topology.enabled=true``; the runner then
adds ``topo_*`` metrics and a per-block table to every stage that changes weights.

The reference's diagrams are computed once, right after the reference evaluation, on
``points`` tokens of the evaluation windows drawn with a fixed seed; every later model is
measured on exactly those tokens, so a distance of 0 means the same diagrams, not a lucky
sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from framework import topology as topo
from framework.errors import SculptError
from framework.models.arch import ArchMap, blocks

DISTANCES = ("sliced_wasserstein", "bottleneck")


@dataclass
class TopologySpec:
    """eval.topology: which blocks, how many tokens, which distance."""

    enabled: bool = False
    points: int = 300
    windows: int = 2
    layers: list[int] | None = None
    metric: str = "euclidean"
    distance: str = "sliced_wasserstein"
    max_dim: int = 1
    workers: int = 2
    seed: int = 0

    @classmethod
    def from_config(cls, node: DictConfig | None) -> TopologySpec:
        if node is None:
            return cls()
        known = set(cls.__dataclass_fields__)
        for key in node:
            if key not in known:
                raise SculptError(
                    f"eval.topology.{key}: not a setting (accepted: {', '.join(sorted(known))})"
                )
        spec = cls(**{k: node[k] for k in node})
        if spec.distance not in DISTANCES:
            raise SculptError(
                f"eval.topology.distance: '{spec.distance}' is not one of {', '.join(DISTANCES)}"
            )
        if spec.metric not in topo.METRICS:
            raise SculptError(
                f"eval.topology.metric: '{spec.metric}' is not one of {', '.join(topo.METRICS)}"
            )
        if spec.points < 8:
            raise SculptError(f"eval.topology.points: {spec.points} must be >= 8")
        if spec.windows < 1:
            raise SculptError(f"eval.topology.windows: {spec.windows} must be >= 1")
        if spec.max_dim not in (0, 1):
            raise SculptError(f"eval.topology.max_dim: {spec.max_dim} must be 0 or 1")
        return spec


def diagram_distance(a: np.ndarray, b: np.ndarray, distance: str) -> float:
    if distance == "bottleneck":
        from persim import bottleneck

        fa, fb = topo.finite(a), topo.finite(b)
        if fa.size == 0 and fb.size == 0:
            return 0.0
        return float(bottleneck(fa, fb))
    return topo.sliced_wasserstein(a, b)


@dataclass
class TopologyEvaluator:
    """Holds the reference's diagrams; `compare(model)` measures a later model."""

    spec: TopologySpec
    arch: ArchMap
    windows: torch.Tensor
    index: torch.Tensor
    names: dict[str, int]
    reference: dict[str, list[np.ndarray]] = field(default_factory=dict)

    @classmethod
    def start(
        cls, spec: TopologySpec, model: nn.Module, arch: ArchMap, windows: torch.Tensor
    ) -> TopologyEvaluator:
        n_blocks = len(blocks(model, arch))
        chosen = list(range(n_blocks)) if spec.layers is None else list(spec.layers)
        for layer in chosen:
            if not -n_blocks <= layer < n_blocks:
                raise SculptError(
                    f"eval.topology.layers: block {layer} does not exist (model has {n_blocks})"
                )
        names = {f"block_{layer % n_blocks}": layer % n_blocks for layer in chosen}
        used = windows[: spec.windows]
        gen = torch.Generator().manual_seed(spec.seed)
        index = topo.sample_tokens(used.shape[0], used.shape[1], spec.points, gen)
        evaluator = cls(spec=spec, arch=arch, windows=used, index=index, names=names)
        evaluator.reference = evaluator._diagrams(model)
        return evaluator

    def _diagrams(self, model: nn.Module) -> dict[str, list[np.ndarray]]:
        layers = blocks(model, self.arch)
        named = {name: layers[i] for name, i in self.names.items()}
        return topo.residual_topology(
            model,
            named,
            self.windows,
            self.index,
            max_dim=self.spec.max_dim,
            metric=self.spec.metric,
            workers=self.spec.workers,
        ).diagrams

    def compare(self, model: nn.Module) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(metrics, per-block rows): distances per block and homology dimension, their mean
        and max over blocks."""
        got = self._diagrams(model)
        rows: list[dict[str, Any]] = []
        per_dim: dict[int, list[float]] = {}
        for name, ref in self.reference.items():
            row: dict[str, Any] = {"block": self.names[name]}
            for dim, (a, b) in enumerate(zip(ref, got[name], strict=True)):
                value = diagram_distance(a, b, self.spec.distance)
                row[f"H{dim}"] = round(value, 6)
                per_dim.setdefault(dim, []).append(value)
            rows.append(row)
        metrics: dict[str, float] = {}
        for dim, values in per_dim.items():
            metrics[f"topo_h{dim}_mean"] = float(np.mean(values))
            metrics[f"topo_h{dim}_max"] = float(np.max(values))
        metrics["topo_distance_mean"] = float(np.mean([v for vs in per_dim.values() for v in vs]))
        return metrics, rows
