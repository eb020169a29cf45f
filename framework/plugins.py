"""The three plugin contracts (Compressor, Analyzer, Editor), the Context they share and the
StageResult they return.

A plugin is a class whose constructor's typed keyword arguments are its config schema: the
YAML node is ``_target_: plugins.compressors.rtn.RTN`` plus those arguments, and Hydra's
``instantiate`` is the registry. Plugins never import Lightning or W&B.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from framework.schema import checked

if TYPE_CHECKING:
    from framework.models.arch import ArchMap


@dataclass
class StageResult:
    """What a stage hands back to the runner.

    metrics: flat name -> number; the runner namespaces them by stage.
    artifacts: name -> path written by the stage (e.g. ``compressed`` -> the container).
    tables: name -> rows (list of flat dicts), rendered into report.md and W&B tables.
    plots: name -> PNG path.
    model: the model to hand to the next stage (None: unchanged object).
    """

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    model: nn.Module | None = None


@dataclass
class Context:
    """What stages share. One per run; there is no global session."""

    tokenizer: Any
    arch: ArchMap
    output_dir: Path
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Token windows [n, seq_len]; calibration is produced lazily (it may be large).
    calibration_loader: Callable[[], torch.Tensor] | None = None
    # Windows for training stages (data.training); None: they train on the calibration ones.
    training_loader: Callable[[], torch.Tensor] | None = None
    evaluation_windows: torch.Tensor | None = None
    # The reference (uncompressed) model, frozen: a copy the runner keeps before the first
    # stage whose needs_reference flag is set (a distillation teacher, say).
    reference: nn.Module | None = None
    # The reference's cached outputs (framework.eval.metrics.ReferenceCache), filled by the
    # reference evaluation; later evaluations compare against it without a full forward.
    reference_outputs: Any = None
    progress: Callable[..., Any] | None = None
    stage_name: str = ""
    # How training stages run (framework.lightning.TrainerSpec), built from the trainer
    # config when some stage has needs_gradients.
    trainer: Any = None
    # Set once a stage has written a quantized container: the weights lie on a grid that
    # training them freely would leave.
    weights_on_grid: bool = False
    # A folder for the running stage's resumable state (e.g. training checkpoints) that
    # survives a kill and is removed when the run completes; None when checkpointing is off.
    resume_dir: Path | None = None
    _calibration: torch.Tensor | None = None
    _training: torch.Tensor | None = None

    def calibration(self, max_windows: int | None = None) -> torch.Tensor:
        """Calibration windows, built once and cached for every later stage."""
        if self._calibration is None:
            if self.calibration_loader is None:
                raise RuntimeError("this run has no calibration data (data.calibration)")
            self._calibration = self.calibration_loader()
        windows = self._calibration
        return windows if max_windows is None else windows[:max_windows]

    def training(self, max_windows: int | None = None) -> torch.Tensor:
        """Windows a training stage (distillation) learns from: data.training's when the
        run names such a text, the calibration windows otherwise. Built once, cached."""
        if self.training_loader is None:
            return self.calibration(max_windows)
        if self._training is None:
            self._training = self.training_loader()
        windows = self._training
        return windows if max_windows is None else windows[:max_windows]

    def generator(self) -> torch.Generator:
        """A fresh generator seeded from the run seed and the stage name (order-independent)."""
        offset = sum(self.stage_name.encode()) if self.stage_name else 0
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)

    def stage_dir(self, name: str) -> Path:
        """Folder for a stage's artifacts under the run's output folder."""
        return self.output_dir / name

    def track(self, iterable: Any, description: str, total: int | None = None) -> Any:
        """Progress over a loop: a rich bar on a terminal, plain lines otherwise."""
        if self.progress is None:
            return iterable
        return self.progress(iterable, description=description, total=total)


class Stage(ABC):
    """Common base of the three contracts: capability flags and no-op lifecycle hooks."""

    kind: ClassVar[str] = "stage"
    #: The runner collects calibration windows once and makes them available via ctx.
    needs_calibration: ClassVar[bool] = False
    #: Likewise the training windows (ctx.training: data.training's, else calibration's).
    needs_training_windows: ClassVar[bool] = False
    #: The stage writes weights; the runner keeps a frozen reference before it runs and
    #: evaluates after it. A stage that does not set this must leave weights bit-identical.
    changes_weights: ClassVar[bool] = False
    #: The stage reads ctx.reference, the untouched model (costs one model copy).
    needs_reference: ClassVar[bool] = False
    #: The stage trains (runs backward); the runner enables grad for it.
    needs_gradients: ClassVar[bool] = False
    #: The stage can run on sharded (ZeRO-3 / FSDP) parameters without a full gather.
    sharding_safe: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # a constructor's annotated bounds and choices are checked on every call, so a
        # plugin built from Python is held to the same schema as one built from YAML
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def setup(self, model: nn.Module, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called before the stage's main method."""

    def teardown(self, model: nn.Module, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called after the stage's main method, also when it failed."""

    @abstractmethod
    def apply(self, model: nn.Module, ctx: Context) -> StageResult:
        """The stage's main method under a kind-neutral name (used by the runner)."""


class Compressor(Stage):
    kind = "compressor"
    changes_weights = True

    @abstractmethod
    def compress(self, model: nn.Module, ctx: Context) -> StageResult: ...

    def apply(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.compress(model, ctx)


class Analyzer(Stage):
    kind = "analyzer"

    @abstractmethod
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult: ...

    def apply(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.analyze(model, ctx)


class Editor(Stage):
    kind = "editor"
    changes_weights = True

    @abstractmethod
    def edit(self, model: nn.Module, ctx: Context) -> StageResult: ...

    def apply(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.edit(model, ctx)


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep numeric entries only, as plain floats (W&B and JSON friendly)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float):  # bool is an int
            out[key] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.item())
    return out
