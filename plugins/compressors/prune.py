"""Structured pruning of MLP neurons or attention heads: magnitude, Wanda,
topology-guided allocation, or merging into the units that stay.

``unit: neurons`` (the default): one MLP neuron (intermediate channel) j of a block = row j
of every MLP input projection (gate and up for Llama, fc1 for OPT) and column j of the
output projection (down_proj). ``sparsity`` is the fraction of all MLP neurons of the model
that are removed; the number removed is exactly round(sparsity * total) and the per-block
counts add up to it.

How a neuron is removed: its rows (and biases) in the input projections and its column in
the output projection are set to zero. A plain Llama config has one ``intermediate_size``
for every layer, so physically narrower matrices per block would not reload with
``from_pretrained``; zeroing keeps the model a stock HF model, and it is exactly a removal
(the neuron's activation is act(0) * 0 = 0 and its output column is 0, so deleting those
rows and columns gives bit-identical outputs). The saving is reported by exact accounting
(``params_removed``: the zeroed rows, columns and biases) and the pruned indices are written
to ``<stage>/pruned_neurons.json`` (and the container's meta) so a later export can shrink
the matrices. The container stores the changed MLP projections raw (zero-filled), so it
decodes to the model exactly; its 32 bits/weight do not show the saving, params_removed does.

``unit: heads``: one query head h of a block = rows h*d..(h+1)*d-1 of q_proj (and its bias,
if any) and the same columns of o_proj (d = head_dim). ``sparsity`` is the fraction of all
query heads of the model removed (exact count as for neurons). Zeroing the o_proj columns
is what removes the head exactly: its output (the o_proj input slice) is then read by
nothing. Zeroing the q rows alone would not (the head's scores become 0, its attention
uniform, its output the mean of the values), but with the o columns zero it changes
nothing and is what an export would delete. With grouped-query attention (SmolLM2: 9 query
heads, 3 key/value heads) k_proj and v_proj are shared by several query heads and stay;
params_removed counts the q rows and o columns only. Pruned heads go to
``<stage>/pruned_heads.json``. Everything below reads "head" for "neuron", with a head's
activation a_h = its output (its slice of o_proj's input) and its output weights
W_o[:, h's columns] (Frobenius norms).

Scores (higher = keep):

* ``magnitude``: the L2 norm of all the neuron's weights (gate row, up row, down column).
* ``wanda`` (structured variant of Sun et al., 2023): ||W_down[:, j]||_2 * ||a_j||_2, with
  a_j neuron j's activation (the down projection's input) over the calibration tokens,
  collected by a pre-hook on the output projection during chunked forwards (one [width]
  sum of squares per block in memory).

Both prune every block at the same rate (the remainder of the exact total is spread over
the blocks by largest fractional part).

``topology``: Wanda's ranking inside each block, with a non-uniform per-block budget chosen
by how much pruning each block moves the residual stream's persistence diagrams and the
output distribution. Per-neuron diagram evaluation (30 blocks x 1536 neurons on SmolLM2)
is out of reach, so the diagrams are used per block:

1. Probe clouds: ``probe_windows`` calibration windows cut to ``probe_seq_len`` tokens;
   ``points`` token positions among them (framework.topology.sample_tokens, first position
   skipped as in eval.topology). The unpruned model's input to every block, its residual
   clouds at the observed blocks (every ``observe_stride``-th block and the last) and its
   log-probabilities are computed once.
2. For each block b: mask (not edit) its ``probe_sparsity`` lowest-Wanda neurons, run
   blocks b..L-1 from the cached input of block b, and measure
   (a) the diagram displacement: the mean over observed blocks of the sliced Wasserstein
   distance between the unpruned and probed diagrams, H0 + H1 (blocks before b are
   unchanged and count as 0), each cloud scaled by its median norm as in eval.topology;
   this estimates block b's share of the evaluation's ``topo_distance_mean``;
   (b) the output error: mean KL(unpruned || probed) per token of the next-token
   distribution (models without an LM head: relative squared error of the last block's
   output).
3. Sensitivity s_b = w * topo_b / mean(topo) + (1 - w) * err_b / mean(err), with
   w = ``topology_weight``. Per-block sparsity p_b = min(c * s_b^(-power),
   ``max_block_sparsity``) with c found by bisection so sum_b p_b * width_b equals the
   global total, then rounded to whole neurons (largest remainder) with the total exact.
4. Each block drops its p_b * width lowest-Wanda neurons.

Everything in steps 1-3 uses calibration data only, never the evaluation windows. The per
block probe table (sensitivities, allocated sparsity) is returned as the ``allocation``
table.

``merge``: the units are not only removed but merged into the ones that stay
(framework/transforms/merging.py): block by block, each block calibrated on the outputs of
the already merged blocks before it (as GPTQ), the output projection's input Hessian
H = A^T A is collected, and the block's share (same rate in every block) of units is
removed greedily by the Optimal Brain Surgeon step for a column group: the unit whose
removal adds the least output error goes first, and its output column(s) are folded into
the kept columns by least squares (a near-duplicate neuron's into its twin). Only the
output projection's kept columns change beyond the zeroing; the ``allocation`` table gives
each block's relative output error of that projection on the calibration tokens and the
mean best cosine between a removed unit's activation and a kept one's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
import torch
from annotated_types import Ge, Interval
from torch import nn

from framework import topology as topo
from framework.calibration import (
    BatchSize,
    CalibrationWindows,
    Damp,
    accumulate_hessians,
    capture_block_inputs,
    first_output,
    run_block,
)
from framework.codecs import write_container
from framework.codecs.raw import encode_raw
from framework.errors import ConfigError, SculptError
from framework.io import atomic_write_json
from framework.models import block_linears, blocks
from framework.models.arch import ArchMap
from framework.plugins import Compressor, Context, StageResult
from framework.transforms.merging import merge_units

log = logging.getLogger("sculpt")

MethodName = Literal["magnitude", "wanda", "topology", "merge"]
UnitName = Literal["neurons", "heads"]
UNITS: tuple[str, ...] = get_args(UnitName)


# ----------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """Where a block's prunable units live: unit j owns rows j*size..(j+1)*size-1 (and
    those bias entries) of every `ins` projection and the same columns of `out`, the
    projection that reads the unit. Neurons: size 1, ins = the MLP input projections,
    out = down_proj. Heads: size head_dim, ins = q_proj, out = o_proj."""

    name: str  # "neurons" | "heads": metric keys and pruned_<name>.json
    label: str  # for the log
    sparsity_key: str  # the metric holding the removed fraction
    ins: tuple[str, ...]
    out: str
    size: int

    def layers(self, block: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
        """(input projections, output projection) of a block."""
        ins = [block.get_submodule(n) for n in self.ins]
        out = block.get_submodule(self.out)
        if not all(isinstance(m, nn.Linear) for m in [*ins, out]):
            raise SculptError(f"prune: the {self.label} projections are not nn.Linear")
        return ins, out  # type: ignore[return-value]

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Unit indices -> the row / column indices they own."""
        return (idx[:, None] * self.size + torch.arange(self.size)).flatten()

    def per_unit(self, per_column: torch.Tensor) -> torch.Tensor:
        """Sum a per-column quantity over each unit's columns."""
        return per_column.reshape(-1, self.size).sum(dim=1)


