"""experiments/rd_curve_report.py on small synthetic multirun folders laid out as sculpt and
Hydra write them (metrics.json, .hydra/hydra.yaml, .hydra/config.yaml, FAILED)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from framework.errors import SculptError

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "rd_curve_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("rd_curve_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


report = _load()

REF_PPL = 10.64


def _write_run(
    folder: Path,
    option: str | None,
    bits: int,
    bpw: float,
    ppl: float,
    target: str = "plugins.compressors.rtn.RTN",
    extra: dict | None = None,
    nominal_in_metrics: bool = True,
    ref_ppl: float = REF_PPL,
) -> Path:
    folder.mkdir(parents=True)
    hydra = folder / ".hydra"
    hydra.mkdir()
    if option is not None:
        (hydra / "hydra.yaml").write_text(
            f"hydra:\n  runtime:\n    choices:\n      compressor: {option}\n      model: smollm2\n"
        )
    (hydra / "config.yaml").write_text(f"compressor:\n  _target_: {target}\n  bits: {bits}\n")
    metrics = {"bits_per_weight": bpw, "seconds": 12.5 * bits, **(extra or {})}
    if nominal_in_metrics:
        metrics["nominal_bits"] = float(bits)
    data = {
        "model": "smollm2-135m-instruct",
        "stages": [
            {
                "name": "reference",
                "kind": "reference",
                "target": "smollm2",
                "metrics": {"bits_per_weight": 32.0},
                "eval": {"perplexity": ref_ppl},
                "artifacts": {},
            },
            {
                "name": "compressor",
                "kind": "compressor",
                "target": target,
                "metrics": metrics,
                "eval": {"perplexity": ppl, "kl": ppl / 100, "top1_agreement": 0.9 - 0.1 / bits},
                "artifacts": {"compressed": str(folder / "compressed")},
            },
        ],
        "summary": [],
        "flat": {},
    }
    (folder / "metrics.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A 2 methods x 2 rates multirun, numbered as Hydra numbers its jobs (10 after 9)."""
    root = tmp_path / "multiruns" / "2026-11-28_13-00-00"
    (root).mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    _write_run(root / "0", "rtn", 2, 2.17, 3.5e5)
    _write_run(root / "1", "rtn", 3, 3.17, 40.0, extra={"mean_gap_bits": 0.5, "cpu_seconds": 30.0})
    _write_run(
        root / "2",
        "peer_gptq",
        2,
        2.083,
        1.2e4,
        target="plugins.compressors.peer_gptq.PeerGPTQ",
        extra={"peer_seconds": 455.0, "peer_cpu_seconds": 440.0, "cpu_seconds": 3.0},
    )
    _write_run(
        root / "10",
        "peer_gptq",
        3,
        3.083,
        25.0,
        target="plugins.compressors.peer_gptq.PeerGPTQ",
        extra={"peer_seconds": 470.0},
    )
    return root


def _rows(md: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    ]


def test_finds_jobs_in_numeric_order(sweep: Path) -> None:
    assert [p.name for p in report.find_runs([sweep])] == ["0", "1", "2", "10"]
    # a run folder given directly is itself the run
    assert report.find_runs([sweep / "1"]) == [sweep / "1"]


