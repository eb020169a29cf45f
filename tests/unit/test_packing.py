"""Bit packing of 1-8 bit codes: exact round trips, the byte layout, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.codecs.packing import pack_bits, packed_size, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1000])
def test_round_trip_every_width(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 1 << bits, size=count, dtype=np.uint8)
    data = pack_bits(codes, bits)
    assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
    out = unpack_bits(data, bits, count)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes)


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 8))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=300))
    return np.array(values, dtype=np.uint8), bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_round_trip_property(case: tuple[np.ndarray, int]) -> None:
    codes, bits = case
    data = pack_bits(codes, bits)
    assert len(data) == packed_size(codes.size, bits)
    np.testing.assert_array_equal(unpack_bits(data, bits, codes.size), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_bits())
def test_packing_is_dense_msb_first(case: tuple[np.ndarray, int]) -> None:
    """The stream is the codes' low bits, most significant first, zero padded."""
    codes, bits = case
    expected = "".join(format(int(c), f"0{bits}b") for c in codes)
    expected += "0" * (-len(expected) % 8)
    got = "".join(format(b, "08b") for b in pack_bits(codes, bits))
    assert got == expected


def test_known_layout() -> None:
    assert pack_bits(np.array([1, 0, 1], dtype=np.uint8), 1) == bytes([0b1010_0000])
    assert pack_bits(np.array([3, 1, 2], dtype=np.uint8), 2) == bytes([0b1101_1000])
    assert pack_bits(np.array([5, 2, 7], dtype=np.uint8), 3) == bytes([0b1010_1011, 0b1000_0000])


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_unpack_wrong_length_raises(bits: int) -> None:
    codes = (np.arange(20) % (1 << bits)).astype(np.uint8)
    data = pack_bits(codes, bits)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(data[:-1], bits, 20)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(data + b"\x00", bits, 20)
    with pytest.raises(ValueError, match="expected"):
        unpack_bits(data, bits, 20 + 8)  # more codes than the bytes hold


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        pack_bits(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        unpack_bits(b"\x00", bits, 1)


@pytest.mark.parametrize("bits", range(1, 8))
def test_code_too_wide_raises(bits: int) -> None:
    with pytest.raises(ValueError, match=f"{bits} bits"):
        pack_bits(np.array([0, 1 << bits], dtype=np.uint8), bits)
