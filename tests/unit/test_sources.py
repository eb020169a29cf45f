"""Text sources: files, globs, the packaged corpora, HF datasets; bad input names the file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from framework.data import sources
from framework.errors import SculptError

HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def test_text_file(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("héllo wörld\n", encoding="utf-8")
    assert sources.text_file(str(f)) == "héllo wörld\n"


def test_text_file_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "b.txt").write_text("words")
    assert sources.text_file("~/b.txt") == "words"


def test_text_glob_recursive_sorted_joined(tmp_path: Path) -> None:
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "deep").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.md").write_text("A")
    (tmp_path / "z" / "deep" / "c.md").write_text("C")
    (tmp_path / "ignored.txt").write_text("X")
    assert sources.text_glob(str(tmp_path / "**" / "*.md")) == "A\n\nB\n\nC"
    assert sources.text_glob(str(tmp_path / "*.md"), separator="|") == "A|B"


def test_text_glob_no_match_names_the_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "*.nothing")
    with pytest.raises(SculptError, match=r"^data\.source\.pattern: no file matches") as err:
        sources.text_glob(pattern)
    assert pattern in str(err.value)


def test_shakespeare_strips_markup(shakespeare_text: str) -> None:
    raw = sources.shakespeare(strip_markup=False)
    assert "**" in raw  # the wheel's plays are Markdown: the stripping has work to do
    assert "**" not in shakespeare_text
    assert not any(line.startswith("#") for line in shakespeare_text.splitlines())
    assert len(shakespeare_text) > 1_000_000
    assert "To be, or not to be" in shakespeare_text  # Hamlet is a tragedy


def test_shakespeare_groups_are_selected(shakespeare_text: str) -> None:
    tragedies = sources.shakespeare(groups=["tragedies"])
    comedies = sources.shakespeare(groups=["comedies"])
    assert "To be, or not to be" in tragedies and "To be, or not to be" not in comedies
    # PROTOCOL.md: the two groups' files sorted by path, joined with a blank line
    assert len(shakespeare_text) == len(comedies) + len("\n\n") + len(tragedies)


def test_shakespeare_unknown_group_names_the_key() -> None:
    with pytest.raises(SculptError, match=r"^data\.source\.groups: .*'sonnets'"):
        sources.shakespeare(groups=["sonnets"])


def test_strip_markdown() -> None:
    text = "# Act 1\n**HAMLET**  \n_Enter Ghost._ Words_with_underscores\n"
    assert sources.strip_markdown(text) == "Act 1\nHAMLET\nEnter Ghost. Words_with_underscores\n"


def test_kjv_text(kjv_text: str) -> None:
    assert kjv_text.lstrip().startswith("Genesis")
    assert "In the beginning God created the heaven and the earth." in kjv_text[:200]
    assert "Revelation 22" in kjv_text  # gen1:1-rev22:21: the whole Bible
    assert len(kjv_text) > 4_000_000


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n")
    with pytest.raises(SculptError, match="is empty") as err:
        sources.text_file(str(f))
    assert str(f) in str(err.value)


def test_empty_glob_names_the_pattern(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(SculptError, match="is empty") as err:
        sources.text_glob(str(tmp_path / "*.txt"))
    assert str(tmp_path / "*.txt") in str(err.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "nope.txt"
    with pytest.raises(SculptError, match=r"^data\.source\.path: .*does not exist") as err:
        sources.text_file(str(f))
    assert str(f) in str(err.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(SculptError, match="not a file") as err:
        sources.text_file(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_non_utf8_file_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(SculptError, match="not UTF-8") as err:
        sources.text_file(str(f))
    assert str(f) in str(err.value) and "byte 3" in str(err.value)


def test_non_utf8_file_in_glob_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("fine")
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SculptError, match="not UTF-8") as err:
        sources.text_glob(str(tmp_path / "*.txt"))
    assert str(bad) in str(err.value)


@pytest.mark.skipif(not HAS_DATASETS, reason="the 'datasets' package is not installed")
def test_hf_dataset_local_jsonl(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"text": t, "n": i}) + "\n"
            for i, t in enumerate(["first row", "", "second row", "third"])
        )
    )
    text = sources.hf_dataset(name="json", split="train", data_files=str(rows), field="text")
    assert text == "first row\n\nsecond row\n\nthird"  # empty rows dropped
    assert sources.hf_dataset(name="json", data_files=str(rows), max_rows=2) == "first row"
    with pytest.raises(SculptError, match=r"^data\.source\.field: 'body'"):
        sources.hf_dataset(name="json", data_files=str(rows), field="body")


@pytest.mark.skipif(HAS_DATASETS, reason="covers the path where 'datasets' is missing")
def test_hf_dataset_without_datasets_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SculptError, match="needs the 'datasets' package"):
        sources.hf_dataset(name="json", data_files=str(tmp_path / "rows.jsonl"))
