"""`sculpt describe`: a plugin's arguments, bounds, configured values and docstring notes,
read from the plugin and the composed config."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated, Literal

import pytest
from annotated_types import Ge, Interval

from framework.describe import argument_notes, describe, render_hint
from framework.errors import SculptError


@pytest.mark.parametrize(
    ("hint", "text"),
    [
        (Annotated[int, Ge(1)] | None, "int >= 1 | None"),
        (Annotated[float, Interval(gt=0, lt=1)], "float in (0, 1)"),
        (Annotated[float, Interval(ge=0, le=1)], "float in [0, 1]"),
        (Annotated[float, Interval(ge=0)], "float >= 0"),
        (Literal["global", "per_layer"], "one of global, per_layer"),
        (str, "str"),
        (list[Annotated[int, Ge(1)] | None], "list of (int >= 1 | None)"),
    ],
)
def test_render_hint(hint, text: str) -> None:
    assert render_hint(hint) == text


def test_argument_notes_read_the_args_section() -> None:
    class Documented:
        """One line.

        Args:
            alpha: the first
                argument, continued.
            beta (int): the second.

        Returns nothing.
        """

    assert argument_notes(Documented) == {
        "alpha": "the first argument, continued.",
        "beta": "the second.",
    }


def test_describe_lists_bounds_values_and_notes() -> None:
    text = describe(["editor=leace"])
    assert text.startswith("editor: plugins.editors.leace.Leace")
    row = next(line for line in text.splitlines() if line.strip().startswith("fit_fraction"))
    assert row.split()[1:] == ["float", "in", "(0,", "1)", "0.5"]
    assert "stratified fraction of every class" in text


def test_describe_reads_the_composed_experiment() -> None:
    text = describe(["experiment=erase_concept", "editor"])
    row = next(line for line in text.splitlines() if line.strip().startswith("layer "))
    assert row.split()[-1] == "29"  # the experiment's value, not the group default (1)


def test_describe_names_a_bad_key() -> None:
    with pytest.raises(SculptError, match=r"^nowhere: not a plugin node"):
        describe(["editor=leace", "nowhere"])
    with pytest.raises(SculptError, match=r"^describe: editor=nope: .*editor/nope"):
        describe(["editor=nope"])


def test_cli_subcommand() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "framework.cli", "describe", "compressor=rtn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "compressor: plugins.compressors.rtn.RTN" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "framework.cli", "describe"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "name a plugin" in bad.stderr
