"""Calibration plumbing shared by block-by-block compressors (GPTQ, QuIP, structured
pruning and merging): run the model up to its first block once per chunk of windows, keep
what that block receives, then feed blocks one at a time without re-running the embedding
(`run_block`), collecting the input Hessians of chosen linears on the way
(`accumulate_hessians`).

The block's activations ([windows, seq, hidden] floats: 151 MB for SmolLM2 with the
protocol's 128 windows of 512 tokens) live in memory by default, or in a file
(DiskActivations) when the run must hold no more than one chunk of windows at a time."""

from __future__ import annotations

import math
import os
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from annotated_types import Ge, Interval
from torch import nn

from framework.errors import SculptError

# The arguments every calibrated compressor takes alike (GPTQ, QuIP, the peer's GPTQ,
# rd_alloc, structured pruning, slicing), as types for their signatures (framework/schema.py
# checks the bounds).
#: Hessian damping, a fraction of its mean diagonal
Damp = Annotated[float, Interval(ge=0, lt=1)]
#: how many of the run's calibration windows to use (None: all)
CalibrationWindows = Annotated[int, Ge(1)] | None
#: calibration windows per forward chunk
BatchSize = Annotated[int, Ge(1)]

try:  # optional: halves the cost of the Hessians on CPU
    from scipy.linalg.blas import ssyrk as _ssyrk
except ImportError:  # pragma: no cover - scipy comes with the topology extras
    _ssyrk = None


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (everything needed was seen)."""


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class DiskActivations:
    """A [windows, ...] tensor kept in a file, read and written a slice of windows at a time.

    Only the slice being used is resident: the file goes through the page cache, which the
    kernel reclaims under pressure and which is not counted in the process's RSS. Indexing
    takes a slice of windows (step 1), like the in-memory tensor it stands in for; reads
    return a fresh tensor on `device`. The file is created empty (0600) and removed by
    close()."""

    def __init__(
        self, path: Path, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ):
        self.path, self.shape, self.dtype, self.device = Path(path), tuple(shape), dtype, device
        self._row_bytes = math.prod(self.shape[1:]) * torch.empty((), dtype=dtype).element_size()
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(self._fd, self._row_bytes * self.shape[0])

    def _span(self, rows: slice) -> tuple[int, int]:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("DiskActivations: only contiguous slices of windows")
        return start, max(stop - start, 0)

    def _bytes(self, t: torch.Tensor) -> memoryview:
        return memoryview(t.view(torch.uint8).numpy()).cast("B")

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, n = self._span(rows)
        out = torch.empty((n, *self.shape[1:]), dtype=self.dtype)
        view, offset, done = self._bytes(out.reshape(-1)), start * self._row_bytes, 0
        while done < len(view):  # a regular file may still return a short read
            got = os.preadv(self._require_open(), [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}")
            done += got
        return out.to(self.device)

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        start, n = self._span(rows)
        if tuple(value.shape) != (n, *self.shape[1:]):
            raise ValueError(f"DiskActivations: {tuple(value.shape)} into rows {start}:{start + n}")
        data = value.detach().to("cpu", self.dtype).contiguous().reshape(-1)
        view, offset, done = self._bytes(data), start * self._row_bytes, 0
        while done < len(view):
            done += os.pwrite(self._require_open(), view[done:], offset + done)

    def _require_open(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: activations file already closed")
        return self._fd

    def empty_like(self, path: Path) -> DiskActivations:
        return DiskActivations(path, self.shape, self.dtype, self.device)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)


Activations = torch.Tensor | DiskActivations


@dataclass
class BlockInputs:
    hidden: Activations  # [windows, seq, hidden], overwritten in place by each block's outputs
    calls: list[tuple[slice, tuple[Any, ...], dict[str, Any]]]  # per chunk: rows, args, kwargs


def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    offload_to: Path | None = None,
) -> BlockInputs:
    """Run the model up to its first block on each chunk of windows and keep what the
    block receives (hidden states, other positional args, keyword args). With `offload_to`
    (a file that must not exist yet) the hidden states go to a DiskActivations there."""
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            x, rest = args[0], tuple(args[1:])
        else:
            x, rest = kwargs.pop("hidden_states"), ()
        seen.update(x=x.detach(), args=rest, kwargs=kwargs)
        raise StopForward

    hidden: Activations | None = None
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
                shape = (windows.shape[0], *x.shape[1:])
                if offload_to is None:
                    hidden = torch.empty(shape, dtype=x.dtype, device=device)
                else:
                    hidden = DiskActivations(offload_to, shape, x.dtype, device)
            hidden[rows] = x
            calls.append((rows, seen["args"], seen["kwargs"]))
    finally:
        handle.remove()
    assert hidden is not None
    return BlockInputs(hidden=hidden, calls=calls)


def run_block(block: nn.Module, inputs: BlockInputs, write: bool) -> None:
    """Run every chunk through the block; with write, its outputs replace its inputs. A
    hook may end a chunk's pass early by raising StopForward."""
    for rows, args, kwargs in inputs.calls:
        try:
            out = first_output(block(inputs.hidden[rows], *args, **kwargs))
        except StopForward:
            continue
        if write:
            inputs.hidden[rows] = out


