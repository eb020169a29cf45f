"""Sequential, Hessian-calibrated quantization through the blocks: the driver GPTQ
(plugins.compressors.gptq) and QuIP (plugins.compressors.quip) share. The inputs of the
first block are captured once; then each block accumulates the Hessians of its linears on
its current inputs, a caller-supplied step quantizes each linear from its Hessian, and the
block is run again with the new weights, so every block sees the errors made upstream
(`quantized_inputs=False`: the original model's activations instead). The per-layer step
is the plugin's; everything around it (activation and weight offload, the groups of
linears that share an input, per-role error summaries) is here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.calibration import (
    Activations,
    BlockInputs,
    DiskActivations,
    accumulate_hessians,
    capture_block_inputs,
    run_block,
)
from framework.errors import ConfigError
from framework.heap import move_to_file, page_out, release_freed_memory
from framework.models import block_linears, blocks
from framework.models.arch import ArchMap
from framework.plugins import Context


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads. A column-by-column quantizer's loop is thousands of tiny
    ops: split over threads they mostly wait at barriers (badly so on a loaded machine), so
    GPTQ and QuIP run it on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def relative_output_errors(
    w: torch.Tensor, hessian: torch.Tensor, *w_hats: torch.Tensor
) -> list[float]:
    """tr(E H E^T) / tr(W H W^T), E = W - W_hat, for each W_hat: the relative squared output
    error of the layer on its calibration inputs (H = 2 X^T X / tokens, undamped)."""
    h = hessian.to(torch.float32)
    w32 = w.to(h.device, torch.float32)
    stacked = torch.stack([w32, *(w32 - wh.to(h.device, torch.float32) for wh in w_hats)])
    quad = ((stacked @ h) * stacked).sum(dim=(1, 2)).double()
    den = float(quad[0])
    return [float(q) / den if den > 0 else 0.0 for q in quad[1:]]


def sequential_groups(arch: ArchMap, true_sequential: bool) -> list[tuple[str, ...]]:
    """The linears of a block grouped by shared input, in forward order (from the arch
    map); without true_sequential, one group holding them all."""
    groups = [(arch.q, arch.k, arch.v), (arch.o,), tuple(arch.mlp_in), (arch.mlp_out,)]
    return groups if true_sequential else [tuple(n for grp in groups for n in grp)]


QuantizeInto = Callable[[nn.Linear, torch.Tensor], tuple[Any, dict[str, Any]]]


@contextmanager
def _scratch_folder(ctx: Context, needed: bool) -> Iterator[Path | None]:
    """A temporary folder of the run's output for offloaded activations and weights (None
    when nothing is offloaded), removed on the way out whatever happened."""
    if not needed:
        yield None
        return
    Path(ctx.output_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".offload-", dir=ctx.output_dir) as tmp:
        yield Path(tmp)


def _weights_to_files(layers: dict[str, nn.Linear], folder: Path) -> None:
    """Move each layer's weight into a file of `folder` named after the layer
    (framework.heap.move_to_file unlinks it at once, so a later move reuses the name) and
    drop the pages it held."""
    for name, layer in layers.items():
        old = layer.weight.data
        layer.weight.data = move_to_file(old, folder / f"{name}.bin")
        page_out(old)  # a model mapped from its safetensors file keeps those pages otherwise
        del old
    release_freed_memory()


@torch.no_grad()
def quantize_sequentially(
    model: nn.Module,
    ctx: Context,
    windows: torch.Tensor,
    quantize_into: QuantizeInto,
    batch_size: int,
    true_sequential: bool,
    quantized_inputs: bool,
    description: str,
    offload_activations: bool = False,
    offload_weights: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sequential calibration (see the module docstring), with the per-layer step left
    to the caller: quantize_into(layer, hessian) writes the decoded weights into the layer
    and returns (container entry, stats row). With offload_activations
    the block activations live in files under a temporary folder of the run's output (removed
    at the end, also on failure). With offload_weights the block linears' weights live in
    files too (framework.heap.move_to_file: mapped, read in when a block runs), all of them
    from the start and each block's again once it is done, so the resident set holds the
    embedding and about one block instead of the whole model; the model that comes back
    reads its weights from those (unlinked) files. -> (entries by parameter name, one stats
    row per layer with its name and role added)."""
    device = next(model.parameters()).device
    if offload_weights and device.type != "cpu":
        raise ConfigError(
            "offload_weights", f"keeps weights in files for a model on the CPU, not {device}"
        )
    with _scratch_folder(ctx, offload_activations or offload_weights) as offload_dir:
        arch = ctx.arch
        linears = block_linears(model, arch)
        names = {id(layer): name for name, layer in linears.items()}
        block_list = blocks(model, arch)
        if offload_weights:
            assert offload_dir is not None
            _weights_to_files(linears, offload_dir)
        was_training = model.training
        model.eval()
        encoded: dict[str, Any] = {}
        rows_out: list[dict[str, Any]] = []
        files = (
            (offload_dir / f"block{i}.bin" for i in range(len(block_list) + 1))
            if offload_dir and offload_activations
            else None
        )
        inputs: BlockInputs | None = None
        try:
            inputs = capture_block_inputs(
                model, block_list[0], windows, batch_size, device, next(files) if files else None
            )
            groups = sequential_groups(arch, true_sequential)
            for block in ctx.track(list(block_list), description=description):
                outputs: Activations | None = None
                if not quantized_inputs:
                    # The block's outputs before any of its weights change are the next
                    # block's inputs: taken from the first Hessian pass (in place when it is
                    # the only pass over these inputs).
                    if len(groups) == 1:
                        outputs = inputs.hidden
                    elif isinstance(inputs.hidden, DiskActivations):
                        assert files is not None
                        outputs = inputs.hidden.empty_like(next(files))
                    else:
                        outputs = torch.empty_like(inputs.hidden)
                for i, group in enumerate(groups):
                    layers = {rel: block.get_submodule(rel) for rel in group}
                    hessians = accumulate_hessians(
                        block, layers, inputs, outputs=outputs if i == 0 else None
                    )
                    for rel, layer in layers.items():
                        name = names[id(layer)]
                        encoded[f"{name}.weight"], row = quantize_into(layer, hessians.pop(rel))
                        rows_out.append({"layer": name, "role": rel, **row})
                # A block's passes free their activations; keep the high-water mark at one
                # block's worth rather than letting the heap hold every block's peak.
                release_freed_memory()
                if outputs is None:
                    run_block(block, inputs, write=True)
                elif outputs is not inputs.hidden:
                    if isinstance(inputs.hidden, DiskActivations):
                        inputs.hidden.close()
                    inputs.hidden = outputs
                if offload_weights:
                    assert offload_dir is not None
                    done = {names[id(m)]: m for m in block.modules() if id(m) in names}
                    _weights_to_files(done, offload_dir)
        finally:
            if inputs is not None and isinstance(inputs.hidden, DiskActivations):
                inputs.hidden.close()
            model.train(was_training)
        return encoded, rows_out


def errors_by_role(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean per-layer errors for each linear role (q, k, v, o, up, gate, down)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["role"], []).append(r)
    out = []
    for role, rs in by.items():
        k = len(rs)
        out.append(
            {
                "role": role,
                "layers": k,
                "weight_rel_mse": sum(r["weight_rel_mse"] for r in rs) / k,
                "output_rel_err": sum(r["output_rel_err"] for r in rs) / k,
                "rtn_output_rel_err": sum(r["rtn_output_rel_err"] for r in rs) / k,
            }
        )
    return out
