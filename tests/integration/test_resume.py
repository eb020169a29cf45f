"""Fault tolerance: a run killed mid-stage (SIGKILL, no chance to clean up) and started
again with the same command in the same folder continues after its last completed stage
and ends with the same metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_runner import TINY, run_sculpt, sculpt_command, sculpt_env

# Compress, then distil long enough (a few seconds) that the kill lands inside the stage.
ARGS = (
    *TINY,
    "~analyzer",
    "editor=distill",
    "trainer.max_steps=60",
    "trainer.checkpoint_every_n_steps=10",
    "debug_anomaly=false",
)
VOLATILE = ("seconds", "_mb", "_s")


def stable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith(VOLATILE)}


def kill_when(run_dir: Path, cwd: Path, marker: str) -> None:
    """Start the run and SIGKILL it (no cleanup possible) once `marker` exists under it."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [*sculpt_command(), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=sculpt_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = run_dir / marker
    deadline = time.monotonic() + 600
    try:
        while not state.exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "metrics.json").exists(), "killed too late: the run had finished"


def test_killed_run_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    kill_when(resumed, tmp_path / "cwd1", "checkpoints/state.json")
    state = json.loads((resumed / "checkpoints" / "state.json").read_text())
    assert [r["name"] for r in state["completed"]] == ["compressor"]
    assert (resumed / "checkpoints" / state["model_dir"] / "model.safetensors").exists()

    again = run_sculpt([*ARGS, f"hydra.run.dir={resumed}"], tmp_path / "cwd2")
    assert again.returncode == 0, again.explain()
    assert "resuming after 1 completed stage(s) (compressor)" in again.stdout + again.stderr
    assert not (resumed / "checkpoints").exists()  # a finished run keeps no checkpoints

    baseline = run_sculpt([*ARGS, f"hydra.run.dir={whole}"], tmp_path / "cwd3")
    assert baseline.returncode == 0, baseline.explain()
    got = json.loads((resumed / "metrics.json").read_text())["flat"]
    want = json.loads((whole / "metrics.json").read_text())["flat"]
    assert stable(got).keys() == stable(want).keys()
    assert stable(got) == pytest.approx(stable(want), rel=1e-6)
    assert got["editor/loss_last"] < got["editor/loss_first"]  # the distillation ran


def test_resume_refuses_checkpoints_of_another_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    kill_when(run_dir, tmp_path / "cwd1", "checkpoints/state.json")
    other = run_sculpt([*ARGS, "compressor.bits=2", f"hydra.run.dir={run_dir}"], tmp_path / "cwd2")
    assert other.returncode != 0
    assert "different config" in other.stderr_lines()[-1]
    assert "resume=false" in other.stderr_lines()[-1]


def test_killed_training_resumes_from_its_last_step_checkpoint(tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    kill_when(resumed, tmp_path / "cwd1", "checkpoints/stage-1/last.ckpt")
    again = run_sculpt([*ARGS, f"hydra.run.dir={resumed}"], tmp_path / "cwd2")
    assert again.returncode == 0, again.explain()
    log = again.stdout + again.stderr
    assert "resuming after 1 completed stage(s)" in log
    assert "resuming training at step" in log
    baseline = run_sculpt([*ARGS, f"hydra.run.dir={whole}"], tmp_path / "cwd3")
    assert baseline.returncode == 0, baseline.explain()
    got = json.loads((resumed / "metrics.json").read_text())["flat"]
    want = json.loads((whole / "metrics.json").read_text())["flat"]
    # the loss curve too: the checkpoint carries the steps before the kill
    assert stable(got) == pytest.approx(stable(want), rel=1e-6)
