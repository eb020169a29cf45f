"""Calibration plumbing shared by block-by-block compressors (GPTQ, structured pruning):
run the model up to its first block once per chunk of windows, keep what that block
receives, then feed blocks one at a time without re-running the embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from framework.errors import SculptError


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (everything needed was seen)."""


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [windows, seq, hidden], overwritten in place by each block's outputs
    calls: list[tuple[slice, tuple[Any, ...], dict[str, Any]]]  # per chunk: rows, args, kwargs


def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> BlockInputs:
    """Run the model up to its first block on each chunk of windows and keep what the
    block receives (hidden states, other positional args, keyword args)."""
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            x, rest = args[0], tuple(args[1:])
        else:
            x, rest = kwargs.pop("hidden_states"), ()
        seen.update(x=x.detach(), args=rest, kwargs=kwargs)
        raise StopForward

    hidden: torch.Tensor | None = None
    calls: list[tuple[slice, tuple[Any, ...], dict[str, Any]]] = []
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            rows = slice(start, min(start + batch_size, windows.shape[0]))
            try:
                model(input_ids=windows[rows].to(device), use_cache=False)
            except StopForward:
                pass
            else:
                raise SculptError("model: the forward pass never reached its first block")
            x = seen["x"]
            if hidden is None:
                hidden = torch.empty((windows.shape[0], *x.shape[1:]), dtype=x.dtype, device=device)
            hidden[rows] = x
            calls.append((rows, seen["args"], seen["kwargs"]))
    finally:
        handle.remove()
    assert hidden is not None
    return BlockInputs(hidden=hidden, calls=calls)
