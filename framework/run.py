"""run(cfg) -> RunResult: load, evaluate the reference, run the stages in order (evaluating
after each one that changes weights), log, save. No global state: everything a stage needs
travels in the Context."""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from framework.checkpoints import ResumeState, StageCheckpoints
from framework.codecs import container_size
from framework.config import CONF_DIR, build, check_config
from framework.data import WindowSpec, build_windows
from framework.errors import ConfigError, SculptError
from framework.eval import evaluate_causal_lm, evaluate_encoder, measure
from framework.eval.metrics import ReferenceCache
from framework.eval.reference_cache import load_reference, reference_key, save_reference
from framework.eval.topology import TopologyEvaluator, TopologySpec
from framework.eval.validators import check_limits_config, check_stage, edit_metrics
from framework.export import check_export_config, export_compressed_tensors
from framework.io import atomic_dir, atomic_write_json, atomic_write_text, folder_bytes
from framework.models import LoadedModel
from framework.models.loading import cache_root
from framework.plugins import Context, Stage, StageResult, flat_metrics
from framework.progress import make_tracker
from framework.report import render_report, summary_rows
from framework.tracking import RunLogger

log = logging.getLogger("sculpt")


@dataclass
class StageRecord:
    name: str
    kind: str
    target: str
    metrics: dict[str, float] = field(default_factory=dict)  # the stage's own + accounting
    eval: dict[str, float] = field(default_factory=dict)  # evaluation after the stage
    artifacts: dict[str, str] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)


@dataclass
class RunResult:
    output_dir: Path
    model_name: str
    stages: list[StageRecord]
    metrics: dict[str, float]  # flat, namespaced "stage/metric"
    model: nn.Module | None = None
    logger_description: str = ""


@dataclass
class StageSpec:
    name: str
    key: str
    node: DictConfig


def resolve_stages(cfg: DictConfig) -> list[StageSpec]:
    """`stages` lists dotted keys of plugin nodes ("analyzer", "compressor", ...) or inline
    plugin nodes. A key whose node is null (e.g. editor: null) is skipped."""
    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(cfg.get("stages") or []):
        if isinstance(entry, str):
            sentinel = object()
            node = OmegaConf.select(cfg, entry, default=sentinel)
            if node is sentinel and not (CONF_DIR / entry).is_dir():
                raise SculptError(f"stages[{i}]: '{entry}' names no config node")
            if node is None or node is sentinel:  # a stage group with nothing selected
                continue
            if not isinstance(node, DictConfig) or "_target_" not in node:
                raise SculptError(f"stages[{i}]: '{entry}' is not a plugin node (no _target_)")
            name, key = entry.split(".")[-1], entry
        elif isinstance(entry, DictConfig) and "_target_" in entry:
            node, key = entry, f"stages[{i}]"
            name = str(entry._target_).rsplit(".", 1)[-1].lower()
        else:
            raise SculptError(f"stages[{i}]: expected a config key or a node with _target_")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}{seen[name]}"
        specs.append(StageSpec(name=name, key=key, node=node))
    return specs


def build_stage(spec: StageSpec) -> Stage:
    plugin = build(spec.node, spec.key)
    if not isinstance(plugin, Stage):
        raise SculptError(
            f"{spec.key}._target_: {spec.node._target_} is not a Compressor, Analyzer or Editor"
        )
    return plugin


def validate(cfg: DictConfig, skip_unused: bool = False) -> list[Stage]:
    """Everything checkable without loading a model: signatures, types, ranges.

    skip_unused: leave out the trainer node when no stage trains. Binding it imports
    Lightning (seconds per process), which a sweep of quick jobs pays once per job."""
    specs = resolve_stages(cfg)
    stages = [build_stage(s) for s in specs]
    check_limits_config(cfg.get("eval"), ["reference", *(s.name for s in specs)])
    TopologySpec.from_config(cfg.eval.get("topology") if cfg.get("eval") else None)
    trains = any(stage.needs_gradients for stage in stages)
    check_config(cfg, skip=("trainer",) if skip_unused and not trains else ())
    check_export_config(cfg.get("export"))
    return stages


