"""Start a training job: in this process, or as worker processes (torchrun on one node, srun
across a Slurm allocation's nodes), and bring the trained weights back into the model.

The pipeline stays one process; only the training stage fans out. Workers exchange files,
never pickles: HF folders (safetensors), the windows as safetensors, a JSON job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.errors import SculptError
from framework.lightning.worker import TrainJob, train

log = logging.getLogger("sculpt")


def fit(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    job: TrainJob,
    workdir: Path,
) -> dict[str, Any]:
    """Train `student` in place; returns the worker's log (losses, per-rank parameter
    shares, seconds)."""
    launcher = job.spec.resolved_launcher()
    if launcher == "inprocess":
        outcome = train(student, teacher, windows, job)
        assert outcome.state_dict is not None
        student.load_state_dict(outcome.state_dict)
        student.eval()
        return outcome.log()
    return _fit_in_workers(student, teacher, windows, job, workdir, launcher)


def _fit_in_workers(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    job: TrainJob,
    workdir: Path,
    launcher: str,
) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    job_dir = workdir / "train_job"
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    student.save_pretrained(job_dir / "student", safe_serialization=True)
    if teacher is not None:
        teacher.save_pretrained(job_dir / "teacher", safe_serialization=True)
    save_file({"windows": windows.contiguous()}, job_dir / "windows.safetensors")
    (job_dir / "job.json").write_text(json.dumps(job.to_json(), indent=1))

    command, env = worker_command(job, job_dir, launcher)
    log_file = workdir / "train_workers.log"
    log.info(
        "training on %d processes (%s, %s); worker log: %s",
        job.spec.world_size,
        job.spec.strategy,
        launcher,
        log_file,
    )
    with log_file.open("w") as sink:
        proc = subprocess.run(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=job.spec.timeout_s
        )
    if proc.returncode != 0 or not (job_dir / "out" / "student.safetensors").exists():
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty)"]
        raise SculptError(
            f"trainer: {launcher} workers exited with {proc.returncode} "
            f"(last line of {log_file}: {tail[0][:300]})"
        )
    state = load_file(job_dir / "out" / "student.safetensors")
    student.load_state_dict(state)
    outcome = json.loads((job_dir / "out" / "log.json").read_text())
    # The weights are back in the model; the job folder (model copies) is not worth keeping.
    shutil.rmtree(job_dir, ignore_errors=True)
    return outcome


def worker_command(job: TrainJob, job_dir: Path, launcher: str) -> tuple[list[str], dict[str, str]]:
    spec = job.spec
    env = dict(os.environ)
    # Each rank gets its share of the cores rather than all of them.
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // spec.devices)))
    if spec.strategy.startswith("deepspeed") and spec.resolved_accelerator() == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    module = ["-m", "framework.lightning.worker", str(job_dir)]
    if launcher == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={spec.devices}",
            f"--master_port={free_port()}",
            *module,
        ]
        return command, env
    if launcher == "srun":
        if "SLURM_JOB_ID" not in env:
            raise SculptError("trainer.launcher: 'srun' needs a Slurm allocation (no SLURM_JOB_ID)")
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", env.get("SLURM_JOB_NODELIST", "")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        env.update(MASTER_ADDR=nodes[0], MASTER_PORT=str(free_port()))
        command = [
            "srun",
            f"--nodes={spec.num_nodes}",
            f"--ntasks-per-node={spec.devices}",
            "--kill-on-bad-exit=1",
            sys.executable,
            *module,
        ]
        return command, env
    raise SculptError(f"trainer.launcher: '{launcher}' cannot start worker processes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
