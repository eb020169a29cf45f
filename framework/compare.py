"""`sculpt compare` (also `sculpt-compare`): one table and one plot from many runs.

Offline, it reads the W&B offline runs under the folders given (run folders, sweep folders,
anything above them) straight from their .wandb files; online, it asks the W&B API for an
entity/project, optionally one group (a sweep). Columns are the config keys that differ
between the runs, then the metrics asked for; the plot is one metric against another,
a line per group.

  sculpt compare logs/sculpt/multiruns/2026-11-28_07-00-00
  sculpt compare --online --entity me --project sculpt --group sculpt-2026-11-28_07-00-00
  sculpt compare DIR --metrics final/perplexity final/kl --x compressor/bits_per_weight --out cmp/
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.errors import SculptError

DEFAULT_METRICS = (
    "final/perplexity",
    "final/kl",
    "final/top1_agreement",
    "compressor/bits_per_weight",
)
# Config keys that differ between runs without saying anything about what they compute.
IGNORED_CONFIG = ("paths.", "hydra.", "logger.", "launcher.", "interactive", "_wandb")


@dataclass
class RunRow:
    run_id: str
    name: str
    group: str
    job_type: str
    source: str  # where it was read from
    config: dict[str, Any] = field(default_factory=dict)  # flattened, dotted keys
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = True


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        if set(data) == {"value"} or (set(data) == {"desc", "value"}):  # W&B's config wrapper
            return _flatten(data["value"], prefix)
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def offline_runs(roots: list[Path]) -> list[RunRow]:
    """Every offline run under `roots`. A run resumed after a requeue appears once per
    attempt (same run id); the attempts merge, later values winning, as W&B merges them."""
    from framework.wandb_offline import WandbLogError, find_run_files, read_run

    files: list[Path] = []
    for root in roots:
        if not root.exists():
            raise SculptError(f"{root}: no such file or folder")
        found = [root] if root.suffix == ".wandb" else find_run_files(root)
        files.extend(found)
    rows: dict[str, RunRow] = {}
    for path in sorted(set(files), key=lambda p: p.stat().st_mtime):
        try:
            run = read_run(path)
        except WandbLogError as exc:
            raise SculptError(str(exc)) from exc
        row = rows.setdefault(
            run.run_id,
            RunRow(
                run_id=run.run_id,
                name=run.display_name,
                group=run.group,
                job_type=run.job_type,
                source=str(path.parent),
            ),
        )
        row.config.update(_flatten(run.config))
        row.summary.update(run.metrics())
        row.summary.update(run.summary)
        row.finished = run.exit_code == 0
        row.source = str(path.parent)
    return list(rows.values())


def online_runs(entity: str | None, project: str, group: str | None) -> list[RunRow]:
    import wandb

    filters = {"group": group} if group else {}
    path = f"{entity}/{project}" if entity else project
    rows = []
    for run in wandb.Api().runs(path, filters=filters):
        rows.append(
            RunRow(
                run_id=run.id,
                name=run.name,
                group=run.group or "",
                job_type=run.job_type or "",
                source=run.url,
                config=_flatten(dict(run.config)),
                summary=dict(run.summary),
                finished=run.state == "finished",
            )
        )
    return rows


def varying_keys(rows: list[RunRow]) -> list[str]:
    keys = sorted({k for r in rows for k in r.config})
    out = []
    for key in keys:
        if key.startswith(IGNORED_CONFIG):
            continue
        values = {repr(r.config.get(key)) for r in rows}
        if len(values) > 1:
            out.append(key)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table(rows: list[RunRow], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    config_cols = varying_keys(rows)
    header = ["run", *config_cols, *metrics]
    body = []
    for r in rows:
        body.append(
            [
                r.name or r.run_id,
                *(_fmt(r.config.get(k)) for k in config_cols),
                *(_fmt(r.summary.get(m)) for m in metrics),
            ]
        )
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def plot(rows: list[RunRow], x: str, y: str, path: Path) -> Path | None:
    from framework.plots import line_plot

    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        xv, yv = r.summary.get(x), r.summary.get(y)
        if not isinstance(xv, int | float) or not isinstance(yv, int | float):
            continue
        xs, ys = series.setdefault(r.group or r.job_type or "runs", ([], []))
        xs.append(float(xv))
        ys.append(float(yv))
    if not series:
        return None
    for key, (xs, ys) in series.items():
        order = sorted(range(len(xs)), key=xs.__getitem__)
        series[key] = ([xs[i] for i in order], [ys[i] for i in order])
    return line_plot(path, series, title=f"{y} vs {x}", xlabel=x, ylabel=y, logy="perplexity" in y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sculpt compare", description="Compare runs logged to W&B (offline folders or online)."
    )
    parser.add_argument("paths", nargs="*", type=Path, help="run or sweep folders (offline)")
    parser.add_argument("--online", action="store_true", help="read runs through the W&B API")
    parser.add_argument("--entity")
    parser.add_argument("--project", default="sculpt")
    parser.add_argument("--group", help="only runs of this group (a sweep)")
    parser.add_argument("--metrics", nargs="+", default=None, help="summary keys to show")
    parser.add_argument("--x", default="compressor/bits_per_weight", help="plot x axis")
    parser.add_argument("--y", default="final/perplexity", help="plot y axis")
    parser.add_argument("--out", type=Path, help="folder for compare.md, compare.csv, compare.png")
    args = parser.parse_args(argv)
    try:
        if args.online:
            rows = online_runs(args.entity, args.project, args.group)
        else:
            if not args.paths:
                raise SculptError("compare: give run or sweep folders, or --online")
            rows = offline_runs(args.paths)
            if args.group:
                rows = [r for r in rows if r.group == args.group]
        if not rows:
            raise SculptError("compare: no W&B runs found (was the run made with logger=none?)")
        metrics = args.metrics or [m for m in DEFAULT_METRICS if any(m in r.summary for r in rows)]
        header, body = table(rows, metrics)
        _print_rich(header, body)
        if args.out:
            from framework.io import atomic_write_text

            atomic_write_text(args.out / "compare.md", markdown(header, body))
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(header)
            writer.writerows(body)
            atomic_write_text(args.out / "compare.csv", buffer.getvalue())
            png = plot(rows, args.x, args.y, args.out / "compare.png")
            print(
                f"wrote {args.out / 'compare.md'}, compare.csv" + (", compare.png" if png else "")
            )
    except SculptError as exc:
        print(f"sculpt: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_rich(header: list[str], body: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{len(body)} run(s)")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for cells in body:
        t.add_row(*cells)
    Console(width=max(100, sum(len(h) + 3 for h in header))).print(t)


if __name__ == "__main__":
    sys.exit(main())
