"""The run's summary as rows, as Markdown (report.md) and as a rich table (terminal)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from framework.run import RunResult

COLUMNS = [
    ("stage", "stage"),
    ("perplexity", "ppl"),
    ("kl", "KL to ref"),
    ("top1_agreement", "top-1 agree"),
    ("cosine_to_reference", "cos to ref"),
    ("bits_per_weight", "bits/weight"),
    ("bytes", "container size"),
    ("seconds", "time s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("eval_seconds", "eval s"),
]


def summary_rows(result: RunResult) -> list[dict[str, Any]]:
    rows = []
    for r in result.stages:
        m, e = r.metrics, r.eval
        row: dict[str, Any] = {
            "stage": r.name if r.name == r.kind or r.kind == "reference" else f"{r.name} ({r.kind})"
        }
        for key in ("perplexity", "kl", "top1_agreement", "cosine_to_reference", "eval_seconds"):
            row[key] = e.get(key)
        row["bits_per_weight"] = m.get("bits_per_weight")
        row["bytes"] = m.get("container_bytes")
        row["seconds"] = m.get("seconds", m.get("load_seconds"))
        row["peak_rss_mb"] = m.get("peak_rss_mb", m.get("load_peak_rss_mb"))
        rows.append(row)
    # Drop columns no stage filled (e.g. cosine for a causal LM).
    keep = [k for k, _ in COLUMNS if any(row.get(k) is not None for row in rows)]
    return [{k: row.get(k) for k in keep} for row in rows]


def fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "bytes":
        return f"{value / 2**20:,.2f} MiB"
    if key in ("kl",):
        return f"{value:.4f}"
    if key in ("top1_agreement", "cosine_to_reference"):
        return f"{value:.2%}" if key == "top1_agreement" else f"{value:.5f}"
    if key in ("perplexity",):
        return f"{value:,.3f}"
    if key == "bits_per_weight":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def headers(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    present = set(rows[0]) if rows else set()
    return [(k, h) for k, h in COLUMNS if k in present]


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_(empty)_\n"
    cols = columns or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def render_report(result: RunResult, cfg: DictConfig) -> str:
    rows = summary_rows(result)
    cols = headers(rows)
    out = [f"# sculpt run: {result.model_name}\n", f"Output folder: `{result.output_dir}`\n"]
    out.append("## Summary\n")
    out.append("| " + " | ".join(h for _, h in cols) + " |")
    out.append("|" + "---|" * len(cols))
    for row in rows:
        out.append("| " + " | ".join(fmt(k, row.get(k)) for k, _ in cols) + " |")
    out.append("")
    out.append(
        "Perplexity = exp(mean next-token NLL) over the evaluation windows; KL = mean per-token "
        "KL(reference || model); bits/weight = payload bytes x 8 / coded weights, counted from "
        "the container on disk.\n"
    )
    for r in result.stages[1:]:
        if not (r.tables or r.plots or r.artifacts):
            continue
        out.append(f"## Stage `{r.name}` ({r.target})\n")
        for name, path in r.artifacts.items():
            out.append(
                f"- artifact `{name}`: `{Path(path).relative_to(result.output_dir) if _inside(path, result.output_dir) else path}`"
            )
        for name, path in r.plots.items():
            rel = (
                Path(path).relative_to(result.output_dir)
                if _inside(path, result.output_dir)
                else path
            )
            out.append(f"\n![{name}]({rel})\n")
        for name, table in r.tables.items():
            out.append(f"\n### {name}\n")
            out.append(markdown_table(table))
    out.append("## Config\n")
    out.append("```yaml\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```\n")
    model_bytes = result.stages[-1].metrics.get("model_dir_bytes")
    if model_bytes:
        out.append(f"Saved model folder `model/`: {model_bytes:,.0f} bytes.\n")
    out.append(f"Tracking: {result.logger_description}\n")
    return "\n".join(out)


def _inside(path: str | Path, root: Path) -> bool:
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def print_summary(result: RunResult) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(result)
    table = Table(title=f"sculpt: {result.model_name}")
    for key, head in headers(rows):
        table.add_column(head, justify="left" if key == "stage" else "right")
    for row in rows:
        table.add_row(*(fmt(k, row.get(k)) for k, _ in headers(rows)))
    console = Console(width=max(120, Console().width))
    console.print(table)
    model_bytes = result.stages[-1].metrics.get("model_dir_bytes")
    saved = f"; model/ {model_bytes / 2**20:,.1f} MiB" if model_bytes else ""
    console.print(
        f"outputs: {result.output_dir}  (report.md, metrics.json, model/, compressed/{saved})"
    )
    console.print(f"tracking: {result.logger_description}")
