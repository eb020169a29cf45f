"""Structured pruning of MLP neurons and attention heads: exact counts, exact removal, the
units each method picks, the topology probe's non-uniform allocation, and config errors.
Tiny Llama (2 blocks x 176 neurons, 4 query heads of 16 dims sharing 2 key/value heads)."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("method", ["magnitude", "wanda", "topology", "merge"])
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


def test_merge_folds_a_duplicated_neuron_into_its_twin(tiny, ctx):
    """Neuron 90 of block 0 made a copy of neuron 3 (same gate and up rows): merging one
    neuron per block removes one of the pair in block 0, and that block's MLP computes
    what it computed before."""
    model = tiny.model
    mlp = blocks(model, ctx.arch)[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[90] = mlp.gate_proj.weight[3]
        mlp.up_proj.weight[90] = mlp.up_proj.weight[3]
    before = copy.deepcopy(mlp)
    # Little damping: with the default 1% a twin costs about as much as a quiet neuron.
    plugin = StructuredPrune(sparsity=2 / 352, method="merge", damp=1e-6)
    result = plugin.compress(model, ctx)
    assert [row["pruned"] for row in result.tables["allocation"]] == [1, 1]
    assert _zeroed(model, ctx)[0] in ({3}, {90})
    assert result.tables["allocation"][0]["twin_cosine"] == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), before(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("unit", ["neurons", "heads"])
def test_merge_keeps_the_model_closer_than_wanda(tiny, ctx, unit):
    """Same units removed per block; merging folds what they wrote into the kept units, so
    the model stays closer to the original on held-out windows (KL of the next-token
    distribution) than Wanda's plain removal."""
    ids = ctx.evaluation_windows

    def kl_to_original(method: str) -> float:
        model = copy.deepcopy(tiny.model)
        StructuredPrune(sparsity=0.5, method=method, unit=unit).compress(model, ctx)
        with torch.no_grad():
            ref = torch.log_softmax(tiny.model(input_ids=ids).logits, -1)
            got = torch.log_softmax(model(input_ids=ids).logits, -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    merged, wanda = kl_to_original("merge"), kl_to_original("wanda")
    assert merged < 0.8 * wanda, (merged, wanda)


@pytest.mark.parametrize("method", ["wanda", "merge"])
def test_shrink_deletes_the_neurons_and_reloads_as_a_smaller_stock_model(
    tiny, ctx, tmp_path, method
):
    """shrink: the same function as the zeroed model, 44 of 176 neurons gone from every
    block's matrices, the config's intermediate_size set, and save/reload as a plain HF
    LlamaForCausalLM with the same logits."""
    from transformers import AutoModelForCausalLM

    ids = ctx.evaluation_windows
    zeroed = copy.deepcopy(tiny.model)
    StructuredPrune(sparsity=0.25, method=method).compress(zeroed, ctx)
    shrunk = copy.deepcopy(tiny.model)
    result = StructuredPrune(sparsity=0.25, method=method, shrink=True).compress(shrunk, ctx)
    assert shrunk.config.intermediate_size == 132
    for block in blocks(shrunk, ctx.arch):
        assert block.mlp.gate_proj.weight.shape == (132, 64)
        assert block.mlp.up_proj.weight.shape == (132, 64)
        assert block.mlp.down_proj.weight.shape == (64, 132)
    before = sum(p.numel() for p in tiny.model.parameters())
    after = sum(p.numel() for p in shrunk.parameters())
    assert before - after == result.metrics["params_removed"] == 2 * 44 * 3 * 64
    with torch.no_grad():
        want = zeroed(input_ids=ids).logits
        torch.testing.assert_close(shrunk(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        shrunk.save_pretrained(tmp_path / "shrunk")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_merge_with_the_topology_allocation_takes_the_probes_counts(tiny, ctx):
    """allocation=topology with method=merge: each block merges the count the topology
    probe gives it (the same counts as method=topology on the same model), the total stays
    exact, and the table carries the probe's sensitivities beside the merge's errors."""
    probe_counts, _ = StructuredPrune(sparsity=0.3, method="topology", **FAST).counts(
        tiny.model, ctx, StructuredPrune(sparsity=0.3, method="wanda").scores(tiny.model, ctx)
    )
    model = copy.deepcopy(tiny.model)
    plugin = StructuredPrune(sparsity=0.3, method="merge", allocation="topology", **FAST)
    result = plugin.compress(model, ctx)
    rows = result.tables["allocation"]
    assert [r["pruned"] for r in rows] == probe_counts
    assert [len(z) for z in _zeroed(model, ctx)] == probe_counts
    assert sum(probe_counts) == round(0.3 * 352)
    assert probe_counts != [53, 53]  # not the uniform split: the probe decided
    assert all("sensitivity" in r and "output_relative_error" in r for r in rows)


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
        ({"unit": "channels"}, "unit"),
        ({"damp": 1.0}, "damp"),
        ({"shrink": "yes"}, "shrink"),
        ({"shrink": True, "unit": "heads"}, "shrink"),
        ({"shrink": True, "method": "topology"}, "shrink"),
        ({"shrink": True, "method": "merge", "allocation": "topology"}, "shrink"),
        ({"allocation": "random"}, "allocation"),
        ({"method": "topology", "allocation": "uniform"}, "allocation"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        StructuredPrune(**kwargs)
    assert info.value.argument == key


# ----------------------------------------------------------------------------------------
# unit: heads
# ----------------------------------------------------------------------------------------

HEADS, HEAD_DIM = 4, 16  # the tiny fixture's query heads per block and their width


def _cols(head: int) -> slice:
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)


def _zeroed_heads(model: torch.nn.Module, ctx: Context) -> list[set[int]]:
    """Per block: the query heads whose q rows and o columns are all zero."""
    out = []
    for block in blocks(model, ctx.arch):
        attn = block.self_attn
        dead = (attn.o_proj.weight == 0).all(dim=0).reshape(HEADS, HEAD_DIM).all(dim=1)
        dead &= (attn.q_proj.weight == 0).all(dim=1).reshape(HEADS, HEAD_DIM).all(dim=1)
        out.append({int(i) for i in torch.nonzero(dead).flatten()})
    return out


@pytest.mark.parametrize("method", ["magnitude", "wanda", "topology", "merge"])
def test_heads_exact_fraction_removed(tiny, ctx, method):
    model = tiny.model
    kv_before = [
        (b.self_attn.k_proj.weight.clone(), b.self_attn.v_proj.weight.clone())
        for b in blocks(model, ctx.arch)
    ]
    plugin = StructuredPrune(sparsity=0.5, method=method, unit="heads", **FAST)
    result = plugin.compress(model, ctx)
    total = 4  # round(0.5 * 2 blocks x 4 heads)
    zeroed = _zeroed_heads(model, ctx)
    per_block = [row["pruned"] for row in result.tables["allocation"]]
    assert [len(z) for z in zeroed] == per_block
    assert sum(per_block) == total
    assert result.metrics["heads_removed"] == total
    assert result.metrics["heads_total"] == 8
    assert result.metrics["head_sparsity"] == 0.5
    # Per head: 16 q rows x 64 inputs + 64 outputs x 16 o columns; GQA's shared k/v stay.
    assert result.metrics["params_removed"] == total * (16 * 64 + 64 * 16)
    for block, (k, v) in zip(blocks(model, ctx.arch), kv_before, strict=True):
        assert torch.equal(block.self_attn.k_proj.weight, k)
        assert torch.equal(block.self_attn.v_proj.weight, v)
    assert "pruned_neurons" not in result.artifacts
    saved = json.loads(result.artifacts["pruned_heads"].read_text())
    assert saved["unit"] == "heads"
    assert [set(saved["blocks"][str(b)]) for b in range(2)] == zeroed
    assert _zeroed(model, ctx) == [set(), set()]  # no MLP neuron touched


def test_pruned_heads_are_an_exact_removal(tiny, ctx):
    model = tiny.model
    original = copy.deepcopy(model)
    result = StructuredPrune(sparsity=0.25, method="magnitude", unit="heads").compress(model, ctx)
    gone = json.loads(result.artifacts["pruned_heads"].read_text())["blocks"]
    gone = {int(b): heads for b, heads in gone.items()}
    assert sum(len(h) for h in gone.values()) == 2
    ids = ctx.evaluation_windows

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=ids).logits

    # (a) only the o_proj columns that read the heads zeroed
    o_only = copy.deepcopy(original)
    # (b) only the q rows zeroed: the head's attention turns uniform, it is not removed
    q_only = copy.deepcopy(original)
    with torch.no_grad():
        for b, heads in gone.items():
            for h in heads:
                blocks(o_only, ctx.arch)[b].self_attn.o_proj.weight[:, _cols(h)] = 0.0
                blocks(q_only, ctx.arch)[b].self_attn.q_proj.weight[_cols(h)] = 0.0

    # (c) the unpruned model with the heads' outputs (o_proj's input slices) hooked to zero
    def silence(heads: list[int]):
        def fn(_module, args):
            x = args[0].clone()
            for h in heads:
                x[..., _cols(h)] = 0.0
            return (x, *args[1:])

        return fn

    hooked = [
        blocks(original, ctx.arch)[b].self_attn.o_proj.register_forward_pre_hook(silence(h))
        for b, h in gone.items()
    ]
    try:
        silenced = logits(original)
    finally:
        for handle in hooked:
            handle.remove()
    pruned = logits(model)
    torch.testing.assert_close(pruned, logits(o_only), rtol=0.0, atol=1e-6)
    torch.testing.assert_close(pruned, silenced, rtol=0.0, atol=1e-6)
    assert not torch.allclose(pruned, logits(original), atol=1e-4)
    assert not torch.allclose(logits(q_only), pruned, atol=1e-4)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_heads_with_silenced_output_go_first(tiny, ctx, method):
    model = tiny.model
    chosen = [2, 1]  # per block
    with torch.no_grad():
        for block, h in zip(blocks(model, ctx.arch), chosen, strict=True):
            block.self_attn.o_proj.weight[:, _cols(h)] *= 1e-4
    StructuredPrune(sparsity=0.25, method=method, unit="heads").compress(model, ctx)
    assert _zeroed_heads(model, ctx) == [{h} for h in chosen]


def test_head_wanda_uses_head_outputs(tiny, ctx):
    model = tiny.model
    attn = blocks(model, ctx.arch)[0].self_attn
    loud, quiet = 0, 2  # loud reads key/value head 0, quiet key/value head 1
    with torch.no_grad():
        # Both heads get tiny o columns; `loud`'s values (hence output) are 100x larger.
        attn.o_proj.weight[:, _cols(loud)] *= 0.02
        attn.o_proj.weight[:, _cols(quiet)] *= 0.02
        attn.v_proj.weight[_cols(0)] *= 100.0
    plugin = StructuredPrune(sparsity=0.25, method="wanda", unit="heads")
    scores = plugin.scores(model, ctx)
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ctx.calibration(plugin.calibration_windows))
    handle.remove()
    out = torch.cat([s.reshape(-1, HEADS, HEAD_DIM) for s in seen])
    w = attn.o_proj.weight.reshape(-1, HEADS, HEAD_DIM)
    expected = w.pow(2).sum(dim=(0, 2)).sqrt() * out.pow(2).sum(dim=(0, 2)).sqrt()
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-6)
    plugin.compress(model, ctx)
    assert _zeroed_heads(model, ctx)[0] == {quiet}


def test_head_topology_allocation_follows_block_sensitivity(tiny, ctx):
    model = tiny.model
    with torch.no_grad():
        blocks(model, ctx.arch)[0].self_attn.o_proj.weight *= 10.0
        blocks(model, ctx.arch)[1].self_attn.o_proj.weight *= 0.1
    plugin = StructuredPrune(
        sparsity=0.5, method="topology", unit="heads", topology_weight=1.0, **FAST
    )
    rows = plugin.compress(model, ctx).tables["allocation"]
    assert rows[0]["topo"] > rows[1]["topo"] > 0.0
    counts = [row["pruned"] for row in rows]
    assert sum(counts) == 4
    assert counts[0] < counts[1]
    assert [len(z) for z in _zeroed_heads(model, ctx)] == counts
