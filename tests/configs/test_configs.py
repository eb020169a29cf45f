"""Every option of every config group, and every experiment, composes and validates:
each _target_ node's arguments bind to its target's signature and the stage plugins
instantiate. Found by globbing conf/ and experiments/, so a new YAML is covered at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.config import CONF_DIR
from framework.errors import SculptError
from framework.plugins import Analyzer, Compressor, Editor, Stage
from framework.run import resolve_stages, validate

EXPERIMENTS_DIR = CONF_DIR.parent / "experiments"

# Groups nested inside another group's node are selected with a package; each is checked
# at every place the shipped configs mount it.
NESTED_PACKAGES = {
    "data/source": ["data.evaluation.source", "data.calibration.source"],
    "data/training": ["data.training"],
}

# Options with a mandatory (???) value get a dummy, never a skip. "{pkg}" is the package the
# option is mounted at. test_dummies_are_needed proves each entry is still required.
DUMMIES = {
    "model/hf": ["model.path=/dummy/model-folder"],
    "model/gguf": ["model.path=/dummy/model.gguf"],
    "data/text_file": ["data.path=/dummy/text.txt"],
    "data/source/text_file": ["{pkg}.path=/dummy/text.txt"],
    "data/source/text_glob": ["{pkg}.pattern=/dummy/**/*.txt"],
}

STAGE_BASES = {"compressor": Compressor, "analyzer": Analyzer, "editor": Editor}


def _defaults_groups() -> set[str]:
    groups = set()
    for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults:
        if isinstance(entry, str):
            continue
        for key in entry:
            groups.add(str(key).removeprefix("override ").split("@")[0])
    return groups


def group_options() -> list[tuple[str, str, str | None]]:
    """(group, option, package) for every YAML under conf/ except the primary config,
    Hydra's own groups and the experiment symlink."""
    cases = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        rel = path.relative_to(CONF_DIR)
        if len(rel.parts) < 2 or rel.parts[0] in ("hydra", "experiment"):
            continue
        if rel.parts[0] == "launcher" and path.stem.startswith("local_"):
            continue  # a site's git-ignored account settings, not a shipped option
        group, option = "/".join(rel.parts[:-1]), path.stem
        if "/" in group:
            for pkg in NESTED_PACKAGES.get(group, [None]):
                cases.append((group, option, pkg))
        else:
            cases.append((group, option, None))
    return cases


def experiments() -> list[str]:
    return sorted(
        str(p.relative_to(EXPERIMENTS_DIR).with_suffix("")) for p in EXPERIMENTS_DIR.rglob("*.yaml")
    )


GROUP_CASES = group_options()


def _select(group: str, option: str, pkg: str | None) -> list[str]:
    if "/" in group:
        if pkg is None:
            pytest.fail(
                f"nested group {group}/ has no entry in NESTED_PACKAGES: where is it mounted?"
            )
        # A group mounted at its own path (data/training at data.training) is selected
        # without a package: that is how its defaults entry names it.
        at = "" if pkg == group.replace("/", ".") else f"@{pkg}"
        return [f"{group}{at}={option}"]
    prefix = "" if group in _defaults_groups() else "+"
    return [f"{prefix}{group}={option}"]


def _dummies(group: str, option: str, pkg: str | None) -> list[str]:
    return [d.format(pkg=pkg) for d in DUMMIES.get(f"{group}/{option}", [])]


def _case_id(case: tuple[str, str, str | None]) -> str:
    group, option, pkg = case
    return f"{group}={option}" + (f"@{pkg}" if pkg else "")


def test_discovery_finds_the_shipped_options() -> None:
    found = {(g, o) for g, o, _ in GROUP_CASES}
    assert {
        ("compressor", "rtn"),
        ("analyzer", "weight_stats"),
        ("editor", "ablate_heads"),
        ("model", "tiny_llama"),
        ("data/source", "kjv"),
        ("debug", "default"),
    } <= found
    assert not any(g.startswith(("hydra", "experiment")) for g, _, _ in GROUP_CASES)


