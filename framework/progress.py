"""Readable progress: rich bars on a terminal, a few plain lines when stdout is a file."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def make_tracker(interactive: bool | None = None):
    interactive = sys.stdout.isatty() if interactive is None else interactive

    def track(
        iterable: Iterable[T], description: str = "", total: int | None = None
    ) -> Iterator[T]:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if interactive:
            from rich.progress import track as rich_track

            yield from rich_track(iterable, description=description, total=total, transient=True)
            return
        yield from _plain(iterable, description, total)

    return track


def _plain(iterable: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    start = time.perf_counter()
    marks = {max(1, round(total * f)) for f in (0.25, 0.5, 0.75, 1.0)} if total else set()
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        if i in marks:
            print(f"  {description}: {i}/{total} ({time.perf_counter() - start:.1f} s)", flush=True)
    if not marks:
        print(f"  {description}: {i} done ({time.perf_counter() - start:.1f} s)", flush=True)
