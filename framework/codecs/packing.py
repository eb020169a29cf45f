"""Pack unsigned integer codes of 1-8 bits into bytes, and back, bit-exactly."""

from __future__ import annotations

import numpy as np


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack the low `bits` bits of each uint8 code, MSB first, into a byte string."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if bits == 8:
        return codes.tobytes()
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    # [n, 8] bit matrix, keep the low `bits` columns, then pack the row-major bit stream.
    bit_matrix = np.unpackbits(codes[:, None], axis=1)[:, 8 - bits :]
    return np.packbits(bit_matrix.reshape(-1)).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: `count` uint8 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if len(data) != packed_size(count, bits):
        raise ValueError(
            f"expected {packed_size(count, bits)} bytes for {count} codes of {bits} bits, got {len(data)}"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    stream = np.unpackbits(raw)[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, 8 - bits :] = stream
    return np.packbits(padded, axis=1).reshape(-1)


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8
