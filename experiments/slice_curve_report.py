"""Slicing's quality against how much of the residual stream it deletes: one Markdown table
and one plot from the run folders of `compressor=slice` multiruns.

  sculpt -m compressor=slice compressor.sparsity=0.05,0.1,0.15,0.2,0.25,0.3,0.4 '~analyzer'
  python experiments/slice_curve_report.py SWEEP [SWEEP ...] --out docs/figures/slice_curve

A run's method is its basis (global or per_layer), with "+ N rotation steps" when it
learned a rotation (compressor.rotation_steps). The plot draws the perplexity increase over
the reference against the deleted fraction of the width, one line per method, the +30%
budget of issue #4 as a dashed line, and beside it, on its own axis, the energy the PCA
discards: by Eckart-Young the least share of the calibration stream's (RMS-normalised,
summed over every norm input) energy that any projection onto that many dimensions can
lose. A basis that discards more energy than that (a learned rotation does) trades stream
error for output error on purpose. Reads each run's metrics.json and .hydra/config.yaml,
whatever its logger was; a run folder without them is a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rd_curve_report import find_runs

from framework.errors import SculptError
from framework.io import atomic_write_text
from framework.plots import pyplot, save_figure

BUDGET = 0.30  # issue #4: slicing 25% costs at most +30% perplexity


@dataclass
class SlicePoint:
    folder: Path
    method: str
    sliced: float
    hidden: int
    perplexity: float
    reference: float
    kl: float
    top1: float
    discarded: float  # 1 - the share of the summed normalised spectrum the basis keeps
    seconds: float

    @property
    def increase(self) -> float:
        return self.perplexity / self.reference - 1


def read_point(folder: Path) -> SlicePoint:
    from omegaconf import OmegaConf

    path, record = folder / "metrics.json", folder / ".hydra" / "config.yaml"
    for needed in (path, record):
        if not needed.exists():
            raise SculptError(f"{needed}: missing (the run has not finished, or is not sculpt's)")
    try:
        flat = json.loads(path.read_text())["flat"]
        cfg = OmegaConf.load(record)
        basis = str(OmegaConf.select(cfg, "compressor.basis"))
        steps = int(OmegaConf.select(cfg, "compressor.rotation_steps", default=0) or 0)
        point = SlicePoint(
            folder=folder,
            method=basis + (f" + {steps} rotation steps" if steps else " PCA"),
            sliced=float(flat["compressor/sliced_fraction"]),
            hidden=int(flat["compressor/hidden_after"]),
            perplexity=float(flat["final/perplexity"]),
            reference=float(flat["reference/perplexity"]),
            kl=float(flat["final/kl"]),
            top1=float(flat["final/top1_agreement"]),
            discarded=1 - float(flat["compressor/pca_spectrum_kept"]),
            seconds=float(flat["compressor/seconds"]),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise SculptError(
            f"{path}: not a slice run's metrics ({type(exc).__name__}: {exc})"
        ) from exc
    return point


def markdown(points: list[SlicePoint]) -> str:
    lines = [
        "| method | deleted | hidden | perplexity | increase | KL to ref | top-1 agree "
        "| energy discarded | stage s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in sorted(points, key=lambda p: (p.method, p.sliced)):
        lines.append(
            f"| {p.method} | {p.sliced:.1%} | {p.hidden} | {p.perplexity:.2f} | "
            f"{p.increase:+.0%} | {p.kl:.3f} | {p.top1:.2%} | {p.discarded:.2%} | "
            f"{p.seconds:.0f} |"
        )
    refs = sorted({round(p.reference, 3) for p in points})
    lines.append("")
    lines.append(f"Reference perplexity: {', '.join(f'{r:.3f}' for r in refs)}.")
    return "\n".join(lines) + "\n"


def plot(points: list[SlicePoint], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method in sorted({p.method for p in points}):
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.sliced)
        ax.plot(
            [100 * p.sliced for p in mine], [100 * p.increase for p in mine], "o-", label=method
        )
    ax.axhline(100 * BUDGET, color="grey", linestyle="--", label="+30% budget (issue #4)")
    ax.set_yscale("log")
    ax.set_xlabel("residual width deleted (%)")
    ax.set_ylabel("perplexity increase over the reference (%)")
    pca = sorted((p for p in points if p.method.endswith("PCA")), key=lambda p: p.sliced)
    if pca:
        energy = ax.twinx()
        energy.plot(
            [100 * p.sliced for p in pca],
            [100 * p.discarded for p in pca],
            ":",
            color="black",
            label="energy a PCA projection discards (Eckart-Young minimum)",
        )
        energy.set_ylabel("calibration energy discarded (%)")
        handles = ax.get_legend_handles_labels()
        more = energy.get_legend_handles_labels()
        ax.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper left")
    else:
        ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("Slicing SmolLM2-135M: protocol perplexity against width deleted")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        points = [read_point(f) for f in find_runs(args.folders)]
        out = args.out or args.folders[0]
        out.mkdir(parents=True, exist_ok=True)
        table = markdown(points)
        atomic_write_text(out / "slice_curve.md", table)
        plot(points, out / "slice_curve.png")
    except SculptError as exc:
        print(f"slice_curve_report: error: {exc}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"wrote {out / 'slice_curve.md'} and {out / 'slice_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