def units_of(model: nn.Module, arch: ArchMap, unit: str) -> Units:
    """The Units of `unit` ("neurons" or "heads") for this model."""
    if unit == "neurons":
        return Units(unit, "MLP neurons", "mlp_sparsity", arch.mlp_in, arch.mlp_out, 1)
    if unit != "heads":
        raise SculptError(f"prune: unit '{unit}' is not one of {', '.join(UNITS)}")
    n_heads = int(getattr(model.config, arch.num_heads_attr))
    block = blocks(model, arch)[0]
    q, o = block.get_submodule(arch.q), block.get_submodule(arch.o)
    if o.in_features % n_heads or q.out_features != o.in_features:
        raise SculptError(
            f"prune: {arch.o} reads {o.in_features} features, {arch.q} writes "
            f"{q.out_features}: not {n_heads} equal heads"
        )
    return Units(
        unit, "attention heads", "head_sparsity", (arch.q,), arch.o, o.in_features // n_heads
    )


# ----------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------


def magnitude_scores(model: nn.Module, arch: ArchMap, unit: str = "neurons") -> list[torch.Tensor]:
    """Per block [units]: the L2 norm of each unit's weights (input rows + output columns)."""
    units = units_of(model, arch, unit)
    scores = []
    for block in blocks(model, arch):
        ins, out = units.layers(block)
        sq = out.weight.detach().float().pow(2).sum(dim=0)
        for layer in ins:
            sq = sq + layer.weight.detach().float().pow(2).sum(dim=1)
        scores.append(units.per_unit(sq).sqrt().cpu())
    return scores


