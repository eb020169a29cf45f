"""Bounds and choices declared in a plugin's signature (framework/schema.py): the same check
on the YAML path (before anything is built) and on the Python path (at construction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Gt, Interval, Le, Lt
from omegaconf import OmegaConf

from framework.config import check_node
from framework.errors import ConfigError, SculptError
from framework.plugins import Analyzer, Context, StageResult
from framework.schema import constraint_problem, strip_annotated

Windows = Annotated[int, Ge(1)] | None
Fraction = Annotated[float, Interval(gt=0, lt=1)]


class Toy(Analyzer):
    def __init__(
        self,
        windows: Windows = None,
        fraction: Fraction = 0.5,
        mode: Literal["fast", "exact"] = "fast",
    ):
        self.windows, self.fraction, self.mode = windows, fraction, mode

    def analyze(self, model, ctx: Context) -> StageResult:  # pragma: no cover - not run
        return StageResult()


@pytest.mark.parametrize(
    ("value", "hint", "problem"),
    [
        (0, Annotated[int, Ge(1)], "0 must be >= 1"),
        (1, Annotated[int, Ge(1)], None),
        (0.0, Annotated[float, Gt(0)], "0.0 must be > 0"),
        (2, Annotated[float, Le(1)], "2 must be <= 1"),
        (1, Annotated[float, Lt(1)], "1 must be < 1"),
        (9, Annotated[int, Interval(ge=2, le=8)], "9 must be in [2, 8]"),
        (8, Annotated[int, Interval(ge=2, le=8)], None),
        (0.0, Fraction, "0.0 must be in (0, 1)"),
        (1.0, Fraction, "1.0 must be in (0, 1)"),
        (1.0, Annotated[float, Interval(ge=0, lt=1)], "1.0 must be in [0, 1)"),
        (-1, Annotated[float, Interval(ge=0)], "-1 must be >= 0"),
        (float("nan"), Annotated[float, Ge(0)], "nan must be >= 0"),
        (None, Windows, None),
        (0, Windows, "0 must be >= 1"),
        ("pca", Literal["global", "per_layer"], "'pca' is not one of global, per_layer"),
        (True, Literal[1, 2], "True is not one of 1, 2"),
        ("x", str, None),
        ([2, 9], list[Annotated[int, Interval(ge=2, le=8)]], "entry 1: 9 must be in [2, 8]"),
        ((64, None), tuple[Windows, ...], None),
        ((64, 0), Sequence[Windows], "entry 1: 0 must be >= 1"),
    ],
)
def test_constraint_problem(value, hint, problem) -> None:
    assert constraint_problem(value, hint) == problem


def test_strip_annotated_keeps_the_union_readable() -> None:
    assert str(strip_annotated(Windows)) == "int | None"
    assert strip_annotated(Fraction) is float


def test_python_construction_is_checked() -> None:
    assert Toy(windows=3, fraction=0.25, mode="exact").windows == 3
    with pytest.raises(ConfigError, match=r"^windows: 0 must be >= 1$"):
        Toy(windows=0)
    with pytest.raises(ConfigError, match=r"^fraction: 1 must be in \(0, 1\)$"):
        Toy(fraction=1)
    with pytest.raises(ConfigError, match=r"^mode: 'slow' is not one of fast, exact$"):
        Toy(mode="slow")


def test_yaml_node_is_checked_before_it_is_built() -> None:
    def node(**kwargs):
        return OmegaConf.create({"_target_": "plugins.analyzers.cka.CKA", **kwargs})

    check_node(node(windows=2), "similarity")
    check_node(node(windows=None), "similarity")
    with pytest.raises(SculptError, match=r"^similarity\.windows: 0 must be >= 1$"):
        check_node(node(windows=0), "similarity")
    with pytest.raises(SculptError, match=r"^similarity\.windows: 'two' is not a valid int"):
        check_node(node(windows="two"), "similarity")


def test_list_entries_are_checked_on_the_yaml_path() -> None:
    node = OmegaConf.create(
        {"_target_": "plugins.compressors.rd_alloc.RDAlloc", "bits_choices": [2, 3, 9]}
    )
    with pytest.raises(SculptError, match=r"^compressor\.bits_choices: entry 2: 9 must be in"):
        check_node(node, "compressor")
