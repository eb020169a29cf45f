"""Structured MLP-neuron pruning: exact counts, the neurons each method picks, the topology
probe's non-uniform allocation, and config errors. Tiny Llama (2 blocks x 176 neurons)."""

from __future__ import annotations

import json

import pytest
import torch

from framework.errors import ConfigError
from framework.models import blocks
from framework.plugins import Context
from plugins.compressors.prune import StructuredPrune, allocate, uniform_counts

# Small probe settings: the tiny fixture's calibration is 4 windows x 64 tokens.
FAST = {"points": 64, "probe_seq_len": 64, "workers": 1}


def _zeroed(model: torch.nn.Module, ctx: Context) -> list[set[int]]:
    """Per block: the neurons whose down column and gate/up rows are all zero."""
    out = []
    for block in blocks(model, ctx.arch):
        mlp = block.mlp
        dead = (mlp.down_proj.weight == 0).all(dim=0)
        dead &= (mlp.gate_proj.weight == 0).all(dim=1) & (mlp.up_proj.weight == 0).all(dim=1)
        out.append({int(i) for i in torch.nonzero(dead).flatten()})
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "topology"])
def test_exact_fraction_removed(tiny, ctx, method):
    model = tiny.model
    result = StructuredPrune(sparsity=0.3, method=method, **FAST).compress(model, ctx)
    total = round(0.3 * 2 * 176)  # 106
    zeroed = _zeroed(model, ctx)
    per_block = [row["pruned"] for row in result.tables["allocation"]]
    assert sum(len(z) for z in zeroed) == total
    assert [len(z) for z in zeroed] == per_block
    assert sum(per_block) == total
    assert result.metrics["neurons_removed"] == total
    assert result.metrics["mlp_sparsity"] == pytest.approx(total / 352)
    # gate row + up row + down column, 64 weights each, no biases in Llama
    assert result.metrics["params_removed"] == total * 3 * 64
    saved = json.loads(result.artifacts["pruned_neurons"].read_text())
    assert [set(saved["blocks"][str(b)]) for b in range(2)] == zeroed
    # A removal, not a perturbation: each MLP equals the narrower MLP built from the kept
    # neurons' rows and columns only.
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block, gone in zip(blocks(model, ctx.arch), zeroed, strict=True):
            mlp = block.mlp
            keep = torch.tensor([j for j in range(176) if j not in gone])
            a = mlp.act_fn(x @ mlp.gate_proj.weight[keep].T) * (x @ mlp.up_proj.weight[keep].T)
            torch.testing.assert_close(mlp(x), a @ mlp.down_proj.weight[:, keep].T)


def test_uniform_methods_prune_every_block_at_the_same_rate(tiny, ctx):
    result = StructuredPrune(sparsity=0.25, method="wanda").compress(tiny.model, ctx)
    assert [row["pruned"] for row in result.tables["allocation"]] == [44, 44]
    assert uniform_counts([10, 10, 10], 7) == [3, 2, 2]


def test_magnitude_picks_smallest_norm_neurons(tiny, ctx):
    model = tiny.model
    gen = torch.Generator().manual_seed(1)
    chosen = []
    with torch.no_grad():
        for block in blocks(model, ctx.arch):
            idx = torch.randperm(176, generator=gen)[:44]
            chosen.append({int(i) for i in idx})
            mlp = block.mlp
            mlp.gate_proj.weight[idx] *= 1e-3
            mlp.up_proj.weight[idx] *= 1e-3
            mlp.down_proj.weight[:, idx] *= 1e-3
    StructuredPrune(sparsity=0.25, method="magnitude").compress(model, ctx)
    assert _zeroed(model, ctx) == chosen


def _down_input_norms(model: torch.nn.Module, ctx: Context, windows: torch.Tensor):
    """||a_j|| over the windows, from an independent hook on block 0's down_proj."""
    seen = []
    mlp = blocks(model, ctx.arch)[0].mlp
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    a = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    return a.pow(2).sum(0).sqrt()


def test_wanda_uses_activations(tiny, ctx):
    model = tiny.model
    mlp = blocks(model, ctx.arch)[0].mlp
    loud, quiet = 3, 7
    with torch.no_grad():
        # Both neurons get tiny output weights; `loud` also gets a 100x larger activation.
        mlp.down_proj.weight[:, [loud, quiet]] *= 0.02
        mlp.up_proj.weight[loud] *= 100.0
    plugin = StructuredPrune(sparsity=0.25, method="wanda")
    scores = plugin.scores(model, ctx)
    expected = mlp.down_proj.weight.norm(dim=0) * _down_input_norms(
        model, ctx, ctx.calibration(plugin.calibration_windows)
    )
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-6)
    # On output weights alone both would go (the two smallest down columns of the block).
    weakest = set(torch.argsort(mlp.down_proj.weight.norm(dim=0))[:2].tolist())
    assert weakest == {loud, quiet}
    plugin.compress(model, ctx)
    zeroed = _zeroed(model, ctx)[0]
    assert quiet in zeroed
    assert loud not in zeroed


def test_topology_allocation_follows_block_sensitivity(tiny, ctx):
    model = tiny.model
    with torch.no_grad():
        # Block 0's MLP dominates the residual stream; block 1's barely touches it.
        blocks(model, ctx.arch)[0].mlp.down_proj.weight *= 10.0
        blocks(model, ctx.arch)[1].mlp.down_proj.weight *= 0.1
    # Diagram displacement alone (topology_weight=1): the topology term drives the split.
    plugin = StructuredPrune(sparsity=0.25, method="topology", topology_weight=1.0, **FAST)
    result = plugin.compress(model, ctx)
    rows = result.tables["allocation"]
    assert rows[0]["topo"] > rows[1]["topo"] > 0.0
    counts = [row["pruned"] for row in rows]
    assert sum(counts) == 88
    assert counts != [44, 44]
    assert counts[0] < counts[1]
    assert [len(z) for z in _zeroed(model, ctx)] == counts


def test_allocate_is_exact_and_capped():
    counts = allocate([1.0, 1.0, 4.0], [100, 100, 100], 90, power=1.0, max_fraction=0.9)
    assert sum(counts) == 90
    assert counts[0] == counts[1] > counts[2]
    # Inverse proportionality: 4x the sensitivity, a quarter of the rate (40/40/10).
    assert counts == [40, 40, 10]
    capped = allocate([1.0, 100.0], [100, 100], 60, max_fraction=0.5)
    assert capped == [50, 10]
    assert allocate([1.0, 5.0], [50, 50], 20, power=0.0) == [10, 10]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"method": "random"}, "method"),
        ({"points": 2}, "points"),
        ({"batch_size": 0}, "batch_size"),
        ({"calibration_windows": 0}, "calibration_windows"),
        ({"topology_weight": 2.0}, "topology_weight"),
        ({"probe_sparsity": 0.0}, "probe_sparsity"),
        ({"power": -1.0}, "power"),
        ({"sparsity": 0.5, "max_block_sparsity": 0.4}, "max_block_sparsity"),
        ({"observe_stride": 0}, "observe_stride"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        StructuredPrune(**kwargs)
    assert info.value.argument == key
