"""Helpers for tests that run the real `sculpt` console script in a subprocess.

Every run is offline (HF_HUB_OFFLINE=1, WANDB_MODE=offline), starts in a temporary
folder (so nothing lands in the repository) and writes its run folder where the test says
(hydra.run.dir / hydra.sweep.dir)."""

from __future__ import annotations

import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

# The fast integration tests use the tiny random Llama with tiny windows and no tracking;
# `logger=wandb` must come after `debug=default` (which turns the logger off).
TINY = ("model=tiny_llama", "debug=default")
RUN_TIMEOUT_S = 900  # generous: a loaded 2-core machine is several times slower


def sculpt_command() -> list[str]:
    """The installed console script next to this interpreter (the venv's), else on PATH."""
    script = Path(sys.executable).with_name("sculpt")
    if script.exists():
        return [str(script)]
    found = shutil.which("sculpt")
    if found:
        return [found]
    pytest.fail("the `sculpt` console script is not installed (pip install -e .)")


def sculpt_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for var in ("HYDRA_FULL_ERROR", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        env.pop(var, None)  # would change what the CLI prints or where W&B writes
    return env


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def explain(self) -> str:
        return (
            f"sculpt {' '.join(self.args)} -> exit {self.returncode} in {self.seconds:.1f} s\n"
            f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n"
            f"--- stderr (tail) ---\n{self.stderr[-3000:]}"
        )


def run_sculpt(
    args: Sequence[str],
    cwd: Path,
    timeout: float = RUN_TIMEOUT_S,
    extra_env: dict[str, str] | None = None,
) -> CliResult:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [*sculpt_command(), *args],
        cwd=cwd,
        env={**sculpt_env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(
        list(args), proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start
    )


def run_many(jobs: dict[str, tuple[Sequence[str], Path]], workers: int = 2) -> dict[str, CliResult]:
    """Run several CLI invocations, `workers` at a time (each is one mostly single-threaded
    process, so two overlap well on a 2-core machine)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # one compute thread each, so the processes do not oversubscribe the cores
        threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        futures = {
            name: pool.submit(run_sculpt, args, cwd, RUN_TIMEOUT_S, threads)
            for name, (args, cwd) in jobs.items()
        }
        return {name: f.result() for name, f in futures.items()}


def assert_complete_run_folder(folder: Path) -> None:
    """What a finished run leaves (DESIGN.md): metrics.json (written last), report.md,
    plots/*.png, model/ (safetensors only), compressed/ (payload + manifest), no FAILED."""
    assert (folder / "metrics.json").is_file(), f"{folder}: no metrics.json"
    assert not (folder / "FAILED").exists(), (folder / "FAILED").read_text()
    report = folder / "report.md"
    assert report.is_file() and report.stat().st_size > 0
    pngs = sorted((folder / "plots").glob("*.png"))
    assert pngs, f"{folder}/plots has no png"
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG"
    model = folder / "model"
    assert (model / "config.json").is_file()
    assert list(model.glob("*.safetensors")), "model/ has no safetensors"
    assert not list(model.glob("*.bin")) and not list(model.glob("*.pt*")), (
        "model/ has pickled weights"
    )
    assert (folder / "compressed" / "manifest.json").is_file()
    assert (folder / "compressed" / "payload.bin").stat().st_size > 0
    # atomic writes leave no staging leftovers next to the artifacts
    leftovers = [
        p.name for p in folder.iterdir() if p.name.startswith(".") and p.name not in (".hydra",)
    ]
    assert not leftovers, f"staging leftovers in {folder}: {leftovers}"


class _Trap:
    """Unpickling this creates `marker`: proof that someone unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def pickle_trap(marker: Path) -> bytes:
    return pickle.dumps(_Trap(marker), protocol=4)
