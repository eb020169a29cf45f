"""Trellis-coded quantization with a bitshift trellis and a pseudo-random Gaussian codebook.

The idea (QTIP: A. Tseng, Q. Sun, D. Hou, C. De Sa, "QTIP: Quantization with Trellises and
Incoherence Processing", NeurIPS 2024, arXiv:2406.11235; trellis-coded quantization:
M. W. Marcellin, T. R. Fischer, IEEE Trans. Commun. 38(1), 1990): a sequence of T samples
is coded by a bit string; the decoder slides an L-bit window over it, k bits per sample,
and outputs codebook[window] for each position. So the state after sample t is
s_t = (s_{t-1} >> k) | (b_t << (L - k)) (the newest k bits enter at the top), every state
has 2^k successors and 2^k predecessors,
and the encoder's job, finding the bit string whose outputs are nearest to x, is a
shortest path through the trellis: the Viterbi algorithm, vectorised here over all 2^L
states and a batch of sequences.

The codebook holds the 2^L quantiles of a Gaussian, randomly permuted (seeded), scaled to
the output variance of the Gaussian test channel, 1 - 2^(-2k) (Cover & Thomas, Thm.
10.3.2): a stand-in for a random Gaussian codebook whose entries look i.i.d. along any
path. Everything here is this module's own code.

Rate, counted from the bytes that `encode` returns: each sequence stores its first state
(L bits, stored as a uint8/16/32) and then k bits per further sample, so a sequence of
T samples costs 8 * init_bytes + (T-1)*k bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtri

from framework.codecs.packing import pack_bits, unpack_bits
from framework.errors import ConfigError

# Backpointer memory is T * B * 2^(L-k) bytes; a chunk of sequences is sized to stay
# under this many bytes.
_BACKPOINTER_BUDGET = 1 << 27


@dataclass(frozen=True)
class BitshiftTrellis:
    """An L-bit-state bitshift trellis at k bits per sample, over sequences of T samples.

    state_bits: L (memory and Viterbi work grow as 2^L; QTIP uses L=16).
    bits_per_sample: k, the rate before the per-sequence start state.
    sequence_length: T; the start state costs (8 * init_bytes - k) / T extra bits per sample.
    scale: codebook standard deviation; None -> sqrt(1 - 2^(-2k)) for a unit-variance source.
    seed: the codebook's permutation.
    """

    state_bits: int = 12
    bits_per_sample: int = 2
    sequence_length: int = 1024
    scale: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.bits_per_sample <= 8:
            raise ConfigError("bits_per_sample", f"{self.bits_per_sample} is out of range [1, 8]")
        if not self.bits_per_sample < self.state_bits <= 20:
            raise ConfigError(
                "state_bits", f"{self.state_bits} must exceed bits_per_sample and be <= 20"
            )
        if self.sequence_length < 2:
            raise ConfigError("sequence_length", f"{self.sequence_length} must be >= 2")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError("scale", f"{self.scale} must be > 0")

    @property
    def states(self) -> int:
        return 1 << self.state_bits

    @property
    def init_bytes(self) -> int:
        """Bytes per stored start state (a little-endian uint8/16/32)."""
        return 1 if self.state_bits <= 8 else 2 if self.state_bits <= 16 else 4

    def codebook(self) -> np.ndarray:
        """float32 [2^L]: Gaussian quantiles in a seeded random order."""
        n = self.states
        values = ndtri((np.arange(n) + 0.5) / n)
        values *= 1.0 / math.sqrt(float(np.mean(values**2)))  # exactly unit power
        scale = self.scale
        if scale is None:
            scale = math.sqrt(1.0 - 2.0 ** (-2 * self.bits_per_sample))
        perm = np.random.default_rng(self.seed).permutation(n)
        return (values[perm] * scale).astype(np.float32)

    def rate(self, samples: int) -> float:
        """Bits per sample of `encode`'s output for this many samples."""
        return 8.0 * self.encoded_bytes(samples) / samples

    def encoded_bytes(self, samples: int) -> int:
        seqs = samples // self.sequence_length
        return (
            seqs * self.init_bytes
            + (seqs * (self.sequence_length - 1) * self.bits_per_sample + 7) // 8
        )


