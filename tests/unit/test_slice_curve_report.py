"""experiments/slice_curve_report.py, run as a user runs it, on synthetic multirun folders
laid out as sculpt and Hydra write them (metrics.json, .hydra/config.yaml)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "slice_curve_report.py"


def _write_run(folder: Path, sparsity: float, ppl: float, steps: int = 0) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"compressor:\n  basis: global\n  sparsity: {sparsity}\n  rotation_steps: {steps}\n"
    )
    flat = {
        "compressor/sliced_fraction": sparsity,
        "compressor/hidden_after": round(576 * (1 - sparsity)),
        "compressor/pca_spectrum_kept": 1 - sparsity / 10,
        "compressor/seconds": 100.0,
        "final/perplexity": ppl,
        "final/kl": 0.5,
        "final/top1_agreement": 0.6,
        "reference/perplexity": 10.0,
    }
    (folder / "metrics.json").write_text(json.dumps({"flat": flat, "stages": []}))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_table_and_plot_from_two_sweeps(tmp_path: Path) -> None:
    _write_run(tmp_path / "pca" / "0", 0.25, 40.0)
    _write_run(tmp_path / "pca" / "1", 0.1, 15.0)
    _write_run(tmp_path / "rot" / "0", 0.1, 12.0, steps=60)
    out = tmp_path / "report"
    done = _run(str(tmp_path / "pca"), str(tmp_path / "rot"), "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| global")]
    assert rows == [
        "| global + 60 rotation steps | 10.0% | 518 | 12.00 | +20% | 0.500 | 60.00% | 1.00% | 100 |",
        "| global PCA | 10.0% | 518 | 15.00 | +50% | 0.500 | 60.00% | 1.00% | 100 |",
        "| global PCA | 25.0% | 432 | 40.00 | +300% | 0.500 | 60.00% | 2.50% | 100 |",
    ]
    assert (out / "slice_curve.md").read_text().count("| global") == 3
    assert (out / "slice_curve.png").stat().st_size > 0


def test_an_unfinished_run_is_a_one_line_error(tmp_path: Path) -> None:
    _write_run(tmp_path / "sweep" / "0", 0.25, 40.0)
    (tmp_path / "sweep" / "1" / ".hydra").mkdir(parents=True)
    done = _run(str(tmp_path / "sweep"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "sweep/1/metrics.json: missing" in lines[0], done.stderr
