"""Training in one or several processes.

`train()` runs in whatever process group it finds (none, torchrun's or srun's) and returns
the trained student's full state dict on rank 0. `python -m framework.lightning.worker DIR`
is what the launcher starts on each rank: it reads the job that framework.lightning.launch
wrote to DIR (HF folders for student and teacher, the windows as safetensors, job.json;
nothing pickled), trains, and rank 0 writes DIR/out/ atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.lightning.modules import (
    CausalLMModule,
    Objectives,
    StepBatches,
    global_mean,
    local_parameter_fraction,
)
from framework.lightning.spec import TrainerSpec


@dataclass
class TrainJob:
    spec: TrainerSpec
    objectives: Objectives
    seed: int = 0
    block_path: str | None = None
    # Where resumable checkpoints go (spec.checkpoint_every_n_steps); it must outlive the
    # worker processes, so it is the stage's folder, not the job's scratch folder.
    checkpoint_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "objectives": asdict(self.objectives),
            "seed": self.seed,
            "block_path": self.block_path,
            "checkpoint_dir": self.checkpoint_dir,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainJob:
        return cls(
            spec=TrainerSpec(**data["spec"]),
            objectives=Objectives(**data["objectives"]),
            seed=int(data["seed"]),
            block_path=data.get("block_path"),
            checkpoint_dir=data.get("checkpoint_dir"),
        )


@dataclass
class TrainOutcome:
    state_dict: dict[str, torch.Tensor] | None  # full weights on rank 0, None elsewhere
    losses: list[float]  # global-batch mean loss per micro-step
    world_size: int
    parameter_fractions: list[float]  # share of the parameters held by each rank
    trainable_parameters: int
    seconds: float
    strategy: str
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("state_dict")
        return data


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _gather_fractions(fraction: float) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [fraction]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, fraction)
    return [float(v) for v in values]  # type: ignore[arg-type]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every rank calls this; rank 0 gets the full, unsharded weights on CPU (ZeRO-3:
    GatheredParameters; FSDP2: a full state dict), the others None."""
    from framework.lightning.sharding import sharding_kind

    rank, _ = _rank_world()
    kind = sharding_kind(model)
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return state if rank == 0 else None
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {k: v.clone() for k, v in state.items()} if rank == 0 else None
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train(
    student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, job: TrainJob
) -> TrainOutcome:
    spec = job.spec
    rank, world = _rank_world()
    if world != spec.world_size:
        raise RuntimeError(
            f"trainer expects {spec.world_size} processes (devices x num_nodes) but found {world}"
        )
    torch.manual_seed(job.seed)
    module = CausalLMModule(student, teacher, job.objectives, block_path=job.block_path)
    micro_steps = spec.max_steps * spec.accumulate_grad_batches
    batches = StepBatches(windows, micro_steps, spec.batch_size, job.seed, rank, world)
    start = time.perf_counter()
    if spec.strategy.startswith("deepspeed") and spec.resolved_accelerator() == "cpu":
        state, fraction = _deepspeed_cpu(module, batches, spec)
    else:
        state, fraction = _lightning(module, batches, spec, job.checkpoint_dir)
    return TrainOutcome(
        state_dict=state,
        losses=module.losses,
        world_size=world,
        parameter_fractions=_gather_fractions(fraction),
        trainable_parameters=module.trainable_parameters,
        seconds=time.perf_counter() - start,
        strategy=spec.strategy,
    )


def _resume_point(checkpoint_dir: str | None) -> tuple[Path | None, int]:
    """The last checkpoint and its optimizer step (0 when there is none). Lightning writes
    a file for one process and a folder (torch distributed checkpoint, its loop state in
    meta.pt) under FSDP2; both are read with weights_only=True."""
    if not checkpoint_dir:
        return None, 0
    last = Path(checkpoint_dir) / "last.ckpt"
    meta = last / "meta.pt" if last.is_dir() else last
    if not meta.is_file():
        return None, 0
    try:
        state = torch.load(meta, map_location="cpu", weights_only=True)
        step = int(state["global_step"])
    except Exception as exc:  # a kill while Lightning was writing it: start the stage over
        logging.getLogger("sculpt").warning("ignoring unreadable %s (%s)", last, exc)
        return None, 0
    logging.getLogger("sculpt").info("resuming training at step %d from %s", step, last)
    return last, step