def _windows(cfg: DictConfig, key: str, tokenizer: Any, max_positions: int | None) -> torch.Tensor:
    node = OmegaConf.select(cfg, key)
    source = build(node.source, f"{key}.source", _partial_=True)
    spec = WindowSpec(
        source=source,
        windows=int(node.windows),
        seq_len=int(node.seq_len),
        sampling=str(node.sampling),
        seed=int(node.get("seed", 0)),
        skip_tokens=int(node.get("skip_tokens", 0)),
    )
    try:
        return build_windows(tokenizer, spec, key, max_positions)
    except SculptError as exc:
        # Sources name themselves "data.source"; say which side's source it was.
        message = str(exc)
        if message.startswith("data.source"):
            raise SculptError(f"{key}.source{message[len('data.source') :]}") from exc
        raise


def _evaluate(
    model: nn.Module,
    ctx: Context,
    eval_cfg: DictConfig,
    label: str,
    previous: ReferenceCache | None = None,
    keep: bool = False,
) -> tuple[dict[str, float], ReferenceCache | None]:
    """Evaluate against the cached reference outputs; the first call (the reference itself)
    fills that cache. ``previous``: also compare with an earlier model's cached outputs;
    ``keep``: return this model's own cache (for a later edit's before/after)."""
    assert ctx.evaluation_windows is not None
    first = ctx.reference_outputs is None
    kwargs: dict[str, Any] = dict(
        reference=ctx.reference_outputs,
        batch_size=int(eval_cfg.batch_size),
        track=ctx.track,
        description=f"eval {label}",
    )
    stored = _reference_store(eval_cfg) if first else None
    key = hit = None
    with measure() as m:
        if stored is not None:
            head = ctx.arch.head if ctx.arch.causal else None
            key = reference_key(model, ctx.evaluation_windows, int(eval_cfg.batch_size), head)
            hit = load_reference(stored, key, model, head)
        if hit is not None:
            metrics, cache = hit
            log.info("eval %s: taken from the reference cache (%s)", label, stored / key)
        elif ctx.arch.causal:
            cache_head = ctx.arch.head if first or keep else None
            got = evaluate_causal_lm(
                model, ctx.evaluation_windows, cache_head=cache_head, previous=previous, **kwargs
            )
            metrics, cache = got if cache_head else (got, None)
        else:
            got = evaluate_encoder(model, ctx.evaluation_windows, cache=first, **kwargs)
            metrics, cache = got if first else (got, None)
    if first:
        ctx.reference_outputs = cache
        if hit is None and key is not None and cache is not None:
            save_reference(stored, key, metrics, cache)
    metrics.update(m.as_metrics("eval_"))
    if hit is not None:
        metrics["reference_cached"] = 1.0
    return metrics, cache


def _reference_store(eval_cfg: DictConfig) -> Path | None:
    """eval.reference_cache: auto ($SCULPT_REFERENCE_CACHE, else $SCULPT_CACHE/reference),
    a folder, or null (off)."""
    where = eval_cfg.get("reference_cache")
    if where in (None, False, ""):
        return None
    if where == "auto":
        env = os.environ.get("SCULPT_REFERENCE_CACHE")
        return Path(env) if env else cache_root() / "reference"
    return Path(str(where)).expanduser()


def run(cfg: DictConfig) -> RunResult:
    """One composed config -> one run folder with metrics.json, report.md, plots, model/,
    compressed/. Raises SculptError on bad input (the CLI turns it into one line)."""
    stages = validate(cfg, skip_unused=True)
    specs = resolve_stages(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "FAILED").unlink(missing_ok=True)
    torch.manual_seed(int(cfg.seed))
    torch.autograd.set_detect_anomaly(bool(cfg.get("debug_anomaly", False)))
    track = make_tracker(cfg.get("interactive"))
    logger: RunLogger = build(cfg.logger, "logger") if cfg.get("logger") else RunLogger()
    failed = True
    try:
        name, group, tags = _run_identity(cfg)
        logger.start(
            OmegaConf.to_container(cfg, resolve=True),
            out,
            name=name,
            group=group,
            job_type="+".join(spec.name for spec in specs) or "evaluate",
            tags=tags,
        )
        result = _run(cfg, stages, specs, out, track, logger)
        failed = False
        return result
    except SculptError as exc:
        atomic_write_text(out / "FAILED", f"{exc}\n")
        raise
    except BaseException as exc:
        atomic_write_text(out / "FAILED", f"{type(exc).__name__}: {exc}\n")
        raise
    finally:
        logger.finish(failed=failed)


