"""Fault tolerance on the real cluster: a batch job requeued with `scontrol requeue` while
it is inside its second stage starts again, resumes after the completed stage, and ends
with the metrics of an uninterrupted run of the same command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCULPT, Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from cli_runner import run_sculpt

pytestmark = pytest.mark.slurm
VOLATILE = ("seconds", "_mb", "_s")


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
        timeout=15,
    ).stdout.split()
    return out[0] if out else ""


def _squeue_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=15
    ).stdout.strip()


def test_requeued_job_resumes_to_the_uninterrupted_metrics(
    slurm_cluster: Cluster, small_text: Path, tmp_path: Path
) -> None:
    args = [
        "model=tiny_llama",
        "debug=default",
        "debug_anomaly=false",
        "~analyzer",
        "editor=distill",
        "trainer.max_steps=80",
        "data=text_file",
        f"data.path={small_text}",
    ]
    run_dir, log = tmp_path / "requeued", tmp_path / "job.log"
    quoted = " ".join(f"'{a}'" for a in [*args, f"hydra.run.dir={run_dir}"])
    script = tmp_path / "job.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --job-name=sculpt-requeue --requeue --open-mode=append --output={log}\n"
        "#SBATCH --cpus-per-task=1 --mem=2G\n"
        "export HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1\n"
        'echo "attempt: restart count ${SLURM_RESTART_COUNT:-0}"\n'
        f"exec {SCULPT} {quoted}\n"
    )
    submitted = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        state_file = run_dir / "checkpoints" / "state.json"
        deadline = time.monotonic() + 600
        while not state_file.exists():
            assert time.monotonic() < deadline, f"no checkpoint in 600 s; log:\n{_tail(log)}"
            assert _squeue_state(job_id), f"job left the queue early; log:\n{_tail(log)}"
            time.sleep(0.2)
        requeue = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=30
        )
        assert requeue.returncode == 0, requeue.stderr
        deadline = time.monotonic() + 900
        while _squeue_state(job_id):
            assert time.monotonic() < deadline, f"job not done in 900 s; log:\n{_tail(log)}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    text = log.read_text()
    assert "restart count 1" in text, text[-3000:]
    assert "resuming after 1 completed stage(s) (compressor)" in text, text[-3000:]
    if slurm_cluster.accounting:
        assert _sacct_state(job_id) == "COMPLETED"

    baseline = run_sculpt([*args, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path / "cwd")
    assert baseline.returncode == 0, baseline.explain()
    got = json.loads((run_dir / "metrics.json").read_text())["flat"]
    want = json.loads((tmp_path / "whole" / "metrics.json").read_text())["flat"]
    stable = {k: v for k, v in want.items() if not k.endswith(VOLATILE)}
    assert {k: got[k] for k in stable} == pytest.approx(stable, rel=1e-6)


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
