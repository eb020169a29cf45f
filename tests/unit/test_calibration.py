"""framework.calibration: block inputs captured once, the file-backed activations that
stand in for them when memory is short, and the calibration arguments every calibrated
compressor declares alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from framework.calibration import (
    DiskActivations,
    capture_block_inputs,
    damped_cholesky,
    inverse_cholesky_upper,
)
from framework.config import check_node
from framework.errors import ConfigError, SculptError
from framework.eval import measure
from framework.models import blocks

MB = 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_disk_activations_round_trip(tmp_path, dtype) -> None:
    store = DiskActivations(tmp_path / "a.bin", (7, 5, 3), dtype, torch.device("cpu"))
    data = torch.randn(7, 5, 3).to(dtype)
    store[slice(6, 7)] = data[6:7]  # chunks 3 + 3 + 1, written out of order
    store[slice(0, 3)] = data[0:3]
    store[slice(3, 6)] = data[3:6]
    assert torch.equal(store[slice(0, 7)], data)
    assert torch.equal(store[slice(2, 5)], data[2:5])
    assert store[slice(2, 5)].dtype == dtype
    assert (tmp_path / "a.bin").stat().st_size == data.numel() * data.element_size()
    store.close()
    assert not (tmp_path / "a.bin").exists()
    store.close()  # twice is harmless


def test_disk_activations_refuse_what_they_cannot_hold(tmp_path) -> None:
    store = DiskActivations(tmp_path / "a.bin", (4, 2), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="contiguous"):
        store[slice(0, 4, 2)]
    with pytest.raises(ValueError, match=r"\(3, 2\) into rows 0:2"):
        store[slice(0, 2)] = torch.zeros(3, 2)
    with pytest.raises(FileExistsError):  # never writes over a file that is there
        DiskActivations(tmp_path / "a.bin", (4, 2), torch.float32, torch.device("cpu"))
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store[slice(0, 1)]


def test_disk_activations_keep_resident_memory_to_one_chunk(tmp_path) -> None:
    """256 MB written and read back 8 MB at a time: the process holds about a chunk, not
    the whole (an in-memory tensor of the same shape would add 256 MB)."""
    rows, per_row = 32, 8 * MB // 4
    store = DiskActivations(tmp_path / "a.bin", (rows, per_row), torch.float32, torch.device("cpu"))
    with measure(interval=0.005) as m:
        for r in range(rows):
            store[slice(r, r + 1)] = torch.full((1, per_row), float(r))
        total = sum(float(store[slice(r, r + 1)][0, -1]) for r in range(rows))
    store.close()
    assert total == sum(range(rows))
    assert m.peak_rss_mb - m.start_rss_mb < 64, (m.start_rss_mb, m.peak_rss_mb)


def test_capture_offloaded_equals_in_memory(tiny, tmp_path) -> None:
    windows = torch.tensor(np.random.default_rng(0).integers(0, 200, size=(5, 16)))
    first = blocks(tiny.model, tiny.arch)[0]
    with torch.no_grad():
        mem = capture_block_inputs(tiny.model, first, windows, 2, torch.device("cpu"))
        disk = capture_block_inputs(
            tiny.model, first, windows, 2, torch.device("cpu"), offload_to=tmp_path / "h.bin"
        )
    assert isinstance(disk.hidden, DiskActivations)
    assert torch.equal(disk.hidden[slice(0, 5)], mem.hidden)
    assert [rows for rows, _, _ in disk.calls] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    disk.hidden.close()


def test_damped_cholesky_grows_the_damping_only_as_far_as_needed() -> None:
    a = torch.randn(64, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = a.T @ a
    chol, d = damped_cholesky(h, 0.01, floor=1e-10, attempts=14, what="t")
    assert d == 0.01  # well conditioned: the first try succeeds
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(chol @ chol.T, damped)
    # An exactly duplicated input makes H singular: with no damping at all the factorisation
    # fails and d grows from the floor.
    dup = torch.cat([a, a[:, :1]], dim=1)
    chol, d = damped_cholesky(dup.T @ dup, 0.0, floor=1e-10, attempts=14, what="t")
    assert 0.0 < d < 1e-3 and torch.isfinite(chol).all()
    with pytest.raises(SculptError, match=r"^merge: the Hessian is not positive definite"):
        damped_cholesky(-torch.eye(3, dtype=torch.float64), 0.0, 1e-10, 3, "merge")


def test_inverse_cholesky_upper_factors_the_damped_inverse() -> None:
    a = torch.randn(80, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = a.T @ a
    upper, d = inverse_cholesky_upper(h, 0.01, what="quip")
    assert d == 0.01 and torch.equal(upper, upper.triu())
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped))
    with pytest.raises(SculptError, match=r"^quip: "):
        inverse_cholesky_upper(-torch.eye(3, dtype=torch.float64), 0.0, what="quip")


CALIBRATED = [
    "plugins.compressors.gptq.GPTQ",
    "plugins.compressors.quip.QuIP",
    "plugins.compressors.rd_alloc.RDAlloc",
]


@pytest.mark.parametrize("target", CALIBRATED)
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damp": 1.0}, r"damp: 1\.0 must be in \[0, 1\)"),
        ({"damp": float("nan")}, r"damp: nan must be in"),
        ({"calibration_windows": 0}, r"calibration_windows: 0 must be >= 1"),
        ({"calibration_windows": 2.5}, r"calibration_windows: 2\.5 is not a valid int"),
        ({"batch_size": 0}, r"batch_size: 0 must be >= 1"),
    ],
)
def test_calibration_arguments_are_checked_alike(target: str, kwargs, message: str) -> None:
    """The calibrated compressors share one declaration of these arguments
    (framework.calibration.Damp, CalibrationWindows, BatchSize)."""
    node = OmegaConf.create({"_target_": target, **kwargs})
    with pytest.raises(SculptError, match=rf"^compressor\.{message}"):
        check_node(node, "compressor")
    if "valid" not in message:  # bounds also hold for a call from Python
        with pytest.raises(ConfigError, match=rf"^{message}"):
            get_object(target)(**kwargs)
    get_object(target)(damp=0.0, calibration_windows=128, batch_size=1)


@pytest.mark.parametrize("target", CALIBRATED[:2])
def test_offload_flags_are_booleans(target: str) -> None:
    node = OmegaConf.create({"_target_": target, "offload_activations": "yes"})
    with pytest.raises(
        SculptError, match=r"^compressor\.offload_activations: 'yes' is not a valid bool"
    ):
        check_node(node, "compressor")
