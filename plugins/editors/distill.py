"""Distillation: recover what compression lost by training the student (the model as the
previous stages left it) towards the teacher (the reference model kept before the first
stage). It trains on the run's training windows: data.training's text when the run names
one (`data/training=kjv_heldout`: KJV windows past the evaluated span, a train/test split
of one text), the calibration windows otherwise. Also plain fine-tuning
(objective=causal_lm).

How it runs (one process, FSDP2, DeepSpeed ZeRO-2/3, CPU or GPU) is the trainer config's
business, not this plugin's: `sculpt editor=distill trainer=deepspeed_zero3`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from annotated_types import Ge, Gt
from torch import nn

from framework.errors import ConfigError
from framework.plugins import Context, Editor, StageResult

log = logging.getLogger("sculpt")


class Distill(Editor):
    """objective: `distill` (KL to the teacher's next-token distribution, optionally plus
    `hidden_weight` x MSE of final hidden states) or `causal_lm` (next-token cross-entropy).
    trainable: `auto` trains norm scales and biases only when a previous stage left the
    weights on a quantization grid (so the container stays valid), everything otherwise
    (a sliced or pruned model); `all` / `norms` force either.
    windows: training windows to train on (null: all of them).
    warmup_steps: linear learning-rate warm-up over the first optimizer steps (0: none).
    seq_len: cut every training window into pieces of this many tokens (null: whole
    windows): under a time budget, shorter sequences give more optimizer steps for the same
    tokens."""

    # ctx.training: data.training's windows, or the calibration ones when there are none;
    # so the calibration text is only tokenized when it is what the student learns from.
    needs_training_windows = True
    needs_reference = True
    needs_gradients = True

    def __init__(
        self,
        objective: Literal["distill", "causal_lm"] = "distill",
        lr: Annotated[float, Gt(0)] = 1e-4,
        weight_decay: float = 0.0,
        temperature: Annotated[float, Gt(0)] = 1.0,
        hidden_weight: Annotated[float, Ge(0)] = 0.0,
        trainable: Literal["auto", "all", "norms"] = "auto",
        windows: Annotated[int, Ge(1)] | None = None,
        warmup_steps: Annotated[int, Ge(0)] = 0,
        seq_len: Annotated[int, Ge(2)] | None = None,
    ):
        self.objective, self.lr, self.weight_decay = objective, lr, weight_decay
        self.temperature, self.hidden_weight = temperature, hidden_weight
        self.trainable, self.windows = trainable, windows
        self.warmup_steps = warmup_steps
        self.seq_len = seq_len

    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        from framework.lightning.launch import fit
        from framework.lightning.modules import Objectives
        from framework.lightning.worker import TrainJob
        from framework.plots import line_plot

        trainable = self.trainable
        if trainable == "auto":
            trainable = "norms" if ctx.weights_on_grid else "all"
        elif trainable == "all" and ctx.weights_on_grid:
            log.warning(
                "editor.trainable=all on quantized weights: the trained weights leave the "
                "grid, so the saved container no longer matches model/"
            )
        teacher = ctx.reference if self.objective == "distill" else None
        if self.objective == "distill" and teacher is None:
            raise ConfigError("objective", "distill needs the reference model (none was kept)")
        job = TrainJob(
            spec=ctx.trainer,
            objectives=Objectives(
                objective=self.objective,
                lr=self.lr,
                weight_decay=self.weight_decay,
                temperature=self.temperature,
                hidden_weight=self.hidden_weight,
                trainable=trainable,
                warmup_steps=self.warmup_steps,
            ),
            seed=ctx.seed,
            block_path=ctx.arch.blocks,
            # trainer.checkpoint_every_n_steps > 0: a killed stage continues from here
            checkpoint_dir=str(ctx.resume_dir) if ctx.resume_dir else None,
        )
        windows = ctx.training(self.windows)
        if self.seq_len is not None:
            if self.seq_len > windows.shape[1]:
                raise ConfigError(
                    "seq_len", f"{self.seq_len} is longer than the windows ({windows.shape[1]})"
                )
            pieces = windows.shape[1] // self.seq_len
            windows = windows[:, : pieces * self.seq_len].reshape(-1, self.seq_len)
        out_dir = ctx.stage_dir(ctx.stage_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        outcome = fit(model, teacher, windows, job, out_dir)
        losses = outcome["losses"]
        plot = line_plot(
            out_dir / "loss.png",
            {"training loss": (list(range(1, len(losses) + 1)), losses)},
            title=f"{self.objective} ({job.spec.strategy}, {outcome['world_size']} process(es))",
            xlabel="micro-step",
            ylabel="loss",
        )
        fractions = outcome["parameter_fractions"]
        return StageResult(
            metrics={
                "loss_first": losses[0],
                "loss_last": losses[-1],
                # Optimizer steps actually taken: fewer than max_steps when
                # trainer.max_minutes ended the training first.
                "steps": float(len(losses) // job.spec.accumulate_grad_batches),
                "max_steps": float(job.spec.max_steps),
                "train_seconds": outcome["seconds"],
                "training_windows": float(windows.shape[0]),
                "training_seq_len": float(windows.shape[1]),
                "world_size": float(outcome["world_size"]),
                "trainable_parameters": float(outcome["trainable_parameters"]),
                "rank_parameter_share_max": max(fractions),
            },
            tables={"loss": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]},
            plots={"loss": plot},
        )
