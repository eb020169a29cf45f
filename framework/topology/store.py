"""Persistence diagrams on disk: one safetensors file (no pickle), written atomically.

Layout: tensor ``dgm/<layer>/h<k>`` is layer's H_k diagram [n, 2] (float64, inf deaths kept);
tensor ``arr/<name>`` holds any extra array (Betti curves, the sampled token indices, ...);
the header's metadata holds the layer order (JSON), max_dim, a format tag and free-form
string entries (metric, seed, ...) so a later stage can check it compares like with like.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from framework.io import atomic_write_bytes

FORMAT = "sculpt.topology.diagrams/1"


@dataclass
class DiagramSet:
    diagrams: dict[str, list[np.ndarray]]  # layer -> [H0, H1, ...]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def save_diagrams(
    path: str | Path,
    diagrams: Mapping[str, Sequence[np.ndarray]],
    arrays: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    from safetensors.numpy import save

    layers = list(diagrams)
    dims = {len(d) for d in diagrams.values()}
    if len(dims) > 1:
        raise ValueError(f"diagrams: layers carry different numbers of dimensions {sorted(dims)}")
    tensors: dict[str, np.ndarray] = {}
    for layer, dgms in diagrams.items():
        if "/" in layer:
            raise ValueError(f"diagrams: layer name '{layer}' must not contain '/'")
        for k, dgm in enumerate(dgms):
            tensors[f"dgm/{layer}/h{k}"] = np.ascontiguousarray(
                np.asarray(dgm, dtype=np.float64).reshape(-1, 2)
            )
    for name, value in (arrays or {}).items():
        tensors[f"arr/{name}"] = np.ascontiguousarray(np.asarray(value))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format=FORMAT, layers=json.dumps(layers), max_dim=str(max(dims, default=1) - 1))
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_diagrams(path: str | Path) -> DiagramSet:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a sculpt diagrams file (format {meta.get('format')!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open API
    layers = json.loads(meta["layers"])
    n_dims = int(meta["max_dim"]) + 1
    diagrams = {layer: [tensors[f"dgm/{layer}/h{k}"] for k in range(n_dims)] for layer in layers}
    arrays = {key[len("arr/") :]: value for key, value in tensors.items() if key.startswith("arr/")}
    return DiagramSet(diagrams=diagrams, arrays=arrays, metadata=meta)