@torch.no_grad()
def activation_norms(
    model: nn.Module, arch: ArchMap, windows: torch.Tensor, batch_size: int, unit: str = "neurons"
) -> list[torch.Tensor]:
    """Per block [units]: ||a_j||_2 over every calibration token, a_j = unit j's slice of
    the output projection's input (a neuron's activation, a head's output). Chunked
    forwards; only one running sum per block is kept."""
    units = units_of(model, arch, unit)
    layers = blocks(model, arch)
    sums: list[torch.Tensor | None] = [None] * len(layers)

    def hook(i: int):
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().float()
            sq = a.reshape(-1, a.shape[-1]).pow(2).sum(dim=0).double()
            current = sums[i]
            sums[i] = sq if current is None else current + sq

        return fn

    handles = [
        units.layers(block)[1].register_forward_pre_hook(hook(i)) for i, block in enumerate(layers)
    ]
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(s is None for s in sums):
        raise SculptError(f"prune: some block's {units.out} never ran during calibration")
    return [units.per_unit(s).sqrt().float().cpu() for s in sums if s is not None]


def wanda_scores(
    model: nn.Module, arch: ArchMap, act_norms: Sequence[torch.Tensor], unit: str = "neurons"
) -> list[torch.Tensor]:
    """Per block [units]: ||W_out[:, unit j's columns]||_F * ||a_j||."""
    units = units_of(model, arch, unit)
    out = []
    for block, norms in zip(blocks(model, arch), act_norms, strict=True):
        w = units.layers(block)[1].weight.detach().float()
        out.append(units.per_unit(w.pow(2).sum(dim=0)).sqrt().cpu() * norms)
    return out


# ----------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------


