"""The trainer config's schema: how a training stage runs (strategy, devices, steps,
checkpoints), independent of what it trains. conf/trainer/*.yaml target `TrainerSpec`, so
a typo in a trainer YAML fails when the config is checked, not inside a worker process."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from framework.errors import ConfigError

Strategy = Literal["single", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]
Accelerator = Literal["cpu", "gpu", "auto"]
Launcher = Literal["auto", "inprocess", "torchrun", "srun"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"]

SHARDED = ("fsdp2", "deepspeed_zero2", "deepspeed_zero3")


@dataclass(frozen=True)
class TrainerSpec:
    """strategy: `single` (one process), `fsdp2` (torch fully_shard through Lightning's
    ModelParallelStrategy), `deepspeed_zero2` / `deepspeed_zero3` (Lightning's
    DeepSpeedStrategy on GPUs; on CPU, where Lightning refuses DeepSpeed, the same
    LightningModule is driven by a DeepSpeed engine with the CPU accelerator and gloo).

    devices: processes per node; num_nodes: nodes (srun inside a Slurm allocation).
    launcher: how the worker processes start. `auto`: in this process for `single`,
    torchrun on one node, srun across nodes (sharded strategies always use workers, even for
    one device). The run's pipeline itself stays in one
    process; only the training stage fans out.
    checkpoint_every_n_steps: save a resumable training checkpoint (weights, optimizer,
    step) every n optimizer steps (0: never); a restarted stage continues from the last one
    (Lightning strategies; the CPU DeepSpeed engine restarts the stage).
    max_steps: optimizer steps. batch_size: global batch (windows per step, split across
    data-parallel ranks, so one and two processes see the same batches).
    max_minutes: also stop once training has run this long (wall time of the fit loop, all
    ranks stopping at the same step; null: max_steps alone), for budgets such as "recover
    what you can in 10 minutes".
    """

    strategy: Strategy = "single"
    accelerator: Accelerator = "cpu"
    devices: int = 1
    num_nodes: int = 1
    launcher: Launcher = "auto"
    precision: Precision = "32-true"
    max_steps: int = 100
    max_minutes: float | None = None
    batch_size: int = 4
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 0
    offload_optimizer: bool = False
    offload_parameters: bool = False
    deterministic: bool = True
    timeout_s: int = 3600

    def __post_init__(self) -> None:
        for key in ("devices", "num_nodes", "max_steps", "batch_size", "accumulate_grad_batches"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_minutes is not None and not (
            isinstance(self.max_minutes, int | float)
            and not isinstance(self.max_minutes, bool)
            and self.max_minutes > 0
        ):
            raise ConfigError(
                "max_minutes", f"must be a number > 0 or null, got {self.max_minutes!r}"
            )
        if self.checkpoint_every_n_steps < 0:
            raise ConfigError("checkpoint_every_n_steps", "must be >= 0 (0: no checkpoints)")
        world = self.devices * self.num_nodes
        if self.strategy == "single" and world > 1:
            raise ConfigError(
                "strategy", f"'single' runs one process but devices x num_nodes = {world}"
            )
        if self.batch_size % world:
            raise ConfigError(
                "batch_size",
                f"{self.batch_size} does not split evenly over {world} data-parallel ranks",
            )
        if self.launcher == "inprocess" and (world > 1 or self.sharded):
            raise ConfigError(
                "launcher",
                f"'inprocess' trains one unsharded process; strategy {self.strategy!r} on "
                f"{world} process(es) needs torchrun or srun",
            )
        if (self.offload_optimizer or self.offload_parameters) and not self.strategy.startswith(
            "deepspeed"
        ):
            raise ConfigError("offload_optimizer", "CPU offload is a DeepSpeed option")

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def sharded(self) -> bool:
        return self.strategy in SHARDED

    def resolved_launcher(self) -> str:
        if self.launcher != "auto":
            return self.launcher
        if self.world_size == 1 and not self.sharded:
            return "inprocess"
        # FSDP2 and DeepSpeed shard the modules they are given in place (ZeRO-3 leaves
        # empty tensors behind, fully_shard DTensors), so they always train in worker
        # processes, which hand back a file, even for one rank; torchrun also gives DeepSpeed
        # on CPU the process group it needs.
        return "srun" if self.num_nodes > 1 else "torchrun"

    def resolved_accelerator(self) -> str:
        if self.accelerator != "auto":
            return self.accelerator
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
