"""The rd_curve experiment's collector: one Markdown table and one rate-distortion plot from
the run folders of a multirun (experiments/rd_curve.yaml).

`sculpt compare` reads W&B runs; this reads what every run writes whatever its logger
(logger=none included): each run folder's metrics.json (its presence marks a finished run)
and Hydra's .hydra/ record of the options chosen. A method is the `compressor` option the
job ran with (rtn, gptq, peer_gptq, ...), falling back to the plugin's class name.

  python experiments/rd_curve_report.py outputs/rd_curve/multiruns/2026-11-28_13-00-00
  python experiments/rd_curve_report.py SWEEP [SWEEP_OR_RUN ...] --out docs/rd_curve

Writes rd_curve.md and rd_curve.png (perplexity, log scale, against bits per weight
counted from the container, one line per method) into --out (default: the first folder
given), each atomically. A run folder without a readable metrics.json is a one-line error
(exit 2); --skip-incomplete leaves such runs out instead and names them in the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framework.errors import SculptError
from framework.io import atomic_write_text
from framework.plots import pyplot, save_figure

REPORT_MD = "rd_curve.md"
REPORT_PNG = "rd_curve.png"


@dataclass
class RunPoint:
    """One run's row: a compressor at one nominal rate, as measured by the runner."""

    folder: Path
    method: str
    nominal_bits: float | None
    bits_per_weight: float | None
    perplexity: float | None
    kl: float | None
    top1: float | None
    seconds: float | None
    own_seconds: float | None  # the method's own quantization time, where it reports one
    reference_perplexity: float | None
    # Weight-count-weighted mean of R - R_G(MSE) over the coded tensors: how many bits per
    # weight above Shannon's D(R) for a Gaussian of each tensor's variance (None: not logged).
    gap_bits: float | None = None
    # CPU seconds of the quantizer (the stage's process, or the peer's own process for its
    # GPTQ): the figure to compare when runs shared the machine with different loads.
    cpu_seconds: float | None = None


def _is_run_folder(path: Path) -> bool:
    return (path / "metrics.json").exists() or (path / ".hydra").is_dir()


def find_runs(roots: Iterable[Path]) -> list[Path]:
    """Run folders given directly or found below the folders given (a multirun's job
    folders are its numbered children; Hydra's own files beside them are skipped)."""
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            raise SculptError(f"{root}: no such folder")
        if _is_run_folder(root):
            found.append(root)
            continue
        below = sorted(
            (p.parent for p in root.rglob(".hydra") if p.is_dir()),
            key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts],
        )
        below = [p for p in below if p != root]
        if not below:
            raise SculptError(f"{root}: no run folders below it (none has a .hydra/ folder)")
        found.extend(below)
    return list(dict.fromkeys(found))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _hydra_record(folder: Path) -> tuple[str | None, Any]:
    """(compressor option chosen, its nominal rate) from the run's .hydra/ files, when there."""
    from omegaconf import OmegaConf

    option, bits = None, None
    hydra_yaml, config_yaml = folder / ".hydra" / "hydra.yaml", folder / ".hydra" / "config.yaml"
    try:
        if hydra_yaml.exists():
            choice = OmegaConf.select(
                OmegaConf.load(hydra_yaml), "hydra.runtime.choices.compressor"
            )
            option = str(choice) if choice not in (None, "null") else None
        if config_yaml.exists():
            node = OmegaConf.load(config_yaml)
            # rd_alloc takes a budget of bits per weight instead of a code width
            bits = OmegaConf.select(node, "compressor.bits")
            if bits is None:
                bits = OmegaConf.select(node, "compressor.budget_bits")
    except Exception as exc:  # a damaged record must not pass for another method's
        raise SculptError(f"{folder / '.hydra'}: unreadable ({exc})") from exc
    return option, bits


