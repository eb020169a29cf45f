"""Where does slicing SmolLM2's residual stream lose its perplexity? A decomposition by reader.

Slicing keeps the span of the first k columns of a basis Q (SliceGPT: the PCA of the
calibration activations at every norm input) and deletes the rest of the stream. With the
norm scales folded into the readers, every linear that reads the stream (q, k, v; gate,
up; the LM head) then sees, up to the norms' gain correction (framework.transforms.slicing,
norm_gain), the projection P = Q_k Q_k^T of what it saw before. So projecting the inputs of
*some* readers only, in the unsliced model, measures what their share of the slicing
costs: the attention patterns (q, k), the values (v), the MLPs (gate, up), the head, or
one block's MLP alone (--per-block). The row "every reader" is the whole slice seen this
way; "sliced model" is the real slice, built with transforms.slicing.slice_residual, for
comparison. It also splits the real slice's loss increase by position in the window.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/slice_reader_sensitivity.py --per-block

(about 9 minutes on 2 cores; without --per-block about 2.) Prints a table and writes it as
JSON to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--per-block", action="store_true", help="also each block's MLP alone")
    parser.add_argument("--out", default="outputs/slice_reader_sensitivity.json")
    args = parser.parse_args()

    from framework.data import WindowSpec, build_windows
    from framework.data.sources import kjv, shakespeare
    from framework.models import load_packaged
    from framework.transforms.common import block_parts
    from framework.transforms.norms import fold_norm_scales
    from framework.transforms.slicing import (
        kept_fraction,
        norm_gain,
        norm_paths,
        pca_basis,
        slice_residual,
    )
    from plugins.compressors.slice import Slice, residual_second_moments

    torch.manual_seed(0)
    start = time.time()
    loaded = load_packaged("smollm2-135m-instruct")
    model, arch = loaded.model.eval().requires_grad_(False), loaded.arch
    calibration = build_windows(
        loaded.tokenizer, WindowSpec(shakespeare, 128, 512, "random", 0), "calibration", None
    )[: args.calibration_windows]
    evaluation = build_windows(
        loaded.tokenizer, WindowSpec(kjv, args.eval_windows, 512), "evaluation", None
    )
    fold_norm_scales(model, arch)  # the readers now see x / rms(x), the stream's direction
    paths = norm_paths(model, arch)
    moments = residual_second_moments(model, paths, calibration, 4, True)
    total = sum(moments.values())
    _, basis = pca_basis(total)
    d = basis.shape[0]
    keep = Slice(sparsity=args.sparsity).kept_width(d)  # the compressor's width rule
    kept = basis[:, :keep].float()
    project = kept @ kept.T

    @torch.no_grad()
    def token_nll(m: nn.Module) -> torch.Tensor:
        rows = [
            F.cross_entropy(m(input_ids=w[None]).logits[0, :-1].float(), w[1:], reduction="none")
            for w in evaluation
        ]
        return torch.stack(rows)  # [windows, positions]

    def projected(readers: list[nn.Linear]) -> float:
        handles = [r.register_forward_pre_hook(lambda _m, a: (a[0] @ project,)) for r in readers]
        try:
            return math.exp(float(token_nll(model).mean()))
        finally:
            for h in handles:
                h.remove()

    reference = token_nll(model)
    sliced = copy.deepcopy(model)
    gains = {p: norm_gain(d, keep, kept_fraction(c, basis, keep)) for p, c in moments.items()}
    slice_residual(sliced, arch, basis, keep, gains)
    sliced_nll = token_nll(sliced)
    del sliced
    rows: list[dict[str, object]] = [
        {"readers": "none (reference)", "perplexity": math.exp(float(reference.mean()))},
        {"readers": "sliced model", "perplexity": math.exp(float(sliced_nll.mean()))},
    ]
    assert arch.head is not None
    parts = block_parts(model, arch)
    block_readers = [[p.q, p.k, p.v, *p.mlp_in] for p in parts]
    head = model.get_submodule(arch.head)
    groups: dict[str, list[nn.Linear]] = {
        "every reader": [r for readers in block_readers for r in readers] + [head],
        "q, k (attention patterns)": [r for p in parts for r in (p.q, p.k)],
        "v": [p.v for p in parts],
        "gate, up (MLPs)": [r for p in parts for r in p.mlp_in],
        "LM head": [head],
    }
    for first in range(0, len(parts), 10):
        last = min(first + 10, len(parts)) - 1
        groups[f"blocks {first}-{last}"] = [r for rs in block_readers[first : last + 1] for r in rs]
    if args.per_block:
        for i, p in enumerate(parts):
            groups[f"block {i} MLP"] = list(p.mlp_in)
    base = float(rows[0]["perplexity"])  # type: ignore[arg-type]
    for label, readers in groups.items():
        rows.append({"readers": label, "perplexity": projected(readers)})
        print(f"{label}: {rows[-1]['perplexity']:.3f}", flush=True)
    for row in rows:
        row["increase"] = float(row["perplexity"]) / base - 1  # type: ignore[arg-type]

    increase = sliced_nll - reference
    positions = [(0, 8), (8, 64), (64, 256), (256, increase.shape[1])]
    by_position = {
        f"{a}-{b}": float(increase[:, a:b].mean()) for a, b in positions if a < increase.shape[1]
    }
    print(
        f"\nslicing {args.sparsity:.0%} (hidden {d} -> {keep}), global PCA basis on "
        f"{args.calibration_windows} calibration windows, {args.eval_windows} KJV windows"
    )
    print("| inputs projected | perplexity | increase |\n|---|---|---|")
    for row in rows:
        print(f"| {row['readers']} | {row['perplexity']:.3f} | {row['increase']:+.0%} |")
    print("\nthe sliced model's loss increase (nats/token) by position in the window:")
    print(" ".join(f"{k}: {v:.3f}" for k, v in by_position.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "sparsity": args.sparsity,
        "keep": keep,
        "calibration_windows": args.calibration_windows,
        "eval_windows": args.eval_windows,
        "rows": rows,
        "loss_increase_by_position": by_position,
        "seconds": time.time() - start,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)  # atomic: a killed run leaves the previous file whole
    print(f"\n{out} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