def test_table_and_plot(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    md_path, png_path = report.collect([sweep], out)
    assert md_path == out / "rd_curve.md" and png_path == out / "rd_curve.png"
    assert png_path.read_bytes().startswith(b"\x89PNG")
    md = md_path.read_text()
    rows = _rows(md)
    # sorted by method then nominal bits
    assert [(r[0], r[1]) for r in rows] == [
        ("peer_gptq", "2"),
        ("peer_gptq", "3"),
        ("rtn", "2"),
        ("rtn", "3"),
    ]
    # the peer's CPU time is its own process's, not the runner's hand-over
    assert rows[0] == [
        "peer_gptq",
        "2",
        "2.083",
        "12,000",
        "120.0000",
        "85.00%",
        "-",
        "25",
        "440",
    ]
    assert rows[3][8] == "30" and rows[2][8] == "-"
    # the distance above the Gaussian D(R), where the run logged it
    assert rows[3][6] == "0.500"
    assert rows[3][2:4] == ["3.170", "40.00"]
    assert "Reference (uncompressed) perplexity: 10.64." in md
    assert "peer_gptq 2-bit 455 s" in md and "peer_gptq 3-bit 470 s" in md
    # no temporary files left beside the outputs (atomic writes)
    assert sorted(p.name for p in out.iterdir()) == ["rd_curve.md", "rd_curve.png"]


def test_default_output_is_the_sweep_folder(sweep: Path) -> None:
    report.collect([sweep])
    assert (sweep / "rd_curve.md").exists() and (sweep / "rd_curve.png").exists()


def test_method_and_bits_fall_back_without_hydra_records(tmp_path: Path) -> None:
    run = _write_run(
        tmp_path / "run",
        None,
        4,
        4.08,
        15.6,
        target="plugins.compressors.gptq.GPTQ",
        nominal_in_metrics=False,
    )
    point = report.read_run(run)
    assert point.method == "gptq"
    assert point.nominal_bits == 4.0  # from .hydra/config.yaml's compressor.bits


def test_missing_metrics_is_one_line(sweep: Path) -> None:
    (sweep / "1" / "metrics.json").unlink()
    with pytest.raises(
        SculptError, match=r"1/metrics.json: missing \(the run has not finished: killed"
    ) as e:
        report.collect([sweep])
    assert "\n" not in str(e.value)


def test_missing_metrics_of_a_failed_run_says_why(sweep: Path) -> None:
    (sweep / "1" / "metrics.json").unlink()
    (sweep / "1" / "FAILED").write_text("compressor.bits: 9 must be in [2, 8]\n")
    with pytest.raises(SculptError, match=r"the run failed: compressor.bits: 9 must be in"):
        report.collect([sweep])


@pytest.mark.parametrize(
    "content, detail",
    [
        ('{"stages": [', "corrupt"),
        ("\x00\xff\xfe", "corrupt"),
        ('{"model": "x"}', "corrupt \\(no list of stages\\)"),
        ('{"stages": [{"kind": "reference", "metrics": {}, "eval": {}}]}', "no compressor stage"),
    ],
)
def test_corrupt_metrics_is_one_line(sweep: Path, content: str, detail: str) -> None:
    (sweep / "2" / "metrics.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(SculptError, match=rf"2/metrics.json: {detail}") as e:
        report.collect([sweep])
    assert "\n" not in str(e.value)


def test_skip_incomplete_names_the_runs_left_out(sweep: Path, tmp_path: Path) -> None:
    (sweep / "0" / "metrics.json").unlink()
    md_path, _ = report.collect([sweep], tmp_path / "r", skip_incomplete=True)
    md = md_path.read_text()
    assert len(_rows(md)) == 3
    assert "Left out (incomplete):" in md and "0/metrics.json: missing" in md


def test_mixed_protocols_are_flagged(sweep: Path, tmp_path: Path) -> None:
    _write_run(sweep / "11", "rtn", 4, 4.17, 12.0, ref_ppl=7.2)
    md = report.collect([sweep], tmp_path / "r")[0].read_text()
    assert "WARNING: the runs' reference perplexities differ" in md


def test_no_runs_below_a_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SculptError, match="no run folders below it"):
        report.collect([tmp_path / "empty"])
    with pytest.raises(SculptError, match="no such folder"):
        report.collect([tmp_path / "absent"])


def test_command_line_exit_codes(sweep: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, str(SCRIPT), str(sweep), "--out", str(tmp_path / "cli")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / "rd_curve.md").exists()
    (sweep / "1" / "metrics.json").write_text("{")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(sweep)], capture_output=True, text=True)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rd_curve_report: error: ")
    assert "metrics.json: corrupt" in lines[0]