def _run(
    cfg: DictConfig,
    stages: list[Stage],
    specs: list[StageSpec],
    out: Path,
    track: Any,
    logger: RunLogger,
) -> RunResult:
    records: list[StageRecord] = []
    with measure() as m_load:
        loaded: LoadedModel = build(cfg.model, "model")
    model = loaded.model
    log.info(
        "model %s (%s, %.1fM parameters) loaded in %.1f s",
        loaded.name,
        loaded.arch.family,
        sum(p.numel() for p in model.parameters()) / 1e6,
        m_load.seconds,
    )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    ctx = Context(
        tokenizer=loaded.tokenizer,
        arch=loaded.arch,
        output_dir=out,
        seed=int(cfg.seed),
        progress=track,
    )
    ctx.evaluation_windows = _windows(cfg, "data.evaluation", loaded.tokenizer, max_pos)
    if cfg.data.get("calibration") is not None:
        ctx.calibration_loader = lambda: _windows(
            cfg, "data.calibration", loaded.tokenizer, max_pos
        )
    if cfg.data.get("training") is not None:
        ctx.training_loader = lambda: _windows(cfg, "data.training", loaded.tokenizer, max_pos)

    if any(plugin.needs_gradients for plugin in stages):
        ctx.trainer = build(cfg.trainer, "trainer")
    checkpoints = StageCheckpoints(out, cfg) if cfg.get("checkpoint_stages", True) else None
    resume = checkpoints.begin(bool(cfg.get("resume", True))) if checkpoints else None

    ref_metrics, _ = _evaluate(model, ctx, cfg.eval, "reference")
    n_weights = sum(w.numel() for w in _block_weights(model, loaded))
    ref_record = StageRecord(
        name="reference",
        kind="reference",
        target=loaded.name,
        metrics={
            "load_seconds": m_load.seconds,
            "load_peak_rss_mb": m_load.peak_rss_mb,
            "bits_per_weight": float(torch.finfo(_block_weights(model, loaded)[0].dtype).bits),
            "coded_weights": float(n_weights),
        },
        eval=ref_metrics,
    )
    records.append(ref_record)
    logger.log_metrics(
        {f"reference/{k}": v for k, v in {**ref_record.metrics, **ref_metrics}.items()}
    )
    _log_eval_line("reference", ref_metrics)
    last_eval = ref_metrics
    topology_spec = TopologySpec.from_config(cfg.eval.get("topology"))
    topology: TopologyEvaluator | None = None
    if topology_spec.enabled:
        with measure() as m_topo:
            topology = TopologyEvaluator.start(
                topology_spec, model, ctx.arch, ctx.evaluation_windows
            )
        ref_record.metrics["topo_reference_seconds"] = m_topo.seconds
        log.info(
            "topology of the reference: %d blocks in %.1f s", len(topology.names), m_topo.seconds
        )
    if any(plugin.needs_reference for plugin in stages):
        # The untouched model, whatever stage first asks for it (a distillation teacher
        # after a compressor must see the original, not the compressed weights).
        ctx.reference = copy.deepcopy(model).eval()

    state = resume or ResumeState(fingerprint="")
    first = 0
    # The outputs of the model as it stood after the last weight-changing stage, kept only
    # while an editor is still to come (None: the model still equals the reference).
    unedited_cache: ReferenceCache | None = None

    def edits_follow(index: int) -> bool:
        return ctx.arch.causal and any(p.kind == "editor" for p in stages[index:])

    if resume is not None and checkpoints is not None:
        first = len(resume.completed)
        records.extend(StageRecord(**r) for r in resume.completed)
        model = checkpoints.load_model_into(model, resume)
        last_eval = resume.last_eval or ref_metrics
        ctx.weights_on_grid = resume.weights_on_grid
        log.info(
            "resuming after %d completed stage(s) (%s) from %s",
            first,
            ", ".join(r["name"] for r in resume.completed) or "none",
            checkpoints.root,
        )
        if edits_follow(first) and any(r["eval"] for r in resume.completed):
            # The model before the next edit is not the reference: its outputs are needed
            # again for the edit's own KL (not kept in the checkpoint: ~160 MB).
            _, unedited_cache = _evaluate(model, ctx, cfg.eval, "resumed", keep=True)

    for index, (spec, plugin) in enumerate(zip(specs, stages, strict=True)):
        if index < first:
            continue
        ctx.stage_name = spec.name
        ctx.resume_dir = checkpoints.stage_dir(index) if checkpoints is not None else None
        log.info("stage %s: %s", spec.name, spec.node._target_)
        if plugin.needs_calibration:
            ctx.calibration()  # built once, outside the stage's own timing
        if plugin.needs_training_windows:
            ctx.training()  # likewise (the calibration windows when data.training is null)
        before = _fingerprint(model) if not plugin.changes_weights else None
        with measure() as m:
            plugin.setup(model, ctx)
            try:
                with torch.set_grad_enabled(plugin.needs_gradients):
                    result: StageResult = plugin.apply(model, ctx)
            except ConfigError as exc:
                raise SculptError(f"{spec.key}.{exc.argument}: {exc.detail}") from exc
            finally:
                plugin.teardown(model, ctx)
        if result.model is not None:
            model = result.model
        if before is not None and _fingerprint(model) != before:
            raise SculptError(
                f"{spec.key}: {spec.node._target_} changed weights but its changes_weights flag is False"
            )
        record = StageRecord(
            name=spec.name,
            kind=plugin.kind,
            target=str(spec.node._target_),
            metrics={**flat_metrics(result.metrics), **m.as_metrics()},
            artifacts={k: str(v) for k, v in result.artifacts.items()},
            tables=result.tables,
            plots={k: str(v) for k, v in result.plots.items()},
        )
        if "compressed" in result.artifacts:
            size = container_size(result.artifacts["compressed"])
            record.metrics.update(size)
            record.metrics["container_bytes"] = float(folder_bytes(result.artifacts["compressed"]))
        if plugin.changes_weights:
            record.eval, cache = _evaluate(
                model,
                ctx,
                cfg.eval,
                spec.name,
                previous=unedited_cache if plugin.kind == "editor" else None,
                keep=edits_follow(index + 1),
            )
            if plugin.kind == "editor":
                # unedited_cache None: nothing changed the weights before this edit
                record.eval = edit_metrics(record.eval, last_eval, unedited_cache is None)
            unedited_cache = cache
            if topology is not None:
                with measure() as m_topo:
                    topo_metrics, topo_rows = topology.compare(model)
                record.eval.update(topo_metrics, topo_seconds=m_topo.seconds)
                record.tables["topology_distance"] = topo_rows
            _log_eval_line(spec.name, record.eval)
            last_eval = record.eval
        if record.metrics.get("bits_per_weight", 32.0) < 16.0:
            # Quantized codes (not a full-precision container such as a sliced model's):
            # training the weights freely would leave their grid.
            ctx.weights_on_grid = True
        logger.log_metrics(
            {f"{spec.name}/{k}": v for k, v in {**record.metrics, **record.eval}.items()}
        )
        # tables/ and plots/ sub-namespaces: a table named like a metric (analyzer's
        # `layers` table vs its `layers` count) must not share one W&B key with it.
        for key, rows in record.tables.items():
            logger.log_table(f"{spec.name}/tables/{key}", rows)
        for key, path in record.plots.items():
            logger.log_image(f"{spec.name}/plots/{key}", Path(path))
        # After logging, so a stage that breaks a limit still leaves its numbers in the
        # tracker; before the checkpoint, so a rerun does not skip the check.
        check_stage(cfg.eval, spec.name, plugin.kind, ref_metrics, record.metrics, record.eval)
        records.append(record)
        if checkpoints is not None and index < len(specs) - 1:
            # The last stage needs none: the run's own outputs follow at once.
            state.completed.append(asdict(record))
            state.last_eval = last_eval
            state.weights_on_grid = ctx.weights_on_grid
            checkpoints.save(state, model if plugin.changes_weights else None, index)

    if cfg.get("save_model", True):
        with measure() as m_save, atomic_dir(out / "model") as staging:
            model.save_pretrained(staging, safe_serialization=True)
            loaded.tokenizer.save_pretrained(staging)
        records[-1].metrics["model_dir_bytes"] = float(folder_bytes(out / "model"))
        log.info("saved model/ in %.1f s", m_save.seconds)
    if check_export_config(cfg.get("export")):
        _export_compressed_tensors(model, loaded, specs, records[1:], out / "export")

    flat: dict[str, float] = {}
    for r in records:
        for k, v in {**r.metrics, **r.eval}.items():
            flat[f"{r.name}/{k}"] = v
    flat.update({f"final/{k}": v for k, v in last_eval.items()})
    result = RunResult(
        output_dir=out,
        model_name=loaded.name,
        stages=records,
        metrics=flat,
        model=model,
        logger_description=logger.describe(),
    )
    logger.summary(flat)
    atomic_write_text(out / "report.md", render_report(result, cfg))
    # metrics.json is written last: its presence marks a complete run folder.
    atomic_write_json(
        out / "metrics.json",
        {
            "model": loaded.name,
            "stages": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "target": r.target,
                    "metrics": r.metrics,
                    "eval": r.eval,
                    "artifacts": r.artifacts,
                }
                for r in records
            ],
            "summary": summary_rows(result),
            "flat": flat,
        },
    )
    if checkpoints is not None:
        checkpoints.clear()
    return result


