"""Hand freed heap memory back to the operating system.

glibc's malloc keeps what large transient allocations freed (a tokenizer's buffers over a
whole corpus, a model loader's temporaries) inside its arenas, so the process's resident
memory stays at its high-water mark long after the work is done, and every later peak is
measured on top of it. malloc_trim(0) returns those pages; it costs milliseconds. Where
the C library is not glibc (macOS, musl) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc's malloc_trim ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
