"""Screen distillation settings on a saved compressed model, quickly and side by side.

A full `sculpt experiment=slice_distill` run costs a slicing stage, ten minutes of training
and a 40-window evaluation; this script starts from a model folder a run already saved
(e.g. a sliced SmolLM2's model/), takes a fixed number of AdamW steps of KL(teacher ||
student) on the protocol's calibration windows in the runner's seeded order
(framework.lightning.modules.StepBatches, seed 0), and scores the student on the first
`--eval-windows` KJV evaluation windows. Every setting sees the same batches, so the
perplexities compare directly; `--steps 0` scores the starting point. The optimiser steps
as the distill editor's (AdamW, linear warm-up, gradient norm clipped at `--clip`, as
trainer.gradient_clip_val; 0: no clipping), plus one knob the editor does not have: a
separate learning rate for the embedding and LM head (`--edge-lr`, 0 freezes them), and
`--optimizer muon`: the blocks' weight matrices step with torch.optim.Muon (Jordan et al.,
2024; its update scaled to AdamW's RMS as in Liu et al., 2025, "Muon is scalable for LLM
training", at `--muon-lr`), everything else with AdamW as before.

    .venv/bin/python experiments/distill_screen.py STUDENT_DIR --steps 12 --lr 5e-5
    (appends one JSON line per run to --out, default outputs/distill_screen.jsonl)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("student", help="a saved model folder (from_pretrained)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--edge-lr", type=float, default=None, help="embedding and head (0: frozen)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm (0: off)")
    parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    parser.add_argument("--muon-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default="outputs/distill_screen.jsonl")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from framework.data import WindowSpec, build_windows
    from framework.data.sources import kjv, shakespeare
    from framework.eval import evaluate_causal_lm
    from framework.lightning.modules import CausalLMModule, Objectives, StepBatches
    from framework.models import load_packaged  # also registers the sliced Llama class

    loaded = load_packaged("smollm2-135m-instruct")
    teacher = loaded.model.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    calibration = build_windows(
        loaded.tokenizer, WindowSpec(shakespeare, 128, 512, "random", 0), "calibration", None
    )
    evaluation = build_windows(
        loaded.tokenizer, WindowSpec(kjv, args.eval_windows, 512), "evaluation", None
    )

    # The distill editor's own loss (KL(teacher || student) at the temperature, x T^2). Built
    # first: it marks every parameter trainable, and --edge-lr 0 freezes some below.
    module = CausalLMModule(student, teacher, Objectives(temperature=args.temperature))
    edge_lr = args.lr if args.edge_lr is None else args.edge_lr
    edge = [p for n, p in student.named_parameters() if "embed" in n or "lm_head" in n]
    edge_ids = {id(p) for p in edge}
    body = [p for p in student.parameters() if id(p) not in edge_ids]
    groups = [{"params": body, "lr": args.lr}]
    if edge_lr > 0:
        groups.append({"params": edge, "lr": edge_lr})
    else:
        for p in edge:
            p.requires_grad_(False)
    optimizers: list[torch.optim.Optimizer] = []
    if args.optimizer == "muon":
        matrices = [p for p in body if p.ndim == 2]
        matrix_ids = {id(p) for p in matrices}
        groups[0]["params"] = [p for p in body if id(p) not in matrix_ids]
        muon_lr = args.lr if args.muon_lr is None else args.muon_lr
        muon = torch.optim.Muon(
            matrices, lr=muon_lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"
        )
        optimizers.append(muon)
    optimizers.append(torch.optim.AdamW(groups, weight_decay=0.0, foreach=False))
    warmup = max(args.warmup, 1)
    schedules = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / warmup))
        for o in optimizers
    ]
    batches = StepBatches(calibration, max(args.steps, 1), args.batch_size, 0, 0, 1)

    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        loss = module(batches[step])
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip)
        for optimizer, schedule in zip(optimizers, schedules, strict=True):
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(loss), 4))
        print(
            f"step {step + 1}: loss {losses[-1]} ({time.perf_counter() - start:.0f} s)", flush=True
        )
    seconds = time.perf_counter() - start
    result = {
        "name": args.name,
        "student": args.student,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "edge_lr": edge_lr,
        "warmup": args.warmup,
        "temperature": args.temperature,
        "clip": args.clip,
        "optimizer": args.optimizer,
        "muon_lr": args.muon_lr,
        "train_seconds": round(seconds, 1),
        "eval_windows": args.eval_windows,
        **{
            k: v
            for k, v in evaluate_causal_lm(student, evaluation, reference=teacher).items()
            if k in ("perplexity", "kl")
        },
        "losses": losses,
    }
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