def round_exact(real: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers n_b <= caps_b close to `real` with sum exactly `total` (largest remainder)."""
    counts = [min(math.floor(r), c) for r, c in zip(real, caps, strict=True)]
    short = total - sum(counts)
    order = sorted(range(len(real)), key=lambda b: (-(real[b] - math.floor(real[b])), b))
    while short > 0:
        moved = False
        for b in order:
            if short == 0:
                break
            if counts[b] < caps[b]:
                counts[b] += 1
                short -= 1
                moved = True
        if not moved:
            raise ValueError(f"cannot place {total} pruned units under the caps {list(caps)}")
    return counts


def uniform_counts(widths: Sequence[int], total: int) -> list[int]:
    """Same rate in every block, exact total."""
    frac = total / sum(widths)
    return round_exact([frac * w for w in widths], total, list(widths))


def allocate(
    sensitivity: Sequence[float],
    widths: Sequence[int],
    total: int,
    power: float = 1.0,
    max_fraction: float = 0.9,
) -> list[int]:
    """Per-block pruned counts inversely proportional to sensitivity^power, each block's
    rate capped at max_fraction, summing exactly to `total`."""
    s = np.maximum(np.asarray(sensitivity, dtype=np.float64), 1e-12)
    w = np.asarray(widths, dtype=np.float64)
    caps = [math.floor(max_fraction * x) for x in widths]
    if total > sum(caps):
        raise ValueError(f"{total} units exceed the per-block cap {max_fraction}")
    inv = s ** (-power)

    def placed(c: float) -> float:
        return float((np.minimum(c * inv, max_fraction) * w).sum())

    lo, hi = 0.0, 1.0
    while placed(hi) < total and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if placed(mid) < total:
            lo = mid
        else:
            hi = mid
    real = np.minimum(hi * inv, max_fraction) * w
    # Scale the continuous solution onto the exact total before rounding.
    real = real * (total / real.sum()) if real.sum() > 0 else real
    return round_exact([min(float(r), c) for r, c in zip(real, caps, strict=True)], total, caps)


# ----------------------------------------------------------------------------------------
# Topology probe
# ----------------------------------------------------------------------------------------


def _mask_hook(mask: torch.Tensor):
    def fn(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * mask.to(args[0].dtype), *args[1:])

    return fn


@torch.no_grad()
def probe_sensitivity(
    model: nn.Module,
    arch: ArchMap,
    windows: torch.Tensor,
    wanda: Sequence[torch.Tensor],
    probe_sparsity: float,
    points: int,
    observe_stride: int,
    workers: int,
    seed: int,
    track: Any = None,
    unit: str = "neurons",
) -> list[dict[str, float]]:
    """Per block: diagram displacement (mean SW distance over observed blocks, H0 + H1 and
    each) and output error when its `probe_sparsity` lowest-Wanda units are masked (their
    slice of the output projection's input set to zero)."""
    track = track or (lambda it, *a, **k: it)
    units = units_of(model, arch, unit)
    layers = list(blocks(model, arch))
    n = len(layers)
    observed = sorted({*range(0, n, observe_stride), n - 1})
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, layers[0], windows, windows.shape[0], device)
    index = topo.sample_tokens(
        windows.shape[0], windows.shape[1], points, torch.Generator().manual_seed(seed)
    )
    head = model.get_submodule(arch.head) if arch.head else None
    norm = model.get_submodule(arch.final_norm) if arch.final_norm else None

    def cloud(h: torch.Tensor) -> np.ndarray:
        flat = h[:, 1:, :].reshape(-1, h.shape[-1])
        return flat[index.to(flat.device)].to("cpu", torch.float64).numpy()

    def run_from(start: int) -> tuple[dict[int, np.ndarray], torch.Tensor]:
        """Blocks start..n-1 from the cached input of `start` (one chunk per call):
        clouds at observed blocks >= start and the final output (log-probs or hidden)."""
        clouds: dict[int, np.ndarray] = {}
        h = block_in[start]
        for i in range(start, n):
            h = first_output(layers[i](h, *call_args, **call_kwargs))
            if i in observed:
                clouds[i] = cloud(h)
        if head is not None:
            x = norm(h) if norm is not None else h
            return clouds, torch.log_softmax(head(x).float(), dim=-1)
        return clouds, h.float()

    # The unpruned model's input to every block (one chunk: probe windows are few).
    (_, call_args, call_kwargs) = inputs.calls[0]
    block_in: list[torch.Tensor] = []
    h = inputs.hidden
    for layer in layers:
        block_in.append(h)
        h = first_output(layer(h, *call_args, **call_kwargs))
    del inputs
    ref_clouds, ref_out = run_from(0)

    pool = topo.executor(workers)
    try:

        def submit(c: np.ndarray):
            dist = topo.pairwise_distances(topo.normalize_cloud(c), "euclidean")
            return pool.submit(topo.rips_diagrams, dist, 1)

        ref_futures = {i: submit(c) for i, c in ref_clouds.items()}
        probes: list[tuple[dict[int, Any], float]] = []
        for b in track(range(n), "prune: topology probe", total=n):
            out_layer = units.layers(layers[b])[1]
            scores = wanda[b]
            k = round(probe_sparsity * scores.numel())
            mask = torch.ones_like(scores)
            mask[torch.argsort(scores, stable=True)[:k]] = 0.0
            mask = mask.repeat_interleave(units.size)
            handle = out_layer.register_forward_pre_hook(_mask_hook(mask.to(device)))
            try:
                clouds, out = run_from(b)
            finally:
                handle.remove()
            if head is not None:
                # KL(unpruned || probed) per token, the evaluation's KL direction.
                err = float((ref_out.exp() * (ref_out - out)).sum(-1).mean())
            else:
                err = float((out - ref_out).pow(2).sum() / ref_out.pow(2).sum().clamp_min(1e-30))
            probes.append(({i: submit(c) for i, c in clouds.items()}, err))
        ref_dgms = {i: f.result() for i, f in ref_futures.items()}
        rows = []
        for b, (futures, err) in enumerate(probes):
            d0 = d1 = 0.0
            for i, f in futures.items():
                got = f.result()
                d0 += topo.sliced_wasserstein(ref_dgms[i][0], got[0])
                d1 += topo.sliced_wasserstein(ref_dgms[i][1], got[1])
            m = len(observed)
            rows.append({"block": b, "topo_h0": d0 / m, "topo_h1": d1 / m, "output_error": err})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for r in rows:
        r["topo"] = r["topo_h0"] + r["topo_h1"]
    return rows


# ----------------------------------------------------------------------------------------
# The plugin
# ----------------------------------------------------------------------------------------


class StructuredPrune(Compressor):
    """Remove a fraction of the MLP neurons or attention heads (zeroed rows/columns, exact
    parameter count).

    Args:
        sparsity: fraction of all units (MLP neurons, or query heads) removed, in [0, 1).
        method: magnitude | wanda | topology | merge (see the module docstring).
        unit: neurons | heads: what is removed (see the module docstring).
        calibration_windows: calibration windows for the activation norms (null: all).
        batch_size: windows per calibration forward chunk.
        probe_sparsity: topology: rate at which each block is pruned to measure its
            sensitivity (null: `sparsity`).
        probe_windows: topology: calibration windows of the probe clouds.
        probe_seq_len: topology: tokens per probe window (cut from the calibration's).
        points: topology: tokens per probe cloud.
        observe_stride: topology: diagrams at every n-th block (and the last).
        topology_weight: topology: weight of the diagram displacement against the output
            error in a block's sensitivity, in [0, 1].
        power: topology: per-block rate proportional to sensitivity^-power.
        max_block_sparsity: topology: no block loses more than this fraction.
        workers: processes computing persistence diagrams.
        damp: merge: fraction of the mean Hessian diagonal added to its diagonal (as GPTQ).
        allocation: uniform | topology | null (the method's own: topology for topology,
            uniform otherwise): how many units each block loses. topology with merge
            merges by the topology probe's per-block counts.
        shrink: neurons at a uniform rate: delete the removed neurons' rows and
            columns instead of zeroing them and set the config's MLP width, so the saved
            model is a stock HF model with fewer parameters. Every block then loses
            round(sparsity x width) neurons (one width for all blocks is what the config
            can say).
    """

    needs_calibration = True

    def __init__(
        self,
        sparsity: Annotated[float, Interval(ge=0, lt=1)] = 0.25,
        method: MethodName = "wanda",
        unit: UnitName = "neurons",
        calibration_windows: CalibrationWindows = 16,
        batch_size: BatchSize = 4,
        probe_sparsity: Annotated[float, Interval(gt=0, lt=1)] | None = None,
        probe_windows: Annotated[int, Ge(1)] = 4,
        probe_seq_len: Annotated[int, Ge(2)] = 128,
        points: Annotated[int, Ge(8)] = 256,
        observe_stride: Annotated[int, Ge(1)] = 1,
        topology_weight: Annotated[float, Interval(ge=0, le=1)] = 0.5,
        power: Annotated[float, Ge(0)] = 1.0,
        max_block_sparsity: Annotated[float, Interval(ge=0, le=1)] = 0.75,
        workers: Annotated[int, Ge(1)] = 2,
        damp: Damp = 0.01,
        allocation: Literal["uniform", "topology"] | None = None,
        shrink: bool = False,
    ):
        self.sparsity = float(sparsity)
        self.method = method
        self.unit = unit
        self.calibration_windows = calibration_windows
        self.batch_size = batch_size
        self.probe_sparsity = None if probe_sparsity is None else float(probe_sparsity)
        self.probe_windows = probe_windows
        self.probe_seq_len = probe_seq_len
        self.points = points
        self.observe_stride = observe_stride
        self.topology_weight = float(topology_weight)
        if not math.isfinite(power):  # the bound (>= 0) is in the signature
            raise ConfigError("power", f"{power} must be finite")
        self.power = float(power)
        self.max_block_sparsity = float(max_block_sparsity)
        if self.max_block_sparsity < self.sparsity:
            raise ConfigError(
                "max_block_sparsity",
                f"{max_block_sparsity} is below sparsity {sparsity}: the total cannot be placed",
            )
        self.workers = workers
        self.damp = float(damp)
        if method == "topology" and allocation == "uniform":
            raise ConfigError("allocation", "uniform with method=topology is method=wanda")
        self.allocation = allocation or ("topology" if method == "topology" else "uniform")
        if type(shrink) is not bool:
            raise ConfigError("shrink", f"{shrink!r} must be true or false")
        if shrink and unit != "neurons":
            raise ConfigError(
                "shrink", "deletes MLP neurons only (heads are zeroed: GQA shares k and v)"
            )
        if shrink and self.allocation == "topology":
            raise ConfigError(
                "shrink", "needs one MLP width for every block; the topology allocation varies it"
            )
        self.shrink = shrink

    def _uniform(self, widths: Sequence[int]) -> list[int]:
        """The same rate in every block: an exact global total, or with shrink the same
        count round(sparsity x width) in every block (blocks share one width)."""
        if self.shrink:
            if len(set(widths)) != 1:
                raise ConfigError("shrink", f"the blocks' MLP widths differ: {sorted(set(widths))}")
            return [round(self.sparsity * widths[0])] * len(widths)
        return uniform_counts(widths, round(self.sparsity * sum(widths)))

    # The steps, public so tests and analyses can call them one by one.

    def scores(self, model: nn.Module, ctx: Context) -> list[torch.Tensor]:
        if self.method == "magnitude":
            return magnitude_scores(model, ctx.arch, self.unit)
        windows = ctx.calibration(self.calibration_windows)
        norms = activation_norms(model, ctx.arch, windows, self.batch_size, self.unit)
        return wanda_scores(model, ctx.arch, norms, self.unit)

    def counts(
        self, model: nn.Module, ctx: Context, scores: Sequence[torch.Tensor]
    ) -> tuple[list[int], list[dict[str, float]]]:
        """Pruned units per block and the allocation table."""
        widths = [s.numel() for s in scores]
        total = round(self.sparsity * sum(widths))
        if self.allocation != "topology" or total == 0:
            counts = self._uniform(widths)
            return counts, [
                {"block": b, "width": w, "pruned": c, "sparsity": c / w}
                for b, (w, c) in enumerate(zip(widths, counts, strict=True))
            ]
        calib = ctx.calibration()
        windows = calib[: self.probe_windows, : self.probe_seq_len]
        rows = probe_sensitivity(
            model,
            ctx.arch,
            windows,
            scores,
            self.probe_sparsity if self.probe_sparsity is not None else self.sparsity,
            self.points,
            self.observe_stride,
            self.workers,
            ctx.seed,
            ctx.track,
            self.unit,
        )
        t = np.array([r["topo"] for r in rows])
        e = np.array([r["output_error"] for r in rows])
        # Each term relative to its own mean, so the weight means what it says whatever
        # the units (SW distance vs nats).
        sens = self.topology_weight * t / max(t.mean(), 1e-30) + (
            1 - self.topology_weight
        ) * e / max(e.mean(), 1e-30)
        counts = allocate(sens, widths, total, self.power, self.max_block_sparsity)
        for r, s, c, w in zip(rows, sens, counts, widths, strict=True):
            r.update(sensitivity=float(s), width=w, pruned=c, sparsity=c / w)
        return counts, rows

    @torch.no_grad()
    def merge(
        self, model: nn.Module, ctx: Context
    ) -> tuple[list[int], list[dict[str, float]], dict[str, list[int]], int]:
        """method=merge, block by block (module docstring) -> (units removed per block, the
        allocation table, removed indices per block, parameters removed)."""
        arch = ctx.arch
        units = units_of(model, arch, self.unit)
        layers = list(blocks(model, arch))
        widths = [units.layers(b)[1].in_features // units.size for b in layers]
        probe: list[dict[str, float]] | None = None
        if self.allocation == "topology":  # probed on the model before any merging
            counts, probe = self.counts(model, ctx, self.scores(model, ctx))
        else:
            counts = self._uniform(widths)
        windows = ctx.calibration(self.calibration_windows)
        device = next(model.parameters()).device
        inputs = capture_block_inputs(model, layers[0], windows, self.batch_size, device)
        table: list[dict[str, float]] = []
        pruned: dict[str, list[int]] = {}
        removed_params = 0
        for b, block in enumerate(ctx.track(layers, description="merge blocks")):
            out = units.layers(block)[1]
            hessian = accumulate_hessians(block, {units.out: out}, inputs)[units.out]
            res = merge_units(out.weight.data, hessian, counts[b], units.size, self.damp)
            out.weight.data.copy_(res.weight.to(out.weight.device))
            removed_params += prune_units(block, units, res.removed)
            pruned[str(b)] = sorted(int(i) for i in res.removed)
            table.append(
                {
                    **(probe[b] if probe is not None else {}),
                    "block": b,
                    "width": widths[b],
                    "pruned": counts[b],
                    "sparsity": counts[b] / widths[b],
                    "output_relative_error": res.relative_error,
                    "twin_cosine": res.twin_cosine,
                }
            )
            run_block(block, inputs, write=True)  # the next block sees the merged outputs
        return counts, table, pruned, removed_params

    @torch.no_grad()
    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        arch = ctx.arch
        units = units_of(model, arch, self.unit)
        params_before = sum(p.numel() for p in model.parameters())
        block_weights = sum(m.weight.numel() for m in block_linears(model, arch).values())
        was_training = model.training
        model.eval()
        try:
            if self.method == "merge":
                counts, table, pruned, removed_params = self.merge(model, ctx)
            else:
                scores = self.scores(model, ctx)
                counts, table = self.counts(model, ctx, scores)
                removed_params = 0
                pruned = {}
                for b, (block, s, k) in enumerate(
                    zip(blocks(model, arch), scores, counts, strict=True)
                ):
                    idx = torch.argsort(s, stable=True)[:k]
                    pruned[str(b)] = sorted(int(i) for i in idx)
                    removed_params += prune_units(block, units, idx)
        finally:
            model.train(was_training)
        if self.shrink:
            width = shrink_mlps(model, arch, units, pruned)
            log.info("prune: MLPs narrowed to %d neurons (%s)", width, arch.intermediate_attr)
        path = atomic_write_json(
            ctx.stage_dir("prune") / f"pruned_{units.name}.json",
            {"method": self.method, "unit": units.name, "blocks": pruned},
        )
        # The container holds every tensor the pruning changed (the unit's projections in
        # the blocks that lost units), raw and zero-filled: it decodes to the model's
        # weights exactly. Its bits/weight stays 32; the saving is params_removed.
        changed = {
            f"{arch.blocks}.{b}.{rel}.{kind}"
            for b, k in enumerate(counts)
            if k > 0
            for rel in (*units.ins, units.out)
            for kind in ("weight", "bias")
        }
        container = write_container(
            ctx.stage_dir("compressed"),
            {n: encode_raw(t) for n, t in model.state_dict().items() if n in changed},
            meta={
                "method": f"prune-{self.method}",
                "unit": units.name,
                "sparsity": self.sparsity,
                "blocks": pruned,
            },
        )
        widths = [int(r["width"]) for r in table]
        n_removed = sum(counts)
        log.info(
            "prune (%s): %d of %d %s removed (%.1f%%), %.2fM parameters",
            self.method,
            n_removed,
            sum(widths),
            units.label,
            100 * n_removed / sum(widths),
            removed_params / 1e6,
        )
        metrics: dict[str, float] = {
            f"{units.name}_total": float(sum(widths)),
            f"{units.name}_removed": float(n_removed),
            units.sparsity_key: n_removed / sum(widths),
            "params_removed": float(removed_params),
            "params_before": float(params_before),
            "params_after": float(params_before - removed_params),
            "block_weights_kept": 1.0 - removed_params / block_weights,
            "block_sparsity_min": min(c / w for c, w in zip(counts, widths, strict=True)),
            "block_sparsity_max": max(c / w for c, w in zip(counts, widths, strict=True)),
        }
        return StageResult(
            metrics=metrics,
            artifacts={"compressed": container, f"pruned_{units.name}": path},
            tables={"allocation": table},
            model=model,
        )


@torch.no_grad()
def shrink_mlps(model: nn.Module, arch: ArchMap, units: Units, pruned: dict[str, list[int]]) -> int:
    """Delete the pruned neurons' rows of the MLP input projections and columns of the
    output projection (the same number in every block) and set the config's MLP width;
    the zeroed neurons contributed nothing, so the function is unchanged. -> the width."""
    widths = set()
    for b, block in enumerate(blocks(model, arch)):
        ins, out = units.layers(block)
        gone = set(pruned.get(str(b), []))
        keep = torch.tensor([j for j in range(out.in_features) if j not in gone])
        for layer in ins:
            # Indexing with a tensor copies: the narrow matrices own their storage.
            layer.weight = nn.Parameter(layer.weight.data[keep.to(layer.weight.device)])
            if layer.bias is not None:
                layer.bias = nn.Parameter(layer.bias.data[keep.to(layer.bias.device)])
            layer.out_features = keep.numel()
        out.weight = nn.Parameter(out.weight.data[:, keep.to(out.weight.device)])
        out.in_features = keep.numel()
        widths.add(keep.numel())
    if len(widths) != 1:
        raise SculptError(f"prune: shrink left blocks of different MLP widths {sorted(widths)}")
    (width,) = widths
    setattr(model.config, arch.intermediate_attr, width)
    return width


def prune_units(block: nn.Module, units: Units, idx: torch.Tensor) -> int:
    """Zero units `idx` of a block (their rows and biases in the input projections, their
    columns in the output projection); returns how many parameters that removes."""
    ins, out = units.layers(block)
    if idx.numel() == 0:
        return 0
    cols = units.columns(idx.cpu())
    removed = 0
    for layer in ins:
        layer.weight.data[cols.to(layer.weight.device)] = 0.0
        removed += cols.numel() * layer.weight.shape[1]
        if layer.bias is not None:
            layer.bias.data[cols.to(layer.bias.device)] = 0.0
            removed += cols.numel()
    out.weight.data[:, cols.to(out.weight.device)] = 0.0
    removed += cols.numel() * out.weight.shape[0]
    return removed
