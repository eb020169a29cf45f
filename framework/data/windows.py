"""Token windows exactly as PROTOCOL.md fixes them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from framework.errors import SculptError
from framework.heap import release_freed_memory

SAMPLINGS = ("random", "sequential")


@dataclass
class WindowSpec:
    """How to cut one text source into token windows.

    random: `windows` start offsets from torch.Generator().manual_seed(seed) and
    randint(0, N - seq_len + 1) (PROTOCOL.md's calibration). sequential: the first
    `windows` non-overlapping windows (PROTOCOL.md's evaluation).

    skip_tokens: cut the windows from the text after its first `skip_tokens` tokens (N
    counts what is left). A train/test split by position: training windows drawn from a
    text past the span another side evaluates share no token with it.
    """

    source: Callable[[], str] | str
    windows: int
    seq_len: int
    sampling: str = "sequential"
    seed: int = 0
    skip_tokens: int = 0


# Fast tokenizers hold ~500 bytes per token while they encode (offsets, token strings,
# alignments): 2 MB of Shakespeare took 276 MiB on top of a loaded SmolLM2. Pieces of
# about this many characters keep that transient to a few tens of MiB.
PIECE_CHARS = 1 << 18
# The span on each side of a cut that is encoded both whole and cut to check the cut.
_CUT_CHECK_CHARS = 512


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _clean_cut(tokenizer: Any, text: str, at: int) -> bool:
    """Whether cutting the text at `at` leaves the tokens around the cut as they are: the
    span of _CUT_CHECK_CHARS on each side encodes to the same ids whole and in two parts.
    Pre-tokenizers decide locally, so a cut at a line break after a word passes for the
    byte-level BPE tokenizers of Llama-family models; one that prefixes every text (a
    SentencePiece word marker) or splits differently across the cut fails, and the cut is
    not made."""
    left = text[max(at - _CUT_CHECK_CHARS, 0) : at]
    right = text[at : at + _CUT_CHECK_CHARS]
    return _encode(tokenizer, left + right) == _encode(tokenizer, left) + _encode(tokenizer, right)


def _cuts(tokenizer: Any, text: str) -> list[int]:
    """Cut positions about PIECE_CHARS apart, each before a line break that follows a
    non-space character and checked by _clean_cut; none where no such break passes."""
    cuts: list[int] = []
    start = 0
    while len(text) - start > 2 * PIECE_CHARS:
        at = text.find("\n", start + PIECE_CHARS)
        tries = 0
        while at != -1 and tries < 32 and at - start < 2 * PIECE_CHARS:
            if not text[at - 1].isspace() and _clean_cut(tokenizer, text, at):
                break
            at = text.find("\n", at + 1)
            tries += 1
        else:
            break  # no clean cut near here: leave the rest whole
        cuts.append(at)
        start = at
    return cuts


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The text's token ids (no special tokens), as one encoding of the whole text would
    give them, encoded in pieces (see PIECE_CHARS; tests compare both on the packaged
    texts)."""
    bounds = [0, *_cuts(tokenizer, text), len(text)]
    pieces = []
    for a, b in itertools.pairwise(bounds):
        ids = _encode(tokenizer, text[a:b])
        pieces.append(torch.tensor(ids, dtype=torch.long))
        del ids
        # Each piece's freed buffers would otherwise stay resident (glibc keeps them).
        release_freed_memory()
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def make_windows(ids: torch.Tensor, spec: WindowSpec, key: str) -> torch.Tensor:
    if spec.sampling not in SAMPLINGS:
        raise SculptError(f"{key}.sampling: '{spec.sampling}' is not one of {SAMPLINGS}")
    if spec.windows < 1 or spec.seq_len < 2:
        raise SculptError(f"{key}: windows must be >= 1 and seq_len >= 2")
    if spec.skip_tokens < 0:
        raise SculptError(f"{key}.skip_tokens: {spec.skip_tokens} is negative")
    if spec.skip_tokens >= ids.numel():
        raise SculptError(
            f"{key}.skip_tokens: {spec.skip_tokens:,} skips the whole text ({ids.numel():,} tokens)"
        )
    ids = ids[spec.skip_tokens :]
    n = ids.numel()
    if spec.sampling == "sequential":
        need = spec.windows * spec.seq_len
        if n < need:
            raise SculptError(
                f"{key}: the text has {n:,} tokens, {spec.windows} windows x {spec.seq_len} "
                f"need {need:,}"
            )
        return ids[:need].view(spec.windows, spec.seq_len).clone()
    if n < spec.seq_len:
        raise SculptError(f"{key}: the text has {n:,} tokens, fewer than seq_len={spec.seq_len}")
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, n - spec.seq_len + 1, (spec.windows,), generator=gen)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])


def build_windows(
    tokenizer: Any, spec: WindowSpec, key: str, max_positions: int | None
) -> torch.Tensor:
    if max_positions is not None and spec.seq_len > max_positions:
        raise SculptError(
            f"{key}.seq_len: {spec.seq_len} exceeds the model's maximum of {max_positions} "
            "positions (max_position_embeddings)"
        )
    text = spec.source() if callable(spec.source) else spec.source
    ids = tokenize(tokenizer, text)
    return make_windows(ids, spec, key)
