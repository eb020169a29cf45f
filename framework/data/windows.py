"""Token windows exactly as PROTOCOL.md fixes them."""

from __future__ import annotations

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
    """

    source: Callable[[], str] | str
    windows: int
    seq_len: int
    sampling: str = "sequential"
    seed: int = 0


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long)
    del ids
    # Tokenizing a whole corpus leaves ~100 MB of freed buffers resident otherwise.
    release_freed_memory()
    return out


def make_windows(ids: torch.Tensor, spec: WindowSpec, key: str) -> torch.Tensor:
    if spec.sampling not in SAMPLINGS:
        raise SculptError(f"{key}.sampling: '{spec.sampling}' is not one of {SAMPLINGS}")
    if spec.windows < 1 or spec.seq_len < 2:
        raise SculptError(f"{key}: windows must be >= 1 and seq_len >= 2")
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
