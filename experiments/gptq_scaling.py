"""GPTQ's wall time against model size: three Llama-shaped models (a tiny one, a mid-size
one, SmolLM2-135M), the same number of calibration windows of the protocol's Shakespeare,
the same GPTQ settings (conf/compressor/gptq.yaml's defaults), timed end to end
(calibration passes, Hessians, the per-layer solves). Prints a table and the log-log slope
of time against the number of quantized weights, and writes them as JSON (atomically).

    .venv/bin/python experiments/gptq_scaling.py --windows 16 --out outputs/gptq_scaling.json

Memory: each row also reports the process's resident memory once the model and windows
are loaded and its peak during GPTQ (sampled, framework.eval.measure), beside the fp32
size of the model's parameters; `--offload` keeps the block activations in a file
(compressor.offload_activations), `--offload-weights` the block linears' weights in mapped
files (compressor.offload_weights), `--batch-size` sets the windows per forward chunk.
Scratch files go to a temporary folder under --out's folder (a disk, not a RAM-backed /tmp:
page cache of a disk file is reclaimable, a tmpfs file's pages are not).

Why the slope need not be 1: per layer, the Hessian costs tokens x d_in^2 and the solve
rows x d_in^2 + d_in^3, so at a fixed token count the time grows like weights x d_in, a
little faster than the weight count when the models also get wider. The tiny and mid-size
models are randomly initialised (time does not depend on the weights' values); SmolLM2 is
the packaged pretrained model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import tempfile
from pathlib import Path

import torch

from framework.data import WindowSpec, make_windows, tokenize
from framework.data.sources import shakespeare
from framework.eval import measure
from framework.eval.resources import rss_bytes
from framework.io import atomic_write_text
from framework.models import block_linears, build_tiny_llama, load_packaged
from framework.plugins import Context
from plugins.compressors.gptq import GPTQ

SIZES = {
    "tiny": lambda: build_tiny_llama(layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2),
    "mid": lambda: build_tiny_llama(
        layers=12, hidden=384, intermediate=1024, heads=6, kv_heads=2, max_positions=2048
    ),
    "smollm2": lambda: load_packaged("smollm2-135m-instruct"),
}


def time_gptq(
    name: str,
    windows: int,
    seq_len: int,
    bits: int,
    group: int,
    offload: bool,
    offload_weights: bool,
    batch_size: int,
    scratch: Path,
) -> dict:
    loaded = SIZES[name]()
    ids = tokenize(loaded.tokenizer, shakespeare()[:2_000_000])
    cal = make_windows(ids, WindowSpec(source="", windows=windows, seq_len=seq_len), "cal")
    weights = sum(m.weight.numel() for m in block_linears(loaded.model, loaded.arch).values())
    hidden = loaded.model.config.hidden_size
    # A group must fit the model's widths; the protocol's 192 does not divide 64.
    g = group if hidden % group == 0 else hidden
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        ctx = Context(
            tokenizer=loaded.tokenizer,
            arch=loaded.arch,
            output_dir=Path(tmp),
            calibration_loader=lambda: cal,
        )
        loaded_rss_mb = rss_bytes() / 2**20
        gptq = GPTQ(
            bits=bits,
            group_size=g,
            offload_activations=offload,
            offload_weights=offload_weights,
            batch_size=batch_size,
        )
        with measure() as m:
            gptq.quantize(loaded.model, ctx)
    model_mb = sum(p.numel() * 4 for p in loaded.model.parameters()) / 2**20
    return {
        "model": name,
        "quantized_weights": weights,
        "hidden": hidden,
        "layers": loaded.model.config.num_hidden_layers,
        "group_size": g,
        "seconds": m.seconds,
        "offload_activations": offload,
        "offload_weights": offload_weights,
        "batch_size": batch_size,
        "fp32_model_mb": model_mb,
        "loaded_rss_mb": loaded_rss_mb,
        "peak_rss_mb": m.peak_rss_mb,
        "added_rss_mb": m.peak_rss_mb - m.start_rss_mb,
    }


def loglog_slope(rows: list[dict]) -> float:
    """Least-squares slope of log(seconds) on log(weights)."""
    xs = [math.log(r["quantized_weights"]) for r in rows]
    ys = [math.log(r["seconds"]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,mid,smollm2")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=192)
    ap.add_argument("--offload", action="store_true", help="block activations in a file")
    ap.add_argument("--offload-weights", action="store_true", help="block weights in mapped files")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward chunk")
    ap.add_argument("--out", type=Path, default=Path("outputs/gptq_scaling.json"))
    args = ap.parse_args()
    names = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        row = time_gptq(
            name,
            args.windows,
            args.seq_len,
            args.bits,
            args.group_size,
            args.offload,
            args.offload_weights,
            args.batch_size,
            args.out.parent,
        )
        rows.append(row)
        print(
            f"{name:8s} {row['quantized_weights']:>12,d} weights  hidden {row['hidden']:4d}  "
            f"{row['seconds']:8.1f} s  fp32 model {row['fp32_model_mb']:6.0f} MiB  RSS loaded "
            f"{row['loaded_rss_mb']:6.0f}, peak {row['peak_rss_mb']:6.0f} MiB "
            f"(x{row['peak_rss_mb'] / row['fp32_model_mb']:.2f} the model; GPTQ added "
            f"{row['added_rss_mb']:.0f})",
            flush=True,
        )
    slope = loglog_slope(rows) if len(rows) >= 2 else float("nan")
    # The smallest model's time is mostly fixed cost (Python, thread start, loading the
    # calibration into the first block): the slope of the two largest says more.
    largest = sorted(rows, key=lambda r: r["quantized_weights"])[-2:]
    slope_large = loglog_slope(largest) if len(rows) >= 3 else slope
    print(f"log-log slope of time on weights: {slope:.3f} (all), {slope_large:.3f} (two largest)")
    result = {
        "rows": rows,
        "loglog_slope": slope,
        "loglog_slope_two_largest": slope_large,
        "windows": args.windows,
        "seq_len": args.seq_len,
        "bits": args.bits,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
