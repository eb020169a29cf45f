"""Stage checkpoints: the fingerprint ignores where a run executes but not what it computes;
a state saved from one config is refused by another; the model folder named by state.json
always exists (it is written first, the old one removed last)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.checkpoints import ResumeState, StageCheckpoints, config_fingerprint
from framework.errors import SculptError


def test_fingerprint_ignores_paths_and_logging_but_not_the_computation(compose_cfg, tmp_path):
    base = compose_cfg(["model=tiny_llama"])
    elsewhere = compose_cfg(["model=tiny_llama", "logger=none", "interactive=false"])
    other_bits = compose_cfg(["model=tiny_llama", "compressor.bits=2"])
    assert config_fingerprint(base) == config_fingerprint(elsewhere)
    assert config_fingerprint(base) != config_fingerprint(other_bits)


def test_save_load_round_trip_and_old_model_removed(compose_cfg, tiny, tmp_path: Path) -> None:
    cfg = compose_cfg(["model=tiny_llama"])
    ckpt = StageCheckpoints(tmp_path, cfg)
    assert ckpt.load() is None
    state = ResumeState(fingerprint="")
    state.completed.append({"name": "compressor", "kind": "compressor", "target": "x"})
    ckpt.save(state, tiny.model, 0)
    assert (tmp_path / "checkpoints" / "model-0").is_dir()
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.down_proj.weight.mul_(2)
    state.completed.append({"name": "editor", "kind": "editor", "target": "y"})
    ckpt.save(state, tiny.model, 1)
    assert not (tmp_path / "checkpoints" / "model-0").exists()

    loaded = StageCheckpoints(tmp_path, cfg).load()
    assert loaded is not None and [r["name"] for r in loaded.completed] == [
        "compressor",
        "editor",
    ]
    restored = ckpt.load_model_into(tiny.model, loaded)
    for name, tensor in tiny.model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_a_different_config_is_refused(compose_cfg, tiny, tmp_path: Path) -> None:
    StageCheckpoints(tmp_path, compose_cfg(["model=tiny_llama"])).save(
        ResumeState(fingerprint=""), None, 0
    )
    other = StageCheckpoints(tmp_path, compose_cfg(["model=tiny_llama", "compressor.bits=2"]))
    with pytest.raises(SculptError, match="different config"):
        other.load()


def test_a_corrupt_state_is_a_clear_error(compose_cfg, tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "state.json").write_text("{not json")
    with pytest.raises(SculptError, match=r"state\.json"):
        StageCheckpoints(tmp_path, compose_cfg(["model=tiny_llama"])).load()
