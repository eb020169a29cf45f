"""LightningModules for training stages. One module serves every strategy: Lightning drives
it for `single`, `fsdp2` and DeepSpeed on GPUs, and framework.lightning.worker drives the
very same `forward`/`configure_optimizers` through a DeepSpeed engine on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from framework.eval.metrics import kl_per_token

Objective = Literal["distill", "causal_lm"]
Trainable = Literal["all", "norms"]


@dataclass(frozen=True)
class Objectives:
    """objective: `distill` = KL(teacher || student) on next-token distributions at
    `temperature` (scaled by T^2 so gradients keep their size), plus `hidden_weight` x MSE
    between final hidden states; `causal_lm` = plain next-token cross-entropy (fine-tuning).
    trainable: `all`, or `norms` (norm scales and biases only: what stays trainable
    without leaving a quantization grid). warmup_steps: the learning rate rises linearly
    from lr / warmup_steps to lr over the first optimizer steps (0: constant lr); Adam's
    first steps on a freshly compressed model otherwise overshoot."""

    objective: Objective = "distill"
    lr: float = 1e-4
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    trainable: Trainable = "all"
    warmup_steps: int = 0


def select_trainable(model: nn.Module, trainable: Trainable) -> int:
    """Set requires_grad per `trainable`; returns how many parameters will train."""
    count = 0
    for name, p in model.named_parameters():
        train = trainable == "all" or "norm" in name or name.endswith(".bias")
        p.requires_grad_(train)
        count += p.numel() if train else 0
    return count


def global_mean(value: torch.Tensor) -> float:
    """The mean of a per-rank scalar over all ranks (each rank holds an equal share of the
    global batch, so this is the global batch's mean)."""
    value = value.detach().float().reshape(1).clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return float(value.item())


def local_parameter_fraction(model: nn.Module) -> float:
    """The share of the model's parameters this rank holds: about 1/world under ZeRO-3 or
    FSDP2, 1.0 when parameters are replicated."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partitioned parameter
            total += int(p.ds_numel)
            local += int(p.ds_tensor.numel())
        elif hasattr(p, "to_local"):  # FSDP2 DTensor: numel() is the global size
            total += p.numel()
            local += p.to_local().numel()
        else:
            total += p.numel()
            local += p.numel()
    return local / max(total, 1)


class CausalLMModule(pl.LightningModule):
    """Trains `student` on token windows, towards `teacher`'s outputs (distill) or the
    next tokens (causal_lm). The teacher is kept out of the module's registered children:
    it is frozen, replicated on every rank, and never sharded or optimised."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        objectives: Objectives,
        block_path: str | None = None,
    ):
        super().__init__()
        if objectives.objective == "distill" and teacher is None:
            raise ValueError("distillation needs a teacher")
        self.student = student.train()  # HF loaders return eval mode
        self._teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else []
        self.objectives = objectives
        self.block_path = block_path  # e.g. "model.layers": the units FSDP2 shards
        self.losses: list[float] = []
        # Set by the worker: the batch of each micro-step (see training_step).
        self.step_batches: StepBatches | None = None
        self.accumulate = 1
        self._within = 0
        self.parameter_fraction: float | None = None
        self.trainable_parameters = select_trainable(student, objectives.trainable)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: shard each decoder block, then
        the rest (embeddings, final norm, head) at the root."""
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"]
        if self.block_path:
            for block in self.student.get_submodule(self.block_path):
                fully_shard(block, mesh=dp_mesh)
        fully_shard(self.student, mesh=dp_mesh)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The training loss of one (local) batch of windows."""
        want_hidden = self.objectives.objective == "distill" and self.objectives.hidden_weight > 0
        out = self.student(input_ids=tokens, output_hidden_states=want_hidden)
        logits = out.logits[:, :-1].float()
        if self.objectives.objective == "causal_lm":
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        teacher = self.teacher
        assert teacher is not None
        with torch.no_grad():
            ref = teacher(input_ids=tokens, output_hidden_states=want_hidden)
        t = self.objectives.temperature
        log_p = F.log_softmax(ref.logits[:, :-1].float() / t, dim=-1)
        log_q = F.log_softmax(logits / t, dim=-1)
        # Averaged over tokens, the quantity evaluation reports (at t = 1).
        kl = kl_per_token(log_p, log_q).mean() * t * t
        if want_hidden:
            student_h, teacher_h = out.hidden_states[-1], ref.hidden_states[-1]
            if student_h.shape != teacher_h.shape:
                raise ValueError(
                    f"hidden_weight needs equal hidden sizes; student {tuple(student_h.shape)} "
                    f"vs teacher {tuple(teacher_h.shape)}"
                )
            kl = kl + self.objectives.hidden_weight * F.mse_loss(student_h, teacher_h)
        return kl

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.parameter_fraction = local_parameter_fraction(self.student)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.step_batches is not None:
            # The data of a step follows from the step itself, not from where the loader
            # happens to be: after a resume Lightning restarts a map-style loader's epoch,
            # but global_step is restored exactly.
            micro = self.global_step * self.accumulate + self._within
            self._within = (self._within + 1) % self.accumulate
            batch = self.step_batches[micro].to(self.device)
        loss = self(batch)
        self.losses.append(global_mean(loss))
        self.log("train/loss", loss.detach(), prog_bar=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The loss curve so far, so a resumed stage reports the whole run's curve.
        checkpoint["sculpt_losses"] = list(self.losses)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.losses = [float(v) for v in checkpoint.get("sculpt_losses", [])]

    def configure_optimizers(self) -> Any:
        params = [p for p in self.student.parameters() if p.requires_grad]
        # foreach=False: the fused multi-tensor path is no faster on CPU and does not accept
        # DeepSpeed's flattened partitions.
        optimizer = torch.optim.AdamW(
            params, lr=self.objectives.lr, weight_decay=self.objectives.weight_decay, foreach=False
        )
        warmup = self.objectives.warmup_steps
        if warmup <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class StepBatches(torch.utils.data.Dataset):
    """Batch i is the i-th global batch of windows in a seeded order, and this rank's share
    of it (rank r takes every world-th window). One process and N processes therefore
    train on identical global batches, which is what makes their losses comparable."""

    def __init__(
        self, windows: torch.Tensor, steps: int, batch_size: int, seed: int, rank: int, world: int
    ):
        self.windows, self.steps, self.batch_size = windows, steps, batch_size
        self.rank, self.world = rank, world
        generator = torch.Generator().manual_seed(seed)
        needed = steps * batch_size
        rounds = -(-needed // len(windows))
        self.order = torch.cat(
            [torch.randperm(len(windows), generator=generator) for _ in range(rounds)]
        )

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> torch.Tensor:
        idx = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        return self.windows[idx[self.rank :: self.world]]
