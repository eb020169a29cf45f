"""experiments/slice_reader_sensitivity.py on the real SmolLM2, as a user runs it, with
few windows: the decomposition runs, writes its table, and its stand-in for the slice
(every reader's input projected) reads what the really sliced model reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "slice_reader_sensitivity.py"


def test_reader_decomposition_on_smollm2(tmp_path: Path) -> None:
    out = tmp_path / "sensitivity.json"
    args = ["--calibration-windows", "2", "--eval-windows", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=SCRIPT.parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    ppl = {row["readers"]: row["perplexity"] for row in record["rows"]}
    reference, sliced = ppl["none (reference)"], ppl["sliced model"]
    assert record["keep"] == 432  # 25% of 576
    assert sliced > reference
    # The projection stands in for the slice: the same order of loss, not a different model.
    assert 0.5 < ppl["every reader"] / sliced < 2.0
    for label in ("q, k (attention patterns)", "v", "gate, up (MLPs)", "LM head"):
        assert ppl[label] > reference, label
    assert set(record["loss_increase_by_position"]) == {"0-8", "8-64", "64-256", "256-511"}
    assert "| gate, up (MLPs) |" in done.stdout
