"""Point clouds from a model's residual stream: which tokens to take, the hidden states of
chosen blocks at those tokens (forward hooks, one pass), and the per-block diagrams and
intrinsic dimension of those clouds."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from framework.topology.intrinsic import twonn_dimension
from framework.topology.persistence import executor, pairwise_distances, rips_diagrams


class _Done(Exception):
    """Raised by the last hook needed: the rest of the forward (later blocks, head) is skipped."""


def sample_tokens(
    n_windows: int, seq_len: int, points: int, generator: torch.Generator, skip_first: int = 1
) -> torch.Tensor:
    """Sorted flat indices into the [n_windows, seq_len - skip_first] grid of token positions.

    The first position of every window is left out by default: it has no context and acts as
    an attention sink whose residual stream norm is orders of magnitude above the rest
    (x130 in SmolLM2's middle blocks), so it would sit alone far from the cloud.
    """
    available = n_windows * (seq_len - skip_first)
    if available < 1:
        raise ValueError(
            f"windows: {n_windows} x {seq_len} leave no token after skipping {skip_first}"
        )
    take = min(points, available)
    return torch.randperm(available, generator=generator)[:take].sort().values


def block_outputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    windows: torch.Tensor,
    index: torch.Tensor,
    skip_first: int = 1,
) -> dict[int, torch.Tensor]:
    """Output hidden state (the residual stream after the block) of each block in `blocks`
    at the token positions `index` (from `sample_tokens`), as float64 CPU tensors [n, dim].

    Hooks on the blocks, not `output_hidden_states`: in transformers 5 the last entry of
    hidden_states has the final norm applied, so it is not the last block's residual stream.
    """
    captured: dict[int, torch.Tensor] = {}
    wanted = set(range(len(blocks)))

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, output: object) -> None:
            h = output[0] if isinstance(output, tuple | list) else output
            assert isinstance(h, torch.Tensor)
            flat = h[:, skip_first:, :].reshape(-1, h.shape[-1])
            captured[i] = flat[index.to(flat.device)].detach().to("cpu", torch.float64)
            if captured.keys() >= wanted:
                raise _Done

        return fn

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=windows.to(device))
    except _Done:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = sorted(wanted - captured.keys())
    if missing:
        raise RuntimeError(f"blocks {missing} did not run in the forward pass")
    return captured


def normalize_cloud(x: np.ndarray) -> np.ndarray:
    """Divide a cloud by its median point norm: filtration values become comparable across
    layers (the residual stream's norm grows ~25x over SmolLM2's depth) while the cloud's
    shape is kept. The median, not the mean, so a few massive-activation tokens do not set
    the scale."""
    scale = float(np.median(np.linalg.norm(x, axis=1)))
    return x / scale if scale > 0 else x


@dataclass
class ResidualTopology:
    """Diagrams and TwoNN dimension of each named block's cloud, plus wall-clock seconds of
    the phases (forward, distances, waiting for diagrams, the concurrent callable)."""

    diagrams: dict[str, list[np.ndarray]]
    twonn: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    concurrent_result: Any = None


def residual_topology(
    model: nn.Module,
    named_blocks: Mapping[str, nn.Module],
    windows: torch.Tensor,
    index: torch.Tensor,
    *,
    max_dim: int = 1,
    metric: str = "euclidean",
    normalize: bool = True,
    workers: int = 2,
    track: Callable[..., Any] | None = None,
    concurrently: Callable[[], Any] | None = None,
) -> ResidualTopology:
    """The whole pipeline for one model: one forward, then per block the cloud at `index`
    (divided by its median norm when metric is euclidean and `normalize`), its distance
    matrix, TwoNN dimension and Rips diagrams (in `workers` processes).

    `concurrently` runs in this process while the workers compute diagrams (the analyzer
    computes neural persistence there); its return value is kept in `concurrent_result`.
    A before/after comparison calls this twice with the same `index` and settings.
    """
    track = track or (lambda it, *a, **k: it)
    names = list(named_blocks)
    t0 = time.perf_counter()
    states = block_outputs(model, [named_blocks[n] for n in names], windows, index)
    t1 = time.perf_counter()
    twonn: dict[str, float] = {}
    pool = executor(workers)
    try:
        futures = {}
        for k, name in enumerate(track(names, "topology: distances")):
            x = states[k].numpy()
            if normalize and metric == "euclidean":
                x = normalize_cloud(x)
            dist = pairwise_distances(x, metric)
            twonn[name] = twonn_dimension(distances=dist)
            futures[name] = pool.submit(rips_diagrams, dist, max_dim)
        t2 = time.perf_counter()
        extra = concurrently() if concurrently is not None else None
        t3 = time.perf_counter()
        dgms = {name: futures[name].result() for name in track(names, "topology: diagrams")}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    t4 = time.perf_counter()
    seconds = {
        "forward": t1 - t0,
        "distances": t2 - t1,
        "concurrent": t3 - t2,
        "diagrams_wait": t4 - t3,
    }
    return ResidualTopology(diagrams=dgms, twonn=twonn, seconds=seconds, concurrent_result=extra)
