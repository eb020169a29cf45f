"""Stage checkpoints: what lets a killed or requeued run resume after its last completed
stage and end with the same metrics as a run that was never interrupted.

Layout under the run folder:
  checkpoints/state.json      completed stages' records, the last evaluation, a config
                              fingerprint, and which model folder holds the weights
  checkpoints/model-<i>/      the model after stage i (HF folder, safetensors), only for the
                              latest weight-changing stage

The model folder is written before state.json names it, each atomically, so a kill at any
instant leaves either the previous consistent state or the new one. A successful run
removes checkpoints/ (model/ and metrics.json then hold everything).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from framework.errors import SculptError
from framework.io import atomic_dir, atomic_write_json, atomic_write_text

log = logging.getLogger("sculpt")

# Keys that say where and how a run is executed or logged, not what it computes: a
# requeued job may legitimately differ in them.
_NOT_FINGERPRINTED = ("hydra", "paths", "launcher", "logger", "interactive", "resume")


def config_fingerprint(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    for key in _NOT_FINGERPRINTED:
        data.pop(key, None)
    trainer = data.get("trainer")
    if isinstance(trainer, dict):
        trainer.pop("timeout_s", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ResumeState:
    fingerprint: str
    completed: list[dict[str, Any]] = field(default_factory=list)  # StageRecord fields
    last_eval: dict[str, float] = field(default_factory=dict)
    model_dir: str | None = None  # folder name under checkpoints/
    weights_on_grid: bool = False


class StageCheckpoints:
    def __init__(self, run_dir: Path, cfg: DictConfig):
        self.root = run_dir / "checkpoints"
        self.fingerprint = config_fingerprint(cfg)

    def begin(self, resume: bool) -> ResumeState | None:
        """At the start of a run: forget everything (resume=False), or check that what is
        here belongs to this config and return the state to resume from. The fingerprint
        file guards what state.json does not cover yet (a first stage's training
        checkpoints)."""
        marker = self.root / "fingerprint"
        if not resume:
            self.clear()
        elif marker.exists() and marker.read_text().strip() != self.fingerprint:
            raise SculptError(
                f"{marker}: these checkpoints come from a different config (fingerprint "
                f"{marker.read_text().strip()}, this run {self.fingerprint}); use another run "
                "folder, delete checkpoints/, or set resume=false"
            )
        state = self.load() if resume else None
        atomic_write_text(marker, self.fingerprint + "\n")
        return state

    def stage_dir(self, index: int) -> Path:
        """Resumable state of stage `index` while it runs (training checkpoints)."""
        return self.root / f"stage-{index}"

    def load(self) -> ResumeState | None:
        """The saved state, or None when there is nothing to resume. A state made by a
        different config is refused rather than silently mixed into this run."""
        path = self.root / "state.json"
        if not path.exists():
            return None
        try:
            state = ResumeState(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise SculptError(
                f"{path}: unreadable checkpoint state ({exc}); delete it or set resume=false"
            ) from exc
        if state.fingerprint != self.fingerprint:
            raise SculptError(
                f"{path}: these checkpoints come from a different config (fingerprint "
                f"{state.fingerprint}, this run {self.fingerprint}); use another run folder, "
                "delete checkpoints/, or set resume=false"
            )
        if state.model_dir and not (self.root / state.model_dir).is_dir():
            raise SculptError(f"{self.root / state.model_dir}: checkpoint model folder missing")
        return state

    def load_model_into(self, model: nn.Module, state: ResumeState) -> nn.Module:
        """The checkpointed weights, in a model of the checkpoint's own shape and class (a
        sliced or pruned model's config differs from the original's; a per-layer sliced
        one is a SlicedLlamaForCausalLM), chosen by the saved config like any HF folder."""
        if not state.model_dir:
            return model
        from framework.models.loading import auto_class

        folder = self.root / state.model_dir
        restored = auto_class(folder).from_pretrained(folder, dtype=torch.float32)
        return restored.eval()

    def save(
        self,
        state: ResumeState,
        model: nn.Module | None,
        stage_index: int,
    ) -> None:
        """Record a completed stage; `model` is given when the stage changed weights."""
        state.fingerprint = self.fingerprint
        old = state.model_dir
        if model is not None:
            name = f"model-{stage_index}"
            with atomic_dir(self.root / name) as staging:
                model.save_pretrained(staging, safe_serialization=True)
            state.model_dir = name
        atomic_write_json(self.root / "state.json", asdict(state))
        if old and old != state.model_dir:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