@pytest.mark.parametrize("case", GROUP_CASES, ids=[_case_id(c) for c in GROUP_CASES])
def test_group_option_validates(case, compose_cfg) -> None:
    group, option, pkg = case
    cfg = compose_cfg(_select(group, option, pkg) + _dummies(group, option, pkg))
    assert not OmegaConf.missing_keys(cfg), f"??? left: {OmegaConf.missing_keys(cfg)}"
    stages = validate(cfg)
    assert all(isinstance(s, Stage) for s in stages)
    assert len(stages) == len(resolve_stages(cfg))
    if group in STAGE_BASES:
        node = OmegaConf.select(cfg, group)
        assert node is not None and "_target_" in node
        assert any(
            isinstance(s, STAGE_BASES[group])
            and type(s).__module__ + "." + type(s).__name__ == node._target_
            for s in stages
        )


@pytest.mark.parametrize("key", sorted(DUMMIES))
def test_dummies_are_needed(key: str, compose_cfg) -> None:
    """Each DUMMIES entry still covers a ??? value: without it validation names the key."""
    group, option = key.rsplit("/", 1)
    pkg = NESTED_PACKAGES.get(group, [None])[0]
    cfg = compose_cfg(_select(group, option, pkg))
    with pytest.raises(SculptError, match="must be set") as err:
        validate(cfg)
    dummy_key = _dummies(group, option, pkg)[0].split("=")[0]
    message = str(err.value)
    # the key itself, or a node that interpolates it: "x.path: must be set (${data.path} is ???)"
    assert message.startswith(f"{dummy_key}:") or f"${{{dummy_key}}} is ???" in message, message


@pytest.mark.parametrize("name", experiments())
def test_experiment_validates(name: str, compose_cfg) -> None:
    cfg = compose_cfg([f"experiment={name}"])
    assert not OmegaConf.missing_keys(cfg), f"??? left: {OmegaConf.missing_keys(cfg)}"
    stages = validate(cfg)
    assert len(stages) == len(resolve_stages(cfg))


def test_experiment_group_is_the_experiments_folder() -> None:
    link = CONF_DIR / "experiment"
    assert link.is_symlink() and link.resolve() == EXPERIMENTS_DIR.resolve()


def test_cfg_tiny(cfg_tiny, tmp_path: Path) -> None:
    assert cfg_tiny.model._target_ == "framework.models.build_tiny_llama"
    assert Path(cfg_tiny.paths.output_dir) == tmp_path
    assert cfg_tiny.data.calibration.seq_len == 128  # debug=default applied
    stages = validate(cfg_tiny)
    assert [type(s).__name__ for s in stages] == ["WeightStats", "RTN"]
    assert [s.name for s in resolve_stages(cfg_tiny)] == ["analyzer", "compressor"]


def test_misspelled_override_names_the_key(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_llama", "+compressor.bitz=3"])
    with pytest.raises(SculptError, match=r"^compressor\.bitz: not an argument of"):
        validate(cfg)


def test_wrong_type_override_names_the_key(compose_cfg) -> None:
    cfg = compose_cfg(["compressor.bits=three"])
    with pytest.raises(SculptError, match=r"^compressor\.bits: 'three' is not a valid int"):
        validate(cfg)


def test_out_of_range_override_names_the_key(compose_cfg) -> None:
    cfg = compose_cfg(["compressor.bits=9"])
    with pytest.raises(SculptError, match=r"^compressor\.bits: 9 must be in \[2, 8\]"):
        validate(cfg)


def test_unknown_stage_key_is_refused(compose_cfg) -> None:
    cfg = compose_cfg(["stages=[analyzer,compresor]"])
    with pytest.raises(SculptError, match=r"^stages\[1\]: 'compresor' names no config node"):
        validate(cfg)


def test_the_held_out_training_text_skips_every_evaluated_token(compose_cfg) -> None:
    """data/training=kjv_heldout trains on the evaluation text past what even the largest
    protocol evaluation reads; if either side changes, this says so before a leak does."""
    for data in ("protocol", "protocol_final"):
        cfg = compose_cfg([f"data={data}", "data/training=kjv_heldout"])
        training, evaluation = cfg.data.training, cfg.data.evaluation
        assert training.source._target_ == evaluation.source._target_
        assert evaluation.sampling == "sequential"
        assert training.skip_tokens >= evaluation.windows * evaluation.seq_len
    assert compose_cfg([]).data.get("training") is None  # the protocol trains on calibration