# Below this width MKL's full matmul beats OpenBLAS's ssyrk on this kind of machine.
_SYRK_MIN_FEATURES = 1024


def gram(flat: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """X^T X of [tokens, features] (float32 products, float64 result) -> (product,
    upper_only). Wide inputs on CPU go through BLAS ssyrk when scipy is there: half the flops
    of a matmul, but only the upper triangle is filled (symmetrize after summing)."""
    flat = flat.to(torch.float32)
    if flat.device.type == "cpu" and _ssyrk is not None and flat.shape[1] >= _SYRK_MIN_FEATURES:
        # A C-contiguous [n, d] array is the F-contiguous [d, n] one syrk wants: no copy.
        upper = _ssyrk(1.0, flat.contiguous().numpy().T, trans=0, lower=0)
        return torch.from_numpy(upper).to(torch.float64), True
    return (flat.T @ flat).to(torch.float64), False


def accumulate_hessians(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    inputs: BlockInputs,
    outputs: Activations | None = None,
) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / tokens for each layer, from one pass of the block over the inputs.
    Without `outputs` the pass stops as soon as every layer has seen its input; with it the
    block runs to the end and its outputs are written there (may be inputs.hidden itself:
    a chunk's outputs depend on that chunk's inputs only). Layers fed the same tensor
    (q/k/v) share one product per chunk. Products in float32 per chunk, summed in float64."""
    sums: dict[str, torch.Tensor] = {}
    upper_only: dict[str, bool] = {}
    tokens: dict[str, int] = dict.fromkeys(layers, 0)
    chunk_products: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}  # id(x) -> (x, ...)
    pending: set[str] = set()

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            cached = chunk_products.get(id(x))
            if cached is None or cached[0] is not x:
                cached = (x, *gram(x.detach().reshape(-1, x.shape[-1])))
                chunk_products[id(x)] = cached  # holding x keeps its id from being reused
            _, product, upper = cached
            if name in sums:
                sums[name] += product
            else:
                sums[name], upper_only[name] = product.clone(), upper
            tokens[name] += x.numel() // x.shape[-1]
            pending.discard(name)
            if not pending and outputs is None:
                raise StopForward

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        for rows, args, kwargs in inputs.calls:
            pending.update(layers)
            chunk_products.clear()
            with suppress(StopForward):
                out = first_output(block(inputs.hidden[rows], *args, **kwargs))
                chunk_products.clear()
                if outputs is not None:
                    outputs[rows] = out
            if pending:
                raise SculptError(
                    f"calibration: the block's forward never called {sorted(pending)}"
                )
    finally:
        chunk_products.clear()
        for handle in handles:
            handle.remove()
    hessians = {}
    for name in layers:
        h = sums.pop(name)
        if upper_only[name]:
            h = h.triu() + h.triu(1).T
        hessians[name] = h * (2.0 / tokens[name])
    return hessians


def damped_cholesky(
    h: torch.Tensor, damp: float, floor: float, attempts: int, what: str
) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of H + d mean(diag H) I and the d used: d = damp, grown tenfold
    (from at least `floor`) until the factorisation succeeds, because dead or exactly
    duplicated inputs make a calibration Hessian singular. The damping goes into a copy's
    diagonal, not through an identity matrix: at 1536 columns in float64 each n x n
    temporary is 19 MB, and for GPTQ that is the memory peak per layer."""
    mean_diag = max(float(h.diagonal().mean()), 1e-30)
    d = damp
    for _ in range(attempts):
        damped = h.clone()
        damped.diagonal().add_(d * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return chol, d
        d = max(d * 10.0, floor)
    raise SculptError(f"{what}: the Hessian is not positive definite even with damp={d:g}")


def inverse_cholesky_upper(
    h: torch.Tensor, damp: float, what: str = "gptq"
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + d mean(diag H) I)^-1 (so H^-1 = U^T U) and the d
    used, growing d as damped_cholesky does until both factorisations succeed: what GPTQ
    and QuIP's LDLQ propagate their rounding errors with."""
    d = damp
    for _ in range(12):
        chol, d = damped_cholesky(h, d, floor=1e-6, attempts=12, what=what)
        hinv = torch.cholesky_inverse(chol)
        del chol
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if int(info) == 0:
            return upper, d
        d = max(d * 10.0, 1e-6)
    raise SculptError(f"{what}: the inverse Hessian is not positive definite even with damp={d:g}")
