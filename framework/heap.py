"""Keeping the process's resident memory down: hand freed heap memory back to the operating
system, and keep large tensors in files the kernel pages in and out instead of in the heap.

glibc's malloc keeps what large transient allocations freed (a tokenizer's buffers over a
whole corpus, a model loader's temporaries) inside its arenas, so the process's resident
memory stays at its high-water mark long after the work is done, and every later peak is
measured on top of it. malloc_trim(0) returns those pages; it costs milliseconds. Where
the C library is not glibc (macOS, musl) this does nothing.

A tensor moved to a file (`move_to_file`) is a private mapping of that file: its pages are
read in when used and, while unchanged, the kernel may drop them again; writes to it go to
anonymous memory, never to the file. The file is unlinked at once, so nothing is left on
disk whatever happens to the process. Page-cache memory is not counted in the resident set
and is reclaimed under pressure, which is what makes a model larger than the memory budget
workable block by block."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import torch

_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (no effect on their contents)


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True when glibc's malloc_trim ran."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is None:
        return False
    trim(0)
    return True


def move_to_file(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    """A copy of CPU `tensor` backed by a private mapping of a new file at `path` (written,
    mapped, then unlinked). None of its pages is resident until read."""
    if tensor.device.type != "cpu":
        raise ValueError(f"move_to_file: the tensor is on {tensor.device}, not the CPU")
    data = tensor.detach().contiguous()
    raw = data.reshape(-1).view(torch.uint8).numpy()
    with open(path, "xb") as f:  # x: never overwrite (or follow a planted link to) a file
        f.write(memoryview(raw))
    try:
        mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=data.dtype)
    finally:
        os.unlink(path)
    return mapped.view(data.shape)


def _file_backed_ranges() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of regular files (Linux /proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def page_out(tensor: torch.Tensor) -> int:
    """Ask the kernel to drop the resident pages of `tensor` that belong to a file mapping
    (a model loaded from a mapped safetensors file): the pages wholly inside the tensor's
    bytes, clean ones only in effect (MADV_PAGEOUT never changes contents: a page read
    again comes back from the file, a written one stays). Anonymous memory is left alone,
    so memory the heap will free anyway is not pushed to swap. The kernel also keeps pages
    that another process maps (two jobs reading one cached model share those pages, and
    the memory is counted once on the machine but in both resident sets). -> bytes
    advised (0 where not Linux or nothing was file-backed)."""
    libc = _libc()
    if sys.platform != "linux" or libc is None or tensor.device.type != "cpu":
        return 0
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    advised = 0
    for lo, hi in _file_backed_ranges():
        a = max(lo, -(-start // page) * page)
        b = min(hi, end // page * page)
        if b > a and libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_PAGEOUT) == 0:
            advised += b - a
    return advised
