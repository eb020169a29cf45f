"""Entropy-coded storage: integer codes written as a real ANS bitstream (constriction).

Two codecs register with the container:

* ``ecsq``: an entropy-coded scalar quantizer. One uniform step per tensor (the step sets
  the rate), an optional deadzone (a wider zero cell), indices coded with a categorical
  model whose quantized histogram travels in the payload, and, optionally, one fp32
  reconstruction level per index (the mean of the samples that fell in the cell).
* ``uniform_ans``: the uniform-grid codec of RTN/GPTQ (framework.codecs.uniform) with its
  integer codes ANS-coded instead of packed at b bits; scales and zero points unchanged.

Every rate is counted from the bytes written (stream + model + levels), never from an
entropy estimate. The symbol model is rebuilt by the decoder from the stored quantized
histogram through the same code path as the encoder, so both sides use bit-identical
probabilities and decoding is exact. After decoding, the coder must be empty: a stream
that does not end exactly where the message ends is rejected.

ANS: J. Duda, "Asymmetric numeral systems", arXiv:0902.0271 (2009); the coder is
constriction's ``stream.stack.AnsCoder`` (R. Bamler, arXiv:2201.01741).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import constriction
import numpy as np
import torch

from framework.codecs.container import EncodedTensor, register_codec
from framework.codecs.packing import pack_bits, unpack_bits
from framework.codecs.uniform import CODEC as UNIFORM_CODEC
from framework.codecs.uniform import decode as uniform_decode
from framework.errors import ConfigError

ECSQ_CODEC = "ecsq"
UNIFORM_ANS_CODEC = "uniform_ans"
# Histogram entries are stored as uint16 relative to the most frequent symbol: 2 bytes per
# alphabet entry, and a probability error well below what a 24-bit ANS model resolves for
# all but the rarest symbols (each of which still gets a nonzero frequency).
FREQ_MAX = 0xFFFF
MAX_ALPHABET = 1 << 16
# The decoder allocates `count` symbols before it can check the stream, so bound it.
MAX_SYMBOLS = 1 << 31


# ----------------------------------------------------------------------------- ANS layer


def _model(freqs: np.ndarray):
    """The categorical model both sides build from the stored frequencies. A one-symbol
    alphabet gets a dummy zero-frequency partner (constriction needs two entries)."""
    probs = freqs.astype(np.float64)
    if probs.size == 1:
        probs = np.append(probs, 0.0)
    return constriction.stream.model.Categorical(probs, perfect=False)


def quantized_histogram(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """uint16 frequencies, scaled to the most frequent symbol; every symbol that occurs
    keeps a frequency >= 1 so it stays encodable."""
    counts = np.bincount(symbols, minlength=alphabet).astype(np.float64)
    freqs = np.rint(counts * (FREQ_MAX / counts.max()))
    freqs[(counts > 0) & (freqs < 1)] = 1
    return freqs.astype(np.uint16)


def ans_encode(symbols: np.ndarray) -> tuple[int, bytes, bytes]:
    """Integer symbols -> (offset, model bytes, stream bytes); symbols are shifted by
    `offset` (their minimum) to the alphabet {0..K-1}."""
    symbols = np.asarray(symbols).reshape(-1).astype(np.int64)
    if symbols.size == 0:
        return 0, b"", b""
    offset = int(symbols.min())
    shifted = symbols - offset
    alphabet = int(shifted.max()) + 1
    if alphabet > MAX_ALPHABET:
        raise ValueError(f"alphabet of {alphabet} symbols exceeds {MAX_ALPHABET}")
    freqs = quantized_histogram(shifted, alphabet)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(shifted.astype(np.int32), _model(freqs))
    stream = coder.get_compressed().astype("<u4").tobytes()
    return offset, freqs.astype("<u2").tobytes(), stream


def ans_decode(offset: int, model: bytes, stream: bytes, count: int) -> np.ndarray:
    """Inverse of ans_encode: `count` int64 symbols. Raises ValueError on a malformed model
    or stream, or when the stream is not consumed exactly."""
    if not 0 <= count <= MAX_SYMBOLS:
        raise ValueError(f"symbol count {count} out of range")
    if count == 0:
        if model or stream:
            raise ValueError("an empty tensor carries model or stream bytes")
        return np.zeros(0, dtype=np.int64)
    if len(model) % 2 or not model or len(model) // 2 > MAX_ALPHABET:
        raise ValueError(f"model section of {len(model)} bytes is not a uint16 histogram")
    if len(stream) % 4:
        raise ValueError(f"stream section of {len(stream)} bytes is not whole 32-bit words")
    freqs = np.frombuffer(model, dtype="<u2").astype(np.uint16)
    if not freqs.any():
        raise ValueError("histogram has no nonzero frequency")
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    symbols = coder.decode(_model(freqs), count).astype(np.int64)
    if not coder.is_empty():
        raise ValueError("ANS stream has bytes left after the last symbol")
    if symbols.size and int(symbols.max()) >= freqs.size:
        raise ValueError("decoded a symbol outside the stored alphabet")
    return symbols + int(offset)


# ---------------------------------------------------------------------------------- ECSQ


@dataclass(frozen=True)
class ECSQ:
    """Uniform-threshold scalar quantizer, entropy coded.

    Index q = sign(x) * floor(|x| / step + 1/2 - deadzone): deadzone=0 is plain rounding;
    deadzone in (0, 1/2) widens the zero cell to step * (1 + 2 * deadzone) and shifts the
    others outwards (the rounding offset of H.264-style quantizers), which lowers the rate
    at a given step and helps most at low rates.

    centroids: reconstruct index q at the mean of the samples in its cell (one fp32 per
    index used, counted in the rate) instead of the cell's midpoint; the conditional mean
    is the MSE-optimal decoder for fixed thresholds.
    """

    step: float
    deadzone: float = 0.0
    centroids: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.step) and self.step > 0):
            raise ConfigError("step", f"{self.step} must be a finite number > 0")
        if not 0.0 <= self.deadzone < 0.5:
            raise ConfigError("deadzone", f"{self.deadzone} is out of range [0, 0.5)")

    def indices(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        mag = np.floor(np.abs(x) / self.step + 0.5 - self.deadzone)
        return (np.sign(x) * np.maximum(mag, 0.0)).astype(np.int64)


def _midpoints(symbols: np.ndarray, step: float, deadzone: float) -> np.ndarray:
    """Cell midpoints: cell q != 0 spans step * [|q| - 1/2 + dz, |q| + 1/2 + dz)."""
    q = symbols.astype(np.float64)
    return ((q + np.sign(q) * deadzone) * step).astype(np.float32)


def encode_ecsq(w: torch.Tensor, quantizer: ECSQ) -> tuple[EncodedTensor, torch.Tensor]:
    """Encode any-shaped w -> (container entry, w_hat); w_hat equals decode(entry) exactly."""
    x = w.detach().double().reshape(-1).cpu().numpy()
    if not np.isfinite(x).all():
        raise ValueError("ECSQ input has non-finite values")
    q = quantizer.indices(x)
    offset, model, stream = ans_encode(q)
    sections = {"model": model, "stream": stream}
    if quantizer.centroids and q.size:
        shifted = q - offset
        counts = np.bincount(shifted)
        sums = np.bincount(shifted, weights=x)
        mids = _midpoints(np.arange(counts.size) + offset, quantizer.step, quantizer.deadzone)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), mids).astype("<f4")
        sections["levels"] = levels.tobytes()
    enc = EncodedTensor(
        codec=ECSQ_CODEC,
        shape=tuple(w.shape),
        bits=0.0,  # variable rate: filled in below from the bytes
        params={
            "step": float(quantizer.step),
            "deadzone": float(quantizer.deadzone),
            "centroids": bool(quantizer.centroids),
            "symbol_offset": offset,
        },
        sections=sections,
    )
    enc.bits = 8.0 * enc.nbytes() / max(q.size, 1)
    return enc, decode_ecsq(enc)


def decode_ecsq(enc: EncodedTensor) -> torch.Tensor:
    p = enc.params
    count = math.prod(enc.shape)
    offset = int(p["symbol_offset"])
    q = ans_decode(offset, enc.sections["model"], enc.sections["stream"], count)
    if bool(p["centroids"]) and count:
        raw = enc.sections["levels"]
        levels = np.frombuffer(raw, dtype="<f4")
        if levels.size != len(enc.sections["model"]) // 2:
            raise ValueError(f"levels section has {levels.size} entries, alphabet differs")
        values = levels[q - offset].astype(np.float32)
    else:
        values = _midpoints(q, float(p["step"]), float(p["deadzone"]))
    return torch.from_numpy(values.copy()).view(enc.shape)


# ---------------------------------------------------------- uniform codes, entropy coded


def entropy_code_uniform(enc: EncodedTensor) -> EncodedTensor:
    """A `uniform` entry with its b-bit codes ANS-coded: decodes to the same tensor, and is
    smaller whenever the codes are not uniformly distributed (e.g. Gaussian-like weights)."""
    if enc.codec != UNIFORM_CODEC:
        raise ValueError(f"expected a '{UNIFORM_CODEC}' entry, got '{enc.codec}'")
    bits = int(enc.params["bits"])
    count = math.prod(enc.shape)
    codes = unpack_bits(enc.sections["codes"], bits, count)
    offset, model, stream = ans_encode(codes)
    sections = {"codes_model": model, "codes_stream": stream}
    sections.update({k: v for k, v in enc.sections.items() if k != "codes"})
    out = EncodedTensor(
        codec=UNIFORM_ANS_CODEC,
        shape=enc.shape,
        bits=enc.bits,
        params={**enc.params, "symbol_offset": offset},
        sections=sections,
    )
    return out


def decode_uniform_ans(enc: EncodedTensor) -> torch.Tensor:
    bits = int(enc.params["bits"])
    count = math.prod(enc.shape)
    codes = ans_decode(
        int(enc.params["symbol_offset"]),
        enc.sections["codes_model"],
        enc.sections["codes_stream"],
        count,
    )
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"decoded a code outside [0, 2^{bits})")
    sections = {k: v for k, v in enc.sections.items() if not k.startswith("codes_")}
    sections["codes"] = pack_bits(codes.astype(np.uint8), bits)
    params = {k: v for k, v in enc.params.items() if k != "symbol_offset"}
    return uniform_decode(EncodedTensor(UNIFORM_CODEC, enc.shape, enc.bits, params, sections))


register_codec(ECSQ_CODEC, decode_ecsq)
register_codec(UNIFORM_ANS_CODEC, decode_uniform_ans)
