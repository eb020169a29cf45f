"""Screen a learned slicing basis against SliceGPT's PCA one, on SmolLM2 at 25%.

PCA keeps the directions of the residual stream that carry the most energy; what the model
needs may be other ones. This script starts from the global PCA basis Q0 (the one
`compressor=slice compressor.basis=global` computes on the protocol's 32 calibration
windows) and turns it by a learned rotation R = exp(A - A^T), A trained with Adam on
KL(original || sliced) over the same windows, the model's own weights frozen (the
SpinQuant recipe, Liu et al., 2024, arXiv:2405.16406, applied to the slicing basis instead
of a quantizer's).

The sliced model need not be rebuilt at every step: slicing to U = (Q0 R)[:, :k] is, up
to the norms' epsilon, the original model with its residual stream projected on span(U)
wherever something writes to it (embedding, o_proj, down_proj) and each norm's output
scaled by sqrt(f), f the calibration share of that norm's input energy inside span(U)
(what `transforms.slicing.norm_gain` corrects for). framework.transforms.learned_slicing's
ProjectedStream hooks do exactly that (`compressor.rotation_steps` trains the same way);
this script keeps its own loop to evaluate as it goes. `--check` prints the really sliced
model's figures at the PCA basis, to compare with step 0.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/slice_basis_screen.py --steps 40 --lr 1e-3

prints the loss per step and, every --eval-every steps, perplexity and KL on the first
--eval-windows KJV windows (reference 7.147 on 8) and on held-out Shakespeare windows
(calibration windows 32 onwards, which neither the PCA nor the rotation saw).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--check", action="store_true", help="compare with the real slice")
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default="outputs/slice_basis_screen.jsonl")
    args = parser.parse_args()

    from framework.data import WindowSpec, build_windows
    from framework.data.sources import kjv, shakespeare
    from framework.models import load_packaged
    from framework.transforms.learned_slicing import ProjectedStream, token_kl
    from framework.transforms.slicing import (
        kept_fraction,
        norm_gain,
        norm_paths,
        pca_basis,
        slice_residual,
    )
    from plugins.compressors.slice import residual_second_moments

    torch.manual_seed(0)
    loaded = load_packaged("smollm2-135m-instruct")
    model, arch = loaded.model.eval().requires_grad_(False), loaded.arch
    every = build_windows(
        loaded.tokenizer, WindowSpec(shakespeare, 128, 512, "random", 0), "calibration", None
    )
    calibration = every[: args.calibration_windows]
    held_out = every[args.calibration_windows : args.calibration_windows + args.eval_windows]
    evaluation = build_windows(
        loaded.tokenizer, WindowSpec(kjv, args.eval_windows, 512), "evaluation", None
    )

    d = model.get_submodule(arch.embed).weight.shape[1]
    keep = d - math.floor(d * args.sparsity + 1e-9)
    moments = residual_second_moments(model, norm_paths(model, arch), calibration, 4)
    _, q0 = pca_basis(sum(moments.values()))

    if args.check:  # the really sliced model at the PCA basis, to compare with step 0 below
        gains = {p: norm_gain(d, keep, kept_fraction(c, q0, keep)) for p, c in moments.items()}
        real = slice_residual(copy.deepcopy(model), arch, q0, keep, gains)
        print("really sliced:", _metrics(real, evaluation, model), flush=True)
        del real

    skew = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)
    view = ProjectedStream(model, arch, moments)

    def kept_subspace() -> torch.Tensor:
        return (q0 @ torch.linalg.matrix_exp(skew - skew.T))[:, :keep].float()

    log: list[dict[str, object]] = []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            view.u = kept_subspace()
            sliced, original = _Switch(model, view, True), _Switch(model, view, False)
            row = {
                "step": step,
                "kjv": _metrics(sliced, evaluation, original),
                "shakespeare": _metrics(sliced, held_out, original),
            }
        log.append(row)
        print(json.dumps(row), flush=True)

    evaluate(0)
    optimizer = torch.optim.Adam([skew], lr=args.lr)
    order = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        pick = torch.randint(0, calibration.shape[0], (args.batch_size,), generator=order)
        batch = calibration[pick]
        with torch.no_grad():
            target = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        view.active, view.u = True, kept_subspace()
        loss = token_kl(model(input_ids=batch, use_cache=False).logits, target)
        view.active = False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 4))
        print(f"step {step}: KL {losses[-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    result = {
        "name": args.name,
        "sparsity": args.sparsity,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_seconds": round(time.perf_counter() - start, 1),
        "evaluations": log,
        "losses": losses,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")


def _metrics(model, windows, reference) -> dict[str, float]:
    from framework.eval import evaluate_causal_lm

    out = evaluate_causal_lm(model, windows, reference=reference)
    return {k: round(float(v), 4) for k, v in out.items() if k in ("perplexity", "kl")}


class _Switch(torch.nn.Module):
    """The same model with the view active (the sliced model) or not (the original)."""

    def __init__(self, model, view, active: bool) -> None:
        super().__init__()
        self.inner, self.view, self.state = model, view, active

    def forward(self, **kwargs):
        self.view.active = self.state
        try:
            return self.inner(**kwargs)
        finally:
            self.view.active = False


if __name__ == "__main__":
    main()
