"""Fixtures for the Slurm sweep tests: a real one-machine cluster (slurm/start_cluster.sh,
which `make test-slurm` runs first) and a helper that runs `sculpt -m launcher=slurm ...`
as a user would and explains any failure with the jobs' own logs."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The console script next to this interpreter: the venv's sculpt, whose python submitit
# hands to every job.
SCULPT = Path(sys.executable).with_name("sculpt")


def _run(*cmd: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Cluster:
    node: str
    accounting: bool  # sacct answers, so job states (COMPLETED, FAILED) can be checked


@pytest.fixture(scope="session")
def slurm_cluster() -> Cluster:
    """The local cluster, idle. Skips when there is none; under `make test-slurm`
    (SCULPT_REQUIRE_SLURM=1) fails instead, so that a broken cluster cannot pass as skipped."""
    required = os.environ.get("SCULPT_REQUIRE_SLURM") == "1"

    def unavailable(reason: str) -> None:
        reason += " (start it with: sudo slurm/start_cluster.sh)"
        if required:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)

    missing = [c for c in ("sbatch", "sinfo", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        unavailable(f"Slurm client commands not found: {', '.join(missing)}")
    if not SCULPT.exists():
        unavailable(f"no sculpt console script next to {sys.executable}")
    try:
        info = _run("sinfo", "-h", "-N", "-o", "%N %t")
    except subprocess.TimeoutExpired:
        unavailable("sinfo did not answer within 15 s")
    if info.returncode != 0:
        unavailable(f"sinfo failed: {info.stderr.strip() or info.stdout.strip()}")
    nodes = dict(line.split()[:2] for line in info.stdout.splitlines() if line.strip())
    idle = [n for n, state in nodes.items() if state == "idle"]
    if not idle:
        unavailable(f"no idle Slurm node (sinfo: {nodes or 'no nodes'})")
    accounting = _run("sacct", "-n", "-X", "-S", "now").returncode == 0
    return Cluster(node=idle[0], accounting=accounting)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 KB of plain text: enough windows for debug=default, and the jobs skip
    tokenizing the whole KJV/Shakespeare protocol corpora, which would dominate their time."""
    rng = random.Random(0)
    words = [
        "the",
        "king",
        "said",
        "unto",
        "them",
        "that",
        "all",
        "his",
        "people",
        "shall",
        "go",
        "forth",
        "and",
        "queen",
        "of",
        "night",
        "would",
        "speak",
        "love",
        "death",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Sweep:
    dir: Path
    proc: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def array_ids(self) -> list[str]:
        """Slurm job ids of the arrays this sweep submitted (from submitit's folders)."""
        root = self.dir / ".submitit"
        if not root.is_dir():
            return []
        ids = {p.name.split("_")[0] for p in root.glob("*_*") if p.is_dir()}
        return sorted(ids, key=int)

    def job_dirs(self) -> list[Path]:
        jobs = [p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit()]
        return sorted(jobs, key=lambda p: int(p.name))

    def diagnostics(self) -> str:
        """squeue/sacct for this sweep and the tail of every job's stderr."""
        parts = [
            f"sculpt exit code {self.proc.returncode} after {self.seconds:.0f} s",
            "--- sculpt stderr (tail)",
            _tail(self.proc.stderr, 25),
        ]
        ids = self.array_ids
        if ids:
            for cmd in (
                ("squeue", "-j", ",".join(ids)),
                ("sacct", "-X", "-j", ",".join(ids), "-o", "JobID,State,ExitCode,Elapsed"),
            ):
                try:
                    out = _run(*cmd)
                    parts += [f"--- {' '.join(cmd)}", (out.stdout + out.stderr).strip()]
                except subprocess.TimeoutExpired:
                    parts.append(f"--- {' '.join(cmd)}: timed out")
        for err in sorted((self.dir / ".submitit").glob("*/*_log.err")):
            text = err.read_text(errors="replace")
            if text.strip():
                parts += [f"--- {err.relative_to(self.dir)} (tail)", _tail(text, 8)]
        return "\n".join(parts)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture
def run_sweep(slurm_cluster: Cluster, tmp_path: Path):
    """run_sweep(*overrides, timeout=...) -> Sweep: `sculpt -m launcher=slurm <overrides>`
    into a fresh sweep dir. On a timeout the sweep's jobs are cancelled (a later test gets
    an idle node) and the test fails with the jobs' logs."""
    sweeps: list[Sweep] = []

    def run(*overrides: str, timeout: float, name: str = "sweep") -> Sweep:
        sweep_dir = tmp_path / name
        # 2 GB per job (a tiny job peaks near 0.7 GB): two jobs fit side by side even on a
        # CI machine with little memory, where the default 4 GB would queue them one by one.
        cmd = [
            str(SCULPT),
            "-m",
            "launcher=slurm",
            *overrides,
            "hydra.launcher.mem_gb=2",
            f"hydra.sweep.dir={sweep_dir}",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr or ""
            err = err.decode(errors="replace") if isinstance(err, bytes) else err
            proc = subprocess.CompletedProcess(cmd, -9, "", err)
            sweep = Sweep(sweep_dir, proc, time.monotonic() - start)
            sweeps.append(sweep)
            pytest.fail(
                f"sweep still running after {timeout:.0f} s: {' '.join(cmd)}\n"
                f"{sweep.diagnostics()}",
                pytrace=False,
            )
        sweep = Sweep(sweep_dir, proc, time.monotonic() - start)
        sweeps.append(sweep)
        return sweep

    yield run
    for sweep in sweeps:  # nothing of ours may linger in the queue for the next test
        if sweep.array_ids:
            _run("scancel", *sweep.array_ids)
