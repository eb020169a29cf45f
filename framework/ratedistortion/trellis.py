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

Rate, counted from the bytes that `encode` returns: exactly k bits per sample, nothing
else. Each sequence is tail-biting: the register holds the sequence's own final state
before its first sample, so the decoder first reads the last ceil(L/k) symbols to fill it,
and every sample, the first ones included, picks among 2^k successors of a full state
(a register started at 0 instead left the first ~L/k samples with few codewords: 0.003
bit worse at T=4096 on N(0,1), k=2). The encoder approximates the best tail-biting path
the way QTIP does (its Algorithm 4, in spirit): a free Viterbi run over a short window
that wraps the sequence's end onto its start picks the junction state J, and the full run
is then constrained to start after J and end in J.
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
_UNREACHABLE = 1e30
# Samples on each side of a sequence's junction (end -> start) in the run that picks it.
_JUNCTION_HALF_WINDOW = 128


@dataclass(frozen=True)
class BitshiftTrellis:
    """An L-bit-state bitshift trellis at k bits per sample, over sequences of T samples.

    state_bits: L (memory and Viterbi work grow as 2^L; QTIP uses L=16).
    bits_per_sample: k, the rate.
    sequence_length: T (>= ceil(L/k)); each sequence is tail-biting.
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
        min_length = max(2, math.ceil(self.state_bits / self.bits_per_sample))
        if self.sequence_length < min_length:
            # Tail-biting: the last ceil(L/k) samples' bits must fill the register.
            raise ConfigError(
                "sequence_length", f"{self.sequence_length} must be >= {min_length} (ceil(L/k))"
            )
        if self.scale is not None and not self.scale > 0:
            raise ConfigError("scale", f"{self.scale} must be > 0")

    @property
    def states(self) -> int:
        return 1 << self.state_bits

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
        return (samples * self.bits_per_sample + 7) // 8


def viterbi(
    x: torch.Tensor,
    trellis: BitshiftTrellis,
    codebook: torch.Tensor,
    previous: torch.Tensor | None = None,
    final: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best state path [B, T] (int64) for sequences x [B, T] under squared error.

    previous: [B] register contents before the first sample (None: any first state).
    final: [B] the state the path must end in (None: the best one)."""
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
    cost = (x[:, :1] - codebook[None, :]) ** 2
    if previous is not None:
        # Only the 2^k successors of `previous` can be the first state; the others start
        # at a cost no path can reach (finite: the integer tagging needs ordinary floats).
        reachable = (torch.arange(1 << L) & (n_groups - 1))[None, :] == (previous >> k)[:, None]
        cost = torch.where(reachable, cost, torch.full_like(cost, _UNREACHABLE))
    back = torch.empty(length, batch, n_groups, dtype=torch.uint8)
    new = torch.empty(batch, n_pred, n_groups)
    for t in range(1, length):
        bits = cost.view(torch.int32)
        bits.bitwise_and_(keep).bitwise_or_(tag)
        pred = bits.view(batch, n_groups, n_pred)
        # Two predecessors: an elementwise minimum is ~2x faster than amin over a size-2 axis.
        best = torch.minimum(pred[..., 0], pred[..., 1]) if n_pred == 2 else pred.amin(dim=2)
        back[t] = (best & low).to(torch.uint8)
        torch.sub(x[:, t, None, None], grouped_cb[None], out=new)
        new.square_().add_(best.view(torch.float32)[:, None, :])
        cost, new = new.view(batch, -1), cost.view(batch, n_pred, n_groups)
    path = torch.empty(batch, length, dtype=torch.int64)
    state = cost.argmin(dim=1) if final is None else final.clone()
    path[:, -1] = state
    rows = torch.arange(batch)
    for t in range(length - 1, 0, -1):
        h = state & (n_groups - 1)
        state = h * n_pred + back[t, rows, h].long()
        path[:, t - 1] = state
    return path


def encode(x: np.ndarray, trellis: BitshiftTrellis) -> bytes:
    """x (length a multiple of T) -> the packed k-bit stream."""
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
        paths = torch.cat([_tail_biting(part, trellis, codebook) for part in seqs.split(chunk)])
    finally:
        torch.set_num_threads(threads)
    new_bits = (paths >> (trellis.state_bits - trellis.bits_per_sample)).numpy()
    return pack_bits(new_bits.astype(np.uint8).reshape(-1), trellis.bits_per_sample)


def _tail_biting(x: torch.Tensor, trellis: BitshiftTrellis, codebook: torch.Tensor) -> torch.Tensor:
    """A path whose final state is also the register before the first sample."""
    length = x.shape[1]
    half = min(length // 2, _JUNCTION_HALF_WINDOW)
    # Free run over [end of the sequence | its start]: the state after the last sample, J,
    # is chosen with both of its neighbourhoods in view.
    wrapped = torch.cat([x[:, length - half :], x[:, :half]], dim=1)
    junction = viterbi(wrapped, trellis, codebook)[:, half - 1]
    return viterbi(x, trellis, codebook, previous=junction, final=junction)


def decode(stream: bytes, trellis: BitshiftTrellis, samples: int) -> np.ndarray:
    """The decoder: fill the register from each sequence's last symbols (tail-biting),
    replay the bits, look up the codebook. Raises ValueError when the stream does not hold
    `samples` samples."""
    T, k = trellis.sequence_length, trellis.bits_per_sample
    if samples % T:
        raise ValueError(f"{samples} samples is not a multiple of sequence_length {T}")
    n_seq = samples // T
    bits = unpack_bits(stream, k, samples).astype(np.int64).reshape(n_seq, T)
    shift = trellis.state_bits - k
    states = np.empty((n_seq, T), dtype=np.int64)
    state = np.zeros(n_seq, dtype=np.int64)
    for t in range(T - math.ceil(trellis.state_bits / k), T):
        state = (state >> k) | (bits[:, t] << shift)
    for t in range(T):
        state = (state >> k) | (bits[:, t] << shift)
        states[:, t] = state
    return trellis.codebook()[states].reshape(-1)