def read_run(folder: Path) -> RunPoint:
    path = folder / "metrics.json"
    if not path.exists():
        failed = folder / "FAILED"
        why = (
            f"the run failed: {failed.read_text(errors='replace').strip().splitlines()[0]}"
            if failed.exists() and failed.read_text(errors="replace").strip()
            else "the run has not finished: killed, or still running"
        )
        raise SculptError(f"{path}: missing ({why})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SculptError(f"{path}: corrupt ({' '.join(str(exc).split())})") from exc
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        raise SculptError(f"{path}: corrupt (no list of stages)")
    compressors = [s for s in stages if s.get("kind") == "compressor"]
    if not compressors:
        raise SculptError(f"{path}: no compressor stage in this run")
    stage = compressors[-1]
    metrics, evaluation = stage.get("metrics"), stage.get("eval")
    if not isinstance(metrics, dict) or not isinstance(evaluation, dict):
        raise SculptError(f"{path}: corrupt (stage '{stage.get('name')}' has no metrics/eval)")
    reference = next((s for s in stages if s.get("kind") == "reference"), {})
    option, bits = _hydra_record(folder)
    target = str(stage.get("target") or "")
    method = option or target.rsplit(".", 1)[-1].lower() or "?"
    # The rate the run asked for (its config) first; the stage's own figure only without one.
    nominal = _number(bits)
    if nominal is None:
        nominal = _number(metrics.get("nominal_bits"))
    return RunPoint(
        folder=folder,
        method=method,
        nominal_bits=nominal,
        bits_per_weight=_number(metrics.get("bits_per_weight")),
        perplexity=_number(evaluation.get("perplexity")),
        kl=_number(evaluation.get("kl")),
        top1=_number(evaluation.get("top1_agreement")),
        seconds=_number(metrics.get("seconds")),
        own_seconds=_number(metrics.get("peer_seconds")),
        reference_perplexity=_number((reference.get("eval") or {}).get("perplexity")),
        gap_bits=_number(metrics.get("mean_gap_bits")),
        cpu_seconds=_number(metrics.get("peer_cpu_seconds", metrics.get("cpu_seconds"))),
    )


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def _ppl(value: float | None) -> str:
    # Collapsed 2-bit runs reach 1e5 and more: thousands separators, no decimals there.
    if value is not None and math.isfinite(value) and value >= 1000:
        return f"{value:,.0f}"
    return _fmt(value, ".2f")


def markdown(points: list[RunPoint], skipped: list[str], root: Path) -> str:
    lines = [
        "# Rate-distortion: perplexity against bits per weight",
        "",
        "| method | nominal bits | bits/weight | perplexity | KL | top-1 | gap to D(R), bits "
        "| compression s | quantizer CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p.method} | {_fmt(p.nominal_bits, 'g')} | {_fmt(p.bits_per_weight, '.3f')} "
            f"| {_ppl(p.perplexity)} | {_fmt(p.kl, '.4f')} | {_fmt(p.top1, '.2%')} "
            f"| {_fmt(p.gap_bits, '.3f')} | {_fmt(p.seconds, '.0f')} "
            f"| {_fmt(p.cpu_seconds, '.0f')} |"
        )
    lines.append("")
    refs = sorted({round(p.reference_perplexity, 6) for p in points if p.reference_perplexity})
    if len(refs) == 1:
        lines.append(f"Reference (uncompressed) perplexity: {refs[0]:.2f}.")
    elif len(refs) > 1:
        # Different reference figures mean different evaluation windows or models: the rows
        # are then not comparable, which the table must not hide.
        lines.append(
            "WARNING: the runs' reference perplexities differ "
            f"({', '.join(f'{r:.2f}' for r in refs)}): not the same protocol."
        )
    lines.append(
        "bits/weight: every stored bit of the block linears (codes, scales, zero points, side "
        "information) over their weight count, from the container written; compression s: "
        "the stage's wall time in the runner; quantizer CPU s: the CPU time of the process "
        "that quantized (the peer's own process for llm-compressor), all threads."
    )
    own = [p for p in points if p.own_seconds is not None]
    if own:
        lines.append(
            "The peer's own quantization time (inside its process, without the model hand-over): "
            + ", ".join(
                f"{p.method} {_fmt(p.nominal_bits, 'g')}-bit {p.own_seconds:.0f} s" for p in own
            )
            + "."
        )
    if skipped:
        lines.append("")
        lines.append("Left out (incomplete):")
        lines += [f"- {s}" for s in skipped]
    lines.append("")
    lines.append("Runs: " + ", ".join(f"`{_rel(p.folder, root)}`" for p in points))
    lines.append("")
    lines.append(f"![perplexity against bits per weight]({REPORT_PNG})")
    return "\n".join(lines) + "\n"


def _rel(folder: Path, root: Path) -> str:
    try:
        return str(folder.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(folder)


def plot(points: list[RunPoint], path: Path) -> Path:
    """Left: perplexity against bits per weight. Right, where the runs logged it: each
    method's mean distance above the Gaussian D(R) in bits (0 = Shannon's bound for a
    Gaussian source of the weights' variance; a lossless code sits at minus infinity)."""
    plt = pyplot()
    with_gap = [
        p
        for p in points
        if p.gap_bits is not None and math.isfinite(p.gap_bits) and p.bits_per_weight
    ]
    fig, axes = plt.subplots(1, 2 if with_gap else 1, figsize=(11 if with_gap else 6.5, 4))
    ax = axes[0] if with_gap else axes
    by_method: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if p.bits_per_weight is None or p.perplexity is None:
            continue
        if not (math.isfinite(p.perplexity) and p.perplexity > 0):
            continue  # a log axis has no place for it; the table still shows it
        by_method.setdefault(p.method, []).append((p.bits_per_weight, p.perplexity))
    colors = {m: f"C{i}" for i, m in enumerate(sorted({p.method for p in points}))}
    for method, xy in by_method.items():
        xy.sort()
        ax.plot(
            [x for x, _ in xy], [y for _, y in xy], marker="o", label=method, color=colors[method]
        )
    refs = [p.reference_perplexity for p in points if p.reference_perplexity]
    if refs:
        ax.axhline(refs[0], color="gray", linestyle="--", linewidth=1, label="reference")
    ax.set_yscale("log")
    ax.set(
        title="Perplexity against rate",
        xlabel="bits per weight (counted from the container)",
        ylabel="perplexity (log scale)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if with_gap:
        gap_ax = axes[1]
        gaps: dict[str, list[tuple[float, float]]] = {}
        for p in with_gap:
            gaps.setdefault(p.method, []).append((p.bits_per_weight, p.gap_bits))
        for method, xy in gaps.items():
            xy.sort()
            gap_ax.plot(
                [x for x, _ in xy],
                [y for _, y in xy],
                marker="o",
                label=method,
                color=colors[method],
            )
        gap_ax.axhline(0.0, color="black", linewidth=1, label="Gaussian D(R) (Shannon)")
        gap_ax.set(
            title="Distance above the Gaussian D(R)",
            xlabel="bits per weight (counted from the container)",
            ylabel="mean R - R(D), bits per weight",
        )
        gap_ax.grid(alpha=0.3)
        gap_ax.legend()
    return save_figure(fig, path)


def collect(
    roots: list[Path], out: Path | None = None, skip_incomplete: bool = False
) -> tuple[Path, Path]:
    """Read every run below `roots`, write the table and the plot; -> their paths."""
    points, skipped = [], []
    for folder in find_runs(roots):
        try:
            points.append(read_run(folder))
        except SculptError as exc:
            if not skip_incomplete:
                raise
            skipped.append(str(exc))
    if not points:
        raise SculptError(f"{roots[0]}: no complete run to report")
    points.sort(key=lambda p: (p.method, p.nominal_bits or 0.0, p.bits_per_weight or 0.0))
    out = out if out is not None else roots[0]
    # Run folders are named relative to where the command ran: as the user typed them.
    md = atomic_write_text(out / REPORT_MD, markdown(points, skipped, Path.cwd()))
    png = plot(points, out / REPORT_PNG)
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rd_curve_report", description="Table and plot from rd_curve run folders."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="multirun or run folders")
    parser.add_argument("--out", type=Path, help="folder for rd_curve.md and rd_curve.png")
    parser.add_argument(
        "--skip-incomplete",
        action="store_true",
        help="leave out runs without a readable metrics.json instead of failing",
    )
    args = parser.parse_args(argv)
    try:
        md, png = collect(args.paths, args.out, args.skip_incomplete)
    except SculptError as exc:
        print(f"rd_curve_report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
