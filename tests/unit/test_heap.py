"""framework.heap: freed heap pages go back to the OS (glibc), measured in a fresh process
so nothing else in the test session holds or frees memory meanwhile."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

SCRIPT = """
from framework.eval.resources import rss_bytes
from framework.heap import release_freed_memory
# 64 KiB blocks come from the heap (below malloc's mmap threshold); keeping every tenth one
# alive leaves the freed ones as holes that the heap cannot shrink past by itself.
blocks = [bytearray(64 * 1024) for _ in range(3000)]
kept = blocks[::10]
del blocks
before = rss_bytes()
ran = release_freed_memory()
after = rss_bytes()
print(ran, (before - after) / 2**20)
"""


@pytest.mark.skipif(
    sys.platform != "linux" or ctypes.util.find_library("c") is None, reason="glibc only"
)
def test_freed_holes_go_back_to_the_os() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out[0] == "True"
    # ~170 MiB were freed in holes; most of it must leave the resident set.
    assert float(out[1]) > 100, out


MAPPED_SCRIPT = """
import tempfile
from pathlib import Path
import torch
from framework.heap import move_to_file, page_out

def rss_file():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) / 1024

MIB = 64
original = torch.randn(MIB * 2**18)  # 64 MiB of float32
with tempfile.TemporaryDirectory(dir=".") as folder:
    path = Path(folder) / "t.bin"
    start = rss_file()
    mapped = move_to_file(original, path)
    moved = rss_file()
    print(int(path.exists()), int(torch.equal(mapped, original)))  # compares: reads it all
    read = rss_file()
    dropped = page_out(mapped) / 2**20
    after = rss_file()
    print(int(torch.equal(mapped, original)))  # read back from the (unlinked) file
    mapped[:10] = 7.0  # a private copy of the page: the write must survive page_out
    page_out(mapped)
    print(int(bool((mapped[:10] == 7.0).all())), int(torch.equal(mapped[10:], original[10:])))
    print(moved - start, read - moved, dropped, read - after)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="Linux mappings and /proc")
def test_a_tensor_moved_to_a_file_is_paged_in_on_use_and_out_on_request(tmp_path) -> None:
    """move_to_file keeps nothing resident until read and leaves no file behind; page_out
    gives the read pages back without changing any value, written ones included."""
    out = subprocess.run(
        [sys.executable, "-c", MAPPED_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tmp_path,
    ).stdout.split()
    assert out[:5] == ["0", "1", "1", "1", "1"], out
    moved, read, dropped, released = (float(x) for x in out[5:])
    assert moved < 8, out  # mapping it brought (almost) nothing in
    assert read > 56, out  # reading it did
    assert dropped > 56 and released > 56, out  # and page_out gave it back
