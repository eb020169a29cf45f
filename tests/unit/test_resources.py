"""measure(): wall time and the peak resident memory of a block of work."""

from __future__ import annotations

import time

import numpy as np

from framework.eval import measure
from framework.eval.resources import rss_bytes

MB = 2**20


def test_seconds() -> None:
    with measure() as m:
        time.sleep(0.12)
    assert 0.12 <= m.seconds < 5.0
    with measure() as quick:
        pass
    assert 0 < quick.seconds < m.seconds


def test_cpu_seconds_count_work_not_waiting() -> None:
    with measure() as idle:
        time.sleep(0.3)
    with measure() as busy:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    assert idle.cpu_seconds < 0.1, idle.cpu_seconds
    assert busy.cpu_seconds > 0.15, busy.cpu_seconds


def test_peak_rss_sees_a_transient_allocation() -> None:
    """~200 MB allocated, touched and freed inside the block: the sampling thread must have
    caught the peak even though the memory is gone when the block ends."""
    before = rss_bytes() / MB
    with measure(interval=0.01) as m:
        block = np.ones(200 * MB, dtype=np.uint8)  # ones, not zeros: the pages are touched
        time.sleep(0.2)
        del block
    after = rss_bytes() / MB
    assert m.peak_rss_mb - before > 150, (before, m.peak_rss_mb)
    assert m.peak_rss_mb - after > 150, (after, m.peak_rss_mb)  # freed: a peak, not the end
    # What the block added on top of what the process held when it began.
    assert abs(m.start_rss_mb - before) < 50
    assert m.peak_rss_mb - m.start_rss_mb > 150


def test_peak_rss_without_allocation_stays_flat() -> None:
    before = rss_bytes() / MB
    with measure() as m:
        time.sleep(0.05)
    assert m.peak_rss_mb >= before * 0.9
    assert m.peak_rss_mb - before < 100


def test_as_metrics() -> None:
    with measure() as m:
        pass
    metrics = m.as_metrics("eval_")
    assert metrics["eval_seconds"] == m.seconds
    assert metrics["eval_peak_rss_mb"] == m.peak_rss_mb > 0
    assert metrics["eval_start_rss_mb"] == m.start_rss_mb > 0
    assert metrics["eval_cpu_seconds"] == m.cpu_seconds >= 0
    assert set(m.as_metrics()) >= {"seconds", "peak_rss_mb"}