def viterbi(x: torch.Tensor, trellis: BitshiftTrellis, codebook: torch.Tensor) -> torch.Tensor:
    """Best state path [B, T] (int64) for sequences x [B, T] under squared error."""
    k, L = trellis.bits_per_sample, trellis.state_bits
    n_pred, n_groups = 1 << k, 1 << (L - k)
    batch, length = x.shape
    # New bits enter at the top, so the predecessors of s are p = (s mod 2^(L-k)) * 2^k + j,
    # j < 2^k: contiguous, and a [B, 2^(L-k), 2^k] view puts them on the last axis; the new
    # states s = b * 2^(L-k) + h form a [B, 2^k, 2^(L-k)] view whose broadcast add runs
    # along contiguous memory (the other bit order is ~4x slower in torch on CPU).
    # argmin is several times slower than amin, so each cost carries its own j in its k
    # low mantissa bits: non-negative float32 order equals int32 order, so one integer amin
    # returns the minimum and, in its low bits, where it came from. The perturbation is
    # < 2^k ulps (relative 2^(k-23)) and only steers ties; decode() gives the true error.
    low = n_pred - 1
    tag = (torch.arange(1 << L, dtype=torch.int32) & low).expand(batch, -1)
    keep = torch.tensor(~low, dtype=torch.int32)
    grouped_cb = codebook.view(n_pred, n_groups)
    cost = (x[:, :1] - codebook[None, :]) ** 2  # any start state (it is stored)
    back = torch.empty(length, batch, n_groups, dtype=torch.uint8)
    new = torch.empty(batch, n_pred, n_groups)
    for t in range(1, length):
        bits = cost.view(torch.int32)
        bits.bitwise_and_(keep).bitwise_or_(tag)
        best = bits.view(batch, n_groups, n_pred).amin(dim=2)
        back[t] = (best & low).to(torch.uint8)
        torch.sub(x[:, t, None, None], grouped_cb[None], out=new)
        new.square_().add_(best.view(torch.float32)[:, None, :])
        cost, new = new.view(batch, -1), cost.view(batch, n_pred, n_groups)
    path = torch.empty(batch, length, dtype=torch.int64)
    state = cost.argmin(dim=1)
    path[:, -1] = state
    rows = torch.arange(batch)
    for t in range(length - 1, 0, -1):
        h = state & (n_groups - 1)
        state = h * n_pred + back[t, rows, h].long()
        path[:, t - 1] = state
    return path


def encode(x: np.ndarray, trellis: BitshiftTrellis) -> tuple[bytes, bytes]:
    """x (length a multiple of T) -> (start states, packed k-bit stream)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    T = trellis.sequence_length
    if x.size % T:
        raise ValueError(f"{x.size} samples is not a multiple of sequence_length {T}")
    seqs = torch.from_numpy(x.copy()).view(-1, T)
    codebook = torch.from_numpy(trellis.codebook())
    per_seq = T * (1 << (trellis.state_bits - trellis.bits_per_sample))
    chunk = max(1, _BACKPOINTER_BUDGET // per_seq)
    # One thread: each Viterbi step is a handful of kernels over ~10^5 floats, too small for
    # a fork/join per kernel to pay; on 2 shared cores 2 threads measured 30x slower (175 s
    # against 5.9 s for 16k samples at L=16, k=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = torch.cat([viterbi(part, trellis, codebook) for part in seqs.split(chunk)])
    finally:
        torch.set_num_threads(threads)
    starts = paths[:, 0].numpy().astype(f"<u{trellis.init_bytes}")
    new_bits = (paths[:, 1:] >> (trellis.state_bits - trellis.bits_per_sample)).numpy()
    return starts.tobytes(), pack_bits(
        new_bits.astype(np.uint8).reshape(-1), trellis.bits_per_sample
    )


def decode(starts: bytes, stream: bytes, trellis: BitshiftTrellis, samples: int) -> np.ndarray:
    """Exact inverse of the decoder side: replay the bit window, look up the codebook."""
    T, k = trellis.sequence_length, trellis.bits_per_sample
    n_seq = samples // T
    state = np.frombuffer(starts, dtype=f"<u{trellis.init_bytes}").astype(np.int64)
    if state.size != n_seq:
        raise ValueError(f"{state.size} start states for {n_seq} sequences")
    bits = unpack_bits(stream, k, n_seq * (T - 1)).astype(np.int64).reshape(n_seq, T - 1)
    codebook = trellis.codebook()
    shift = trellis.state_bits - k
    states = np.empty((n_seq, T), dtype=np.int64)
    states[:, 0] = state
    for t in range(1, T):
        state = (state >> k) | (bits[:, t - 1] << shift)
        states[:, t] = state
    return codebook[states].reshape(-1)
