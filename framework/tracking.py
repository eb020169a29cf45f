"""Experiment tracking. The runner talks to a RunLogger; W&B is one implementation (offline
by default), NullLogger another (`logger=none`). Plugins never see either."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from framework.io import atomic_write_text


class RunLogger:
    """No-op base: the `logger=none` choice, and the interface the runner uses."""

    run_dir: Path | None = None

    def start(
        self,
        config: dict[str, Any],
        output_dir: Path,
        name: str,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
    ) -> None: ...
    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_image(self, key: str, path: Path) -> None: ...
    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None: ...
    def summary(self, metrics: dict[str, float]) -> None: ...
    def finish(self, failed: bool = False) -> None: ...

    def describe(self) -> str:
        return "off (logger=none)"


NullLogger = RunLogger


class WandbLogger(RunLogger):
    """Weights & Biases through its real client. mode=offline writes
    <output_dir>/wandb/offline-run-*; sync later with `wandb sync <that folder>`."""

    def __init__(
        self,
        project: str = "sculpt",
        mode: str = "offline",
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        notes: str | None = None,
        system_stats: bool = False,
    ):
        if mode not in ("offline", "online", "disabled"):
            from framework.errors import ConfigError

            raise ConfigError("mode", f"'{mode}' is not one of offline, online, disabled")
        self.project, self.mode, self.entity = project, mode, entity
        self.group, self.job_type, self.tags, self.name, self.notes = (
            group,
            job_type,
            list(tags or []),
            name,
            notes,
        )
        self.system_stats = system_stats
        self._run: Any = None

    def start(
        self,
        config: dict[str, Any],
        output_dir: Path,
        name: str,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # One W&B run per run folder: a resumed or requeued job continues the same run.
        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id + "\n")
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            id=run_id,
            resume="allow",
            group=self.group or group,
            job_type=self.job_type or job_type,
            tags=sorted({*self.tags, *(tags or [])}),
            name=self.name or name,
            notes=self.notes,
            mode=self.mode,
            dir=str(output_dir),
            config=config,
            reinit="finish_previous",  # a multirun's jobs never merge into one run
            # The system monitor samples CPU/GPU every few seconds in its own process; off by
            # default so it does not compete with a 2-core run (turn on for GPU jobs).
            settings=wandb.Settings(x_disable_stats=not self.system_stats),
        )
        self.run_dir = Path(self._run.dir).parent if self._run and self._run.dir else None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log(dict(metrics))

    def log_image(self, key: str, path: Path) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self._run is not None and rows:
            import wandb

            columns = list(rows[0])
            self._run.log(
                {
                    key: wandb.Table(
                        columns=columns, data=[[r.get(c) for c in columns] for r in rows]
                    )
                }
            )

    def summary(self, metrics: dict[str, float]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(metrics))

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None

    def describe(self) -> str:
        where = str(self.run_dir) if self.run_dir else "?"
        if self.mode == "offline":
            return f"W&B offline run {where} (upload: wandb sync {where})"
        return f"W&B {self.mode} run in project '{self.project}' ({where})"
