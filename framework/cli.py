"""`sculpt`: the Hydra app. Before Hydra starts, the command line is composed and checked
(every sweep combination of a multirun too), so a bad key or value is one line on stderr
and exit code 2, with no run folder created."""

from __future__ import annotations

import itertools
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from framework.config import CONF_DIR as CONF_PATH
from framework.errors import SculptError, one_line

CONF_DIR = str(CONF_PATH)
_INFO_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--shell-completion",
    "-sc",
    "--resolve",
}
_MAX_PREFLIGHT = 64

log = logging.getLogger("sculpt")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def fail(message: str) -> None:
    print(f"sculpt: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def preflight(argv: list[str]) -> None:
    """Compose and validate the config for the given command line, without running."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from framework.run import validate

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [
        a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith("hydra")
    ]
    if any(a.startswith(("--config-", "-cp", "-cn", "--experimental")) for a in argv):
        return  # a different primary config: let Hydra handle it
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise SculptError(f"command line: {one_line(exc)}") from exc
    if multirun:
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
        combos = [c for batch in batches for c in batch]
    else:
        combos = [overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for combo in itertools.islice(combos, _MAX_PREFLIGHT):
            try:
                cfg = compose(config_name="config", overrides=list(combo))
            except Exception as exc:
                raise SculptError(f"config: {one_line(exc)}") from exc
            # ${hydra:runtime.output_dir} exists only inside a Hydra job: a plugin argument
            # that interpolates the run folder gets a stand-in (constructors store paths).
            cfg.paths.output_dir = "/nonexistent/sculpt-preflight"
            validate(cfg, skip_unused=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from framework.report import print_summary
    from framework.run import run

    try:
        result = run(cfg)
    except SculptError as exc:
        if _in_multirun():
            # Let the launcher record this job as failed (submitit writes the error into
            # the job's result, the basic sweeper raises after the batch): the other jobs
            # still run and the sweep exits non-zero.
            print(f"sculpt: error: {exc}", file=sys.stderr, flush=True)
            raise
        fail(str(exc))
        return None
    print_summary(result)
    metric = cfg.get("optimized_metric")
    return result.metrics.get(metric) if metric else None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["compare"]:  # a subcommand, not a Hydra override
        from framework.compare import main as compare

        sys.exit(compare(argv[1:]))
    if argv[:1] == ["describe"]:  # what a plugin accepts, read from its signature
        from framework.describe import main as describe

        sys.exit(describe(argv[1:]))
    _quiet_libraries()
    if not _INFO_FLAGS.intersection(argv):
        try:
            preflight(argv)
        except SculptError as exc:
            fail(str(exc))
    _hydra_main()


if __name__ == "__main__":
    main()
