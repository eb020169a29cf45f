"""Entropy-coded storage: the ANS layer, ECSQ and ANS-coded uniform codes decode exactly,
through the container too, and their rate is the bytes written, close to the entropy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.codecs import read_container, write_container
from framework.codecs.entropy import (
    ECSQ,
    ans_decode,
    ans_encode,
    decode_ecsq,
    encode_ecsq,
    entropy_code_uniform,
)
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import ConfigError


def _entropy_bits(symbols: np.ndarray) -> float:
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize(
    "symbols",
    [
        np.array([3, -2, 0, 0, 7, -2]),
        np.full(50, -5),  # a one-symbol alphabet
        np.array([0]),
        np.zeros(0, dtype=np.int64),
        np.random.default_rng(0).integers(-300, 300, 5000),
    ],
    ids=["small", "constant", "single", "empty", "wide"],
)
def test_ans_round_trip(symbols: np.ndarray) -> None:
    offset, model, stream = ans_encode(symbols)
    out = ans_decode(offset, model, stream, symbols.size)
    assert out.dtype == np.int64 and np.array_equal(out, symbols)


def test_ans_rate_from_bytes_is_close_to_the_entropy() -> None:
    x = np.random.default_rng(1).standard_normal(200_000)
    symbols = np.rint(x / 0.4).astype(np.int64)
    _, model, stream = ans_encode(symbols)
    stream_bits = 8.0 * len(stream) / symbols.size
    h = _entropy_bits(symbols)
    # ANS with a 24-bit model costs a hair above the empirical entropy (plus one word).
    assert h <= stream_bits <= h + 0.005
    assert len(model) == 2 * (symbols.max() - symbols.min() + 1)


def test_ans_rejects_a_stream_with_bytes_left() -> None:
    symbols = np.random.default_rng(2).integers(0, 9, 1000)
    offset, model, stream = ans_encode(symbols)
    with pytest.raises(ValueError):
        ans_decode(offset, model, stream + b"\x01\x00\x00\x00", symbols.size)
    with pytest.raises(ValueError, match="32-bit words"):
        ans_decode(offset, model, stream[:-1], symbols.size)
    with pytest.raises(ValueError, match="histogram"):
        ans_decode(offset, model[:-1], stream, symbols.size)


@pytest.mark.parametrize("centroids", [True, False])
@pytest.mark.parametrize("deadzone", [0.0, 0.25])
def test_ecsq_decodes_exactly(centroids: bool, deadzone: float) -> None:
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    enc, w_hat = encode_ecsq(w, ECSQ(0.3, deadzone, centroids))
    assert torch.equal(decode_ecsq(enc), w_hat)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32
    # Rate: the bytes, all sections counted.
    assert enc.bits == pytest.approx(8.0 * enc.nbytes() / w.numel())
    # Error bounded by the cell: |x - x_hat| < step (1 + 2 dz) for the zero cell, and the
    # centroid lies in its cell.
    assert float((w_hat - w).abs().max()) < 0.3 * (1 + 2 * deadzone)
    assert ("levels" in enc.sections) == centroids


def test_ecsq_rate_is_close_to_the_index_entropy() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q = ECSQ(0.5)
    enc, _ = encode_ecsq(x, q)
    h = _entropy_bits(q.indices(x.numpy()))
    assert h < enc.bits < h + 0.01  # side information (histogram, levels) included


def test_ecsq_deadzone_lowers_the_rate_at_a_step() -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(5))
    plain, _ = encode_ecsq(x, ECSQ(0.5, 0.0))
    wide, _ = encode_ecsq(x, ECSQ(0.5, 0.3))
    assert wide.bits < plain.bits - 0.1


def test_ecsq_bad_arguments_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^step:"):
        ECSQ(0.0)
    with pytest.raises(ConfigError, match=r"^deadzone:"):
        ECSQ(0.1, deadzone=0.5)
    with pytest.raises(ValueError, match="non-finite"):
        encode_ecsq(torch.tensor([1.0, math.nan]), ECSQ(0.1))


def test_uniform_codes_entropy_coded(tmp_path: Path) -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(6))
    enc, w_hat = encode(w, UniformGrid(4, 64, False))
    coded = entropy_code_uniform(enc)
    assert coded.codec == "uniform_ans"
    # Gaussian weights on a min-max grid use the middle codes most: fewer bytes.
    assert coded.nbytes() < 0.95 * enc.nbytes()
    path = write_container(
        tmp_path / "c",
        {"u": enc, "ua": coded, "e": encode_ecsq(w, ECSQ(0.2))[0]},
    )
    out = read_container(path)
    assert torch.equal(out["u"], w_hat) and torch.equal(out["ua"], w_hat)
    assert torch.equal(out["e"], encode_ecsq(w, ECSQ(0.2))[1])
