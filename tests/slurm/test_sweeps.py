"""Hydra multiruns on a real Slurm cluster through submitit: every job of a sweep runs as a
task of a Slurm job array, in its own process, and leaves its own complete run folder."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

WANDB = Path(sys.executable).with_name("wandb")


def _overrides(job: Path) -> dict[str, str]:
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in items)


def _metrics(job: Path) -> dict[str, float]:
    # metrics.json is written last by run(): its presence marks a complete run folder.
    present = sorted(p.name for p in job.iterdir())
    assert (job / "metrics.json").is_file(), f"{job} has no metrics.json: {present}"
    return json.loads((job / "metrics.json").read_text())["flat"]


def _wandb_summary(run_dir: Path) -> dict:
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def _final_states(array_id: str, tries: int = 30) -> dict[str, str]:
    """sacct's state of every task of a job array, once none is still finishing (a task's
    result pickle, which ends submitit's wait, is written just before its process exits)."""
    states: dict[str, str] = {}
    for _ in range(tries):
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", array_id, "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        if states and not any(s in ("PENDING", "RUNNING", "COMPLETING") for s in states.values()):
            break
        time.sleep(1)
    return states


def test_three_bit_widths_each_get_a_run_folder_and_wandb_run(run_sweep, small_text):
    sweep = run_sweep(
        "model=tiny_llama",
        "debug=default",
        "logger=wandb",
        "compressor=rtn",
        "compressor.bits=2,3,4",
        "data=text_file",
        f"data.path={small_text}",
        timeout=420,
        name="bits",
    )
    assert sweep.proc.returncode == 0, sweep.diagnostics()
    jobs = sweep.job_dirs()
    assert [j.name for j in jobs] == ["0", "1", "2"], sweep.diagnostics()
    assert len(sweep.array_ids) == 1, f"expected one job array, got {sweep.array_ids}"

    run_ids = set()
    for job in jobs:
        bits = int(_overrides(job)["compressor.bits"])
        assert _metrics(job)["compressor/nominal_bits"] == bits
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job}: expected one W&B offline run, found {runs}"
        wb = _wandb_summary(runs[0])
        assert wb["state"] == "finished" and wb["exit_code"] == 0, wb
        assert wb["config"]["compressor"]["bits"] == bits
        assert wb["summary"]["compressor/nominal_bits"] == bits
        run_ids.add(wb["run_id"])
    assert len(run_ids) == 3, "jobs merged into a shared W&B run"
    assert sorted(int(_overrides(j)["compressor.bits"]) for j in jobs) == [2, 3, 4]


def test_twenty_job_sweep_loses_no_result(run_sweep, small_text, slurm_cluster):
    bits, groups = [2, 3, 4, 5, 6], ["16", "32", "64", "null"]
    # stages=[compressor] and save_model=false keep each job to the import, one RTN pass and two
    # evaluations: 20 jobs share 2 cores.
    sweep = run_sweep(
        "model=tiny_llama",
        "debug=default",
        "stages=[compressor]",
        "save_model=false",
        f"compressor.bits={','.join(map(str, bits))}",
        f"compressor.group_size={','.join(groups)}",
        "data=text_file",
        f"data.path={small_text}",
        timeout=900,
        name="grid",
    )
    assert sweep.proc.returncode == 0, sweep.diagnostics()
    jobs = sweep.job_dirs()
    assert len(jobs) == 20, sweep.diagnostics()
    results = {}
    for job in jobs:
        o = _overrides(job)
        flat = _metrics(job)
        assert flat["compressor/nominal_bits"] == int(o["compressor.bits"])
        results[(int(o["compressor.bits"]), o["compressor.group_size"])] = flat
    assert sorted(results) == sorted(itertools.product(bits, groups)), "a combination ran twice"
    # Per-channel scales cost fewer bits than any grouped setting at the same width: each
    # folder holds the result of its own combination, not a neighbour's.
    for b in bits:
        per_channel, grouped = results[(b, "null")], results[(b, "16")]
        assert per_channel["compressor/bits_per_weight"] < grouped["compressor/bits_per_weight"]
    if slurm_cluster.accounting:
        (array_id,) = sweep.array_ids
        states = _final_states(array_id)
        assert len(states) == 20 and set(states.values()) == {"COMPLETED"}, states


def test_a_failing_job_fails_the_sweep_with_its_error(run_sweep, slurm_cluster, tmp_path):
    """A job that dies without a result (here sculpt exits 2 on a missing data file) must end
    the sweep with the job's own error, not leave it waiting: that needs sacct's FAILED."""
    if not slurm_cluster.accounting:
        pytest.skip("without slurmdbd (SLURM_ACCOUNTING=0) submitit cannot see a job fail")
    missing = tmp_path / "missing.txt"
    sweep = run_sweep(
        "model=tiny_llama",
        "debug=default",
        "stages=[compressor]",
        "save_model=false",
        "compressor.bits=2,3",
        "data=text_file",
        f"data.path={missing}",
        timeout=300,
        name="failing",
    )
    assert sweep.proc.returncode != 0, sweep.diagnostics()
    assert f"{missing} does not exist" in sweep.proc.stderr, sweep.diagnostics()
