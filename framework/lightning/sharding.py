"""Weight-changing stages on sharded models. A compressor or editor expects ordinary
full tensors; under ZeRO-3 or FSDP2 each rank holds a slice. `edit_sharded` gathers the
full weights, lets the stage edit them on rank 0, and writes the result back into every
rank's shards, so the model stays sharded before and after.

Stages whose `sharding_safe` flag is set can work on shards directly and need none of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def sharding_kind(model: nn.Module) -> str:
    """`zero3`, `fsdp2` or `none`, from the parameters themselves."""
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            return "zero3"
        if hasattr(p, "to_local"):
            return "fsdp2"
    return "none"


def edit_sharded(
    model: nn.Module,
    edit: Callable[[nn.Module], T],
    replica: Callable[[], nn.Module] | None = None,
) -> T | None:
    """Run `edit(full_model)` on rank 0 and propagate its in-place weight changes to all
    ranks. Every rank must call this (the gathers are collective); the return value of
    `edit` comes back on rank 0, None elsewhere.

    ZeRO-3: DeepSpeed's GatheredParameters with modifier_rank=0, which re-partitions rank
    0's values on exit. FSDP2: a full state dict is gathered to rank 0, loaded into an
    unsharded `replica()` (same architecture), edited there, and broadcast back with
    set_model_state_dict(full_state_dict, broadcast_from_rank0)."""
    kind = sharding_kind(model)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if kind == "none":
        return edit(model)
    if kind == "zero3":
        import deepspeed

        result = None
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    result = edit(model)
        return result

    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    if replica is None:
        raise ValueError("editing an FSDP2 model needs a replica() factory of its architecture")
    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    result = None
    if rank == 0:
        plain = replica()
        plain.load_state_dict(full)
        with torch.no_grad():
            result = edit(plain)
        full = plain.state_dict()
    set_model_state_dict(
        model,
        full if rank == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
    return result
