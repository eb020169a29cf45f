"""Config checking: a node is bound to its target's signature before anything is built,
and every error names the config key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from framework.config import build, check_config, check_node
from framework.errors import ConfigError, SculptError
from plugins.compressors.rtn import RTN

RTN_TARGET = "plugins.compressors.rtn.RTN"


def node(**kwargs):
    return OmegaConf.create({"_target_": RTN_TARGET, **kwargs})


def test_valid_node_passes() -> None:
    check_node(node(bits=3, group_size=192, symmetric=False), "compressor")
    check_node(node(group_size=None), "compressor")  # int | None accepts null
    check_node(node(), "compressor")  # every argument has a default


def test_misspelled_argument_names_the_key() -> None:
    with pytest.raises(SculptError, match=r"^compressor\.bitz: not an argument of .*RTN") as err:
        check_node(node(bitz=3), "compressor")
    assert "accepted: bits, group_size, symmetric" in str(err.value)


@pytest.mark.parametrize(
    ("arg", "value", "type_name"),
    [
        ("bits", "three", "int"),
        ("bits", 3.5, "int"),
        ("bits", True, "int"),
        ("symmetric", "yes", "bool"),
        ("group_size", [1], "int | None"),
    ],
)
def test_wrong_type_names_the_key(arg: str, value, type_name: str) -> None:
    with pytest.raises(SculptError, match=rf"^compressor\.{arg}: .* is not a valid {type_name}"):
        check_node(node(**{arg: value}), "compressor")


def test_float_argument_accepts_int() -> None:
    target = "plugins.analyzers.weight_stats.WeightStats"
    check_node(OmegaConf.create({"_target_": target, "outlier_ratio": 6}), "analyzer")
    with pytest.raises(SculptError, match=r"^analyzer\.outlier_ratio: 'big'"):
        check_node(OmegaConf.create({"_target_": target, "outlier_ratio": "big"}), "analyzer")


def test_missing_required_argument_names_the_key() -> None:
    editor = OmegaConf.create({"_target_": "plugins.editors.ablate_heads.AblateHeads"})
    with pytest.raises(SculptError, match=r"^editor\.heads: required by .*AblateHeads but not set"):
        check_node(editor, "editor")
    check_node(OmegaConf.create({**editor, "_partial_": True}), "editor")  # partial may omit it


def test_missing_value_names_the_key() -> None:
    source = OmegaConf.create({"_target_": "framework.data.sources.text_file", "path": "???"})
    with pytest.raises(SculptError, match=r"^data\.evaluation\.source\.path: must be set"):
        check_node(source, "data.evaluation.source")


def test_interpolated_missing_value_names_the_key() -> None:
    """data=text_file: each side's source.path is ${data.path}, which is ??? until set."""
    cfg = OmegaConf.create(
        {
            "data": {
                "path": "???",
                "evaluation": {
                    "source": {
                        "_target_": "framework.data.sources.text_file",
                        "path": "${data.path}",
                    }
                },
            },
        }
    )
    with pytest.raises(SculptError, match=r"^data\.evaluation\.source\.path: must be set") as err:
        check_config(cfg)
    assert "${data.path} is ???" in str(err.value)
    cfg.data.path = "/some/file.txt"
    check_config(cfg)


def test_unimportable_target_names_the_key() -> None:
    with pytest.raises(
        SculptError, match=r"^compressor\._target_: cannot import 'plugins\.nope\.X'"
    ):
        check_node(OmegaConf.create({"_target_": "plugins.nope.X"}), "compressor")
    with pytest.raises(SculptError, match=r"^compressor: no _target_"):
        check_node(OmegaConf.create({"bits": 3}), "compressor")


def test_interpolated_values_are_not_type_checked_early() -> None:
    cfg = OmegaConf.create({"b": 3, "compressor": {"_target_": RTN_TARGET, "bits": "${b}"}})
    check_node(cfg.compressor, "compressor")


def test_check_config_walks_nested_nodes_and_lists() -> None:
    cfg = OmegaConf.create(
        {
            "data": {
                "evaluation": {"source": {"_target_": "framework.data.sources.kjv", "cache": 1}}
            },
        }
    )
    with pytest.raises(SculptError, match=r"^data\.evaluation\.source\.cache: not an argument"):
        check_config(cfg)
    cfg = OmegaConf.create(
        {"stages": [{"_target_": RTN_TARGET}, {"_target_": RTN_TARGET, "bits": "x"}]}
    )
    with pytest.raises(SculptError, match=r"^stages\[1\]\.bits:"):
        check_config(cfg)


def test_build_instantiates() -> None:
    plugin = build(node(bits=4, group_size=None, symmetric=True), "compressor")
    assert isinstance(plugin, RTN)
    assert (plugin.grid.bits, plugin.grid.group_size, plugin.grid.symmetric) == (4, None, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"bits": 9}, r"^compressor\.bits: 9 must be in \[2, 8\]$"),
        ({"group_size": 0}, r"^compressor\.group_size: 0 must be >= 1"),
    ],
)
def test_constructor_config_error_gets_the_key(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^bits|^group_size"):
        RTN(**args)  # the plugin itself only knows its argument name
    with pytest.raises(SculptError, match=message):
        build(node(**args), "compressor")


def test_config_error_key_follows_the_node_path() -> None:
    target = "plugins.analyzers.weight_stats.WeightStats"
    with pytest.raises(SculptError, match=r"^stages\[2\]\.outlier_ratio: 0\.5 must be > 1"):
        build(OmegaConf.create({"_target_": target, "outlier_ratio": 0.5}), "stages[2]")
