"""Topology preservation as an evaluation (eval.topology): per-block diagram distances
between the reference and the model after each weight-changing stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from framework.errors import SculptError
from framework.eval.topology import TopologyEvaluator, TopologySpec, diagram_distance
from framework.run import run


def test_distances_are_zero_for_the_same_model_and_grow_with_damage(tiny, tiny_windows) -> None:
    spec = TopologySpec(enabled=True, points=60, windows=2, workers=1)
    windows = tiny_windows["evaluation"]
    evaluator = TopologyEvaluator.start(spec, tiny.model, tiny.arch, windows)
    same, rows = evaluator.compare(tiny.model)
    assert same["topo_distance_mean"] == 0.0
    assert [r["block"] for r in rows] == [0, 1]
    with torch.no_grad():
        for p in tiny.model.model.layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    moved, rows = evaluator.compare(tiny.model)
    assert moved["topo_distance_mean"] > 0
    assert rows[0]["H0"] == 0.0  # block 0 is untouched: its cloud is the same
    assert rows[1]["H0"] > 0


def test_bottleneck_distance() -> None:
    a = np.array([[0.0, 1.0], [0.0, 2.0]])
    assert diagram_distance(a, a, "bottleneck") == 0.0
    assert diagram_distance(a, a + np.array([0.0, 0.5]), "bottleneck") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"distance": "emd"}, r"eval\.topology\.distance: 'emd'"),
        ({"pointz": 3}, r"eval\.topology\.pointz: not a setting"),
        ({"points": 2}, r"eval\.topology\.points: 2"),
    ],
)
def test_bad_settings_name_the_key(node: dict, message: str) -> None:
    with pytest.raises(SculptError, match=message):
        TopologySpec.from_config(OmegaConf.create(node))


def test_a_run_logs_topology_distance_per_block(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=default",
            "compressor.bits=2",
            "eval.topology.enabled=true",
            "eval.topology.points=40",
            "eval.topology.workers=1",
            "save_model=false",
        ]
    )
    result = run(cfg)
    compressor = next(r for r in result.stages if r.name == "compressor")
    assert compressor.eval["topo_distance_mean"] > 0
    assert len(compressor.tables["topology_distance"]) == 2
    flat = json.loads((tmp_path / "metrics.json").read_text())["flat"]
    assert flat["compressor/topo_h1_mean"] >= 0