def _lightning(
    module: CausalLMModule,
    batches: StepBatches,
    spec: TrainerSpec,
    checkpoint_dir: str | None = None,
) -> tuple[dict[str, torch.Tensor] | None, float]:
    import lightning.pytorch as pl

    # Lightning's banner lines (GPU available, fit stopped, ...) would double the run log.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    strategy: Any = "auto"
    if spec.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=spec.world_size, tensor_parallel_size=1)
    elif spec.strategy.startswith("deepspeed"):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = DeepSpeedStrategy(
            stage=3 if spec.strategy.endswith("3") else 2,
            offload_optimizer=spec.offload_optimizer,
            offload_parameters=spec.offload_parameters,
            # Lightning would read this off the loader's batch sampler, which ours lacks
            # (each step's batch comes from StepBatches by index).
            logging_batch_size_per_gpu=spec.batch_size // spec.world_size,
        )
    elif spec.world_size > 1:
        strategy = "ddp"
    # FSDP2 shards gradients as DTensors, which Lightning's norm clipping does not handle.
    clip = None if spec.strategy == "fsdp2" else spec.gradient_clip_val
    trainer = pl.Trainer(
        accelerator=spec.resolved_accelerator(),
        devices=spec.devices,
        num_nodes=spec.num_nodes,
        strategy=strategy,
        precision=spec.precision,
        max_steps=spec.max_steps,
        max_time=timedelta(minutes=spec.max_minutes) if spec.max_minutes else None,
        max_epochs=-1,
        accumulate_grad_batches=spec.accumulate_grad_batches,
        gradient_clip_val=clip,
        log_every_n_steps=spec.log_every_n_steps,
        deterministic=spec.deterministic,
        logger=False,
        enable_checkpointing=bool(spec.checkpoint_every_n_steps and checkpoint_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # StepBatches already gives each rank its share
        callbacks=_checkpointing(spec, checkpoint_dir),
    )
    resume_from, _ = _resume_point(checkpoint_dir)
    module.step_batches, module.accumulate = batches, spec.accumulate_grad_batches
    # The loader only paces the loop; training_step takes each step's batch by its index.
    loader = torch.utils.data.DataLoader(range(len(batches)), batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume_from, weights_only=True)
    fraction = module.parameter_fraction if module.parameter_fraction is not None else 1.0
    return full_state_dict(module.student), fraction


def _checkpointing(spec: TrainerSpec, checkpoint_dir: str | None) -> list[Any]:
    if not (spec.checkpoint_every_n_steps and checkpoint_dir):
        return []
    import lightning.pytorch as pl

    every = pl.callbacks.ModelCheckpoint(
        dirpath=checkpoint_dir,
        every_n_train_steps=spec.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=0,
    )
    return [every]


def _deepspeed_cpu(
    module: CausalLMModule, batches: StepBatches, spec: TrainerSpec
) -> tuple[dict[str, torch.Tensor] | None, float]:
    """Lightning refuses DeepSpeed without CUDA, so on CPU the same module runs under a
    DeepSpeed engine with the CPU accelerator and gloo: ZeRO partitioning, the engine's
    backward/step and gradient clipping are DeepSpeed's own, exactly as on GPUs."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    stage = 3 if spec.strategy.endswith("3") else 2
    zero: dict[str, Any] = {"stage": stage}
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if spec.offload_parameters and stage == 3:
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": spec.batch_size // spec.world_size,
        "gradient_accumulation_steps": spec.accumulate_grad_batches,
        "gradient_clipping": spec.gradient_clip_val or 0.0,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.precision.startswith("bf16"):
        config["bf16"] = {"enabled": True}
    optimizer, scheduler = module.configure_optimizers(), None
    if isinstance(optimizer, dict):  # warm-up: the engine steps the schedule with the optimizer
        optimizer, scheduler = optimizer["optimizer"], optimizer["lr_scheduler"]["scheduler"]
    engine, *_ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    fraction = local_parameter_fraction(module.student)
    engine.train()
    start = time.perf_counter()
    for i in range(len(batches)):
        if spec.max_minutes and i % spec.accumulate_grad_batches == 0:
            # Every rank must stop at the same step: rank 0's clock decides.
            over = torch.tensor(float(time.perf_counter() - start > 60.0 * spec.max_minutes))
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(over, src=0)
            if over.item():
                break
        loss = engine(batches[i])
        module.losses.append(global_mean(loss))
        engine.backward(loss)
        engine.step()
    state = full_state_dict(module.student)
    return state, fraction


def _load_hf(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    import framework.models  # noqa: F401  (registers sculpt's own model classes, e.g. sliced)

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def main(job_dir: str) -> int:
    from safetensors.torch import load_file, save_file

    from framework.io import atomic_dir

    root = Path(job_dir)
    _env_from_slurm()
    job = TrainJob.from_json(json.loads((root / "job.json").read_text()))
    student = _load_hf(root / "student")
    teacher = _load_hf(root / "teacher") if (root / "teacher").is_dir() else None
    windows = load_file(root / "windows.safetensors")["windows"]
    outcome = train(student, teacher, windows, job)
    rank, _ = _rank_world()
    if rank == 0 and outcome.state_dict is not None:
        with atomic_dir(root / "out") as staging:
            save_file(
                {k: v.contiguous() for k, v in outcome.state_dict.items()},
                staging / "student.safetensors",
            )
            (staging / "log.json").write_text(json.dumps(outcome.log(), indent=1))
    if torch.distributed.is_initialized():
        # ZeRO-3 aborts at interpreter exit unless the group is torn down explicitly.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _env_from_slurm() -> None:
    """Under `srun`, one task per rank: translate Slurm's variables into torch's."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def _exit_without_finalizing(code: int) -> None:
    """End a worker that has finished cleanly without running interpreter finalization.

    The 2-rank FSDP2 run aborted now and then after training ("terminate called without
    an active exception", SIGABRT; 2 of about 20 runs on a loaded 2-core machine). The
    likely cause: the process group outlives destroy_process_group (the parameters'
    DTensors hold the device mesh, which holds the group), so gloo's C++ threads are torn
    down during interpreter finalization, a known way for gloo to abort. Everything a
    worker leaves behind is already on disk, written atomically, so nothing is lost by
    skipping finalization; only the streams need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_finalizing(main(sys.argv[1]))