def _export_compressed_tensors(
    model: nn.Module,
    loaded: LoadedModel,
    specs: list[StageSpec],
    stage_records: list[StageRecord],
    folder: Path,
) -> None:
    """export.compressed_tensors: the final model as a compressed-tensors folder built from
    the stages' containers (docs/export.md); its size and check go to the last record."""
    containers = [
        (spec.key, Path(record.artifacts["compressed"]))
        for spec, record in zip(specs, stage_records, strict=True)
        if "compressed" in record.artifacts
    ]
    with measure() as m_export:
        metrics = export_compressed_tensors(
            model, loaded.tokenizer, containers, folder / "compressed_tensors"
        )
    stage_records[-1].metrics.update(metrics, export_ct_seconds=m_export.seconds)
    log.info("exported export/compressed_tensors/ in %.1f s", m_export.seconds)


def _run_identity(cfg: DictConfig) -> tuple[str, str | None, list[str]]:
    """A tracking name that tells a sweep's jobs apart (task, job number, overrides), a
    group shared by one sweep (its folder's name), and tags: the experiment and the
    model, compressor, analyzer and editor chosen."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = str(cfg.get("task_name", "sculpt"))
    if not HydraConfig.initialized():
        return name, None, []
    hc = HydraConfig.get()
    choices = hc.runtime.choices
    tags = [
        f"{group}:{choices[group]}"
        for group in ("experiment", "model", "analyzer", "compressor", "editor", "trainer")
        if choices.get(group) not in (None, "null")
    ]
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = f"{name}-{Path(hc.sweep.dir).name}"
        name = f"{name}-{hc.job.num}"
    if hc.job.override_dirname:
        name = f"{name} [{hc.job.override_dirname}]"
    return name, group, tags


def _block_weights(model: nn.Module, loaded: LoadedModel) -> list[torch.Tensor]:
    from framework.models import block_linears

    return [layer.weight for layer in block_linears(model, loaded.arch).values()]


def _fingerprint(model: nn.Module) -> int:
    """A cheap change detector over every parameter (sum of float bit patterns)."""
    total = 0
    for p in model.parameters():
        total = hash((total, p.data_ptr(), float(p.detach().double().sum())))
    return total


def _log_eval_line(name: str, metrics: dict[str, float]) -> None:
    parts = [
        f"{k}={metrics[k]:.4g}"
        for k in ("perplexity", "kl", "top1_agreement", "cosine_to_reference", "topo_distance_mean")
        if k in metrics and math.isfinite(metrics[k])
    ]
    log.info(
        "eval %s: %s (%.1f s)", name, ", ".join(parts), metrics.get("eval_seconds", float("nan"))
    )
