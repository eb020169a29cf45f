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


def test_a_sliced_model_resumes_as_its_own_class(compose_cfg, tiny, tmp_path: Path) -> None:
    """A stage that changed the model's class (per-layer slicing: shortcut matrices) must
    come back as that class with every weight, not as the run's original class."""
    from framework.models.sliced_llama import SlicedLlamaForCausalLM, to_sliced_llama
    from framework.transforms.norms import untie_head

    untie_head(tiny.model, tiny.arch)
    sliced = to_sliced_llama(tiny.model).eval()
    with torch.no_grad():
        sliced.model.layers[0].attn_shortcut.weight.mul_(0.5)
    ckpt = StageCheckpoints(tmp_path, compose_cfg(["model=tiny_llama"]))
    state = ResumeState(fingerprint="")
    state.completed.append({"name": "compressor", "kind": "compressor", "target": "slice"})
    ckpt.save(state, sliced, 0)
    restored = ckpt.load_model_into(tiny.model, ckpt.load())
    assert type(restored) is SlicedLlamaForCausalLM
    for name, tensor in sliced.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
