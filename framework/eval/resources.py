"""Wall time and peak memory of a block of work.

Peak resident memory is sampled from /proc/self/statm by a background thread (ru_maxrss
is a process-lifetime maximum and cannot be reset per stage); on CUDA the allocator's
peak is read as well."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    # CPU time of the whole process (all its threads) over the block: unlike wall time it
    # barely moves when other jobs share the cores, so runs made under different loads
    # compare on it.
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    # Resident memory when the work began: peak - start is what the work itself added on
    # top of whatever the process already held (the model, the runner's caches).
    start_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        out = {
            f"{prefix}seconds": self.seconds,
            f"{prefix}cpu_seconds": self.cpu_seconds,
            f"{prefix}peak_rss_mb": self.peak_rss_mb,
            f"{prefix}start_rss_mb": self.start_rss_mb,
        }
        if self.peak_cuda_mb is not None:
            out[f"{prefix}peak_cuda_mb"] = self.peak_cuda_mb
        return out


@contextmanager
def measure(interval: float = 0.05) -> Iterator[Measurement]:
    result = Measurement()
    peak = [rss_bytes()]
    result.start_rss_mb = peak[0] / 2**20
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cpu_start = time.process_time()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        result.seconds = time.perf_counter() - start
        result.cpu_seconds = time.process_time() - cpu_start
        result.peak_rss_mb = peak[0] / 2**20
        if cuda:
            result.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20
