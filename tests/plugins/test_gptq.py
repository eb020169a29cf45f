"""GPTQ: the per-layer algorithm against a plain (unblocked, explicit-inverse) reference and
against RTN, and the plugin end to end on a tiny Llama calibrated on real text."""

from __future__ import annotations

import copy
import itertools
import math
import sys

import pytest
import torch
from omegaconf import OmegaConf

from framework.calibration import accumulate_hessians, capture_block_inputs, gram
from framework.codecs import read_container, read_manifest
from framework.codecs.uniform import UniformGrid, encode, fit_params
from framework.config import check_node
from framework.data import WindowSpec, make_windows, tokenize
from framework.data.sources import shakespeare
from framework.errors import ConfigError, SculptError
from framework.eval import evaluate_causal_lm
from framework.models import block_linears, build_tiny_llama
from framework.plugins import Context
from plugins.compressors.gptq import (
    GPTQ,
    column_blocks,
    gptq_quantize,
)
from plugins.compressors.rtn import RTN

SEQ = 128


# ---------------------------------------------------------------------------------------
# Fixtures: a tiny Llama, calibration windows from the tragedies, evaluation windows from
# the histories (real text, different plays).
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(layers=2, hidden=64, intermediate=176, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def calibration(tiny) -> torch.Tensor:
    ids = tokenize(tiny.tokenizer, shakespeare(groups=("tragedies",))[:300_000])
    return make_windows(
        ids, WindowSpec(source="", windows=24, seq_len=SEQ, sampling="random"), "cal"
    )


@pytest.fixture(scope="module")
def evaluation(tiny) -> torch.Tensor:
    ids = tokenize(tiny.tokenizer, shakespeare(groups=("histories",))[:100_000])
    return make_windows(ids, WindowSpec(source="", windows=8, seq_len=SEQ), "eval")


def _context(tiny, calibration, tmp_path) -> Context:
    return Context(
        tokenizer=tiny.tokenizer,
        arch=tiny.arch,
        output_dir=tmp_path,
        calibration_loader=lambda: calibration,
    )


def _compress(plugin, tiny, calibration, tmp_path):
    model = copy.deepcopy(tiny.model)
    result = plugin.compress(model, _context(tiny, calibration, tmp_path))
    return model, result


@pytest.fixture(scope="module")
def gptq3(tiny, calibration, tmp_path_factory):
    """The plugin's standard run at 3 bits, group 32, on every calibration window."""
    return _compress(
        GPTQ(bits=3, group_size=32), tiny, calibration, tmp_path_factory.mktemp("gptq3")
    )


def _assert_decodes_to_model(model, tiny, result) -> None:
    decoded = read_container(result.artifacts["compressed"])
    linears = block_linears(model, tiny.arch)
    assert set(decoded) == {f"{name}.weight" for name in linears}
    for name, layer in linears.items():
        assert torch.equal(decoded[f"{name}.weight"], layer.weight.data), name
    # Nothing outside the block linears moved.
    coded = {f"{name}.weight" for name in linears}
    ref = tiny.model.state_dict()
    for key, value in model.state_dict().items():
        if key not in coded:
            assert torch.equal(value, ref[key]), key


# ---------------------------------------------------------------------------------------
# The per-layer algorithm
# ---------------------------------------------------------------------------------------


def _correlated_layer(rows: int = 48, cols: int = 96, n: int = 4096, seed: int = 0):
    """A weight and inputs with strongly correlated features (decaying spectrum, an offset),
    like a transformer's normed activations, and their Hessian 2 X^T X / n."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    spectrum = torch.logspace(0, -2, cols)
    x = torch.randn(n, cols, generator=gen) @ (basis * spectrum) @ basis.T
    x = x + 0.3 * torch.randn(cols, generator=gen)
    w = torch.randn(rows, cols, generator=gen)
    return w, x, 2.0 * x.T.double() @ x.double() / n


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).norm())


def _gptq_weights(w, h, grid, **kwargs) -> torch.Tensor:
    res = gptq_quantize(w, h, grid, **kwargs)
    _, w_hat = encode(w, grid, codes=res.codes, scale=res.scale, zero=res.zero)
    return w_hat


def _plain_gptq(
    w: torch.Tensor, h: torch.Tensor, grid: UniformGrid, damp: float = 0.01
) -> torch.Tensor:
    """The textbook form (paper eq. 2-3): quantize columns left to right, spread each error
    with the current inverse Hessian, then remove that column from the inverse. float64,
    no blocks, no Cholesky; group parameters fitted at each group's first column."""
    w = w.double().clone()
    rows, cols = w.shape
    h = h.double() + damp * h.double().diag().mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    g = grid.group_size or cols
    codes = torch.empty(rows, cols)
    column_grid = UniformGrid(grid.bits, None, grid.symmetric)
    for j in range(cols):
        if j % g == 0:
            s, z = fit_params(w[:, j : j + g].float(), column_grid)
            s, z = s[:, 0], z[:, 0]
        q = torch.clamp(torch.round(w[:, j].float() / s) + z, 0, grid.qmax)
        codes[:, j] = q
        err = (w[:, j] - ((q - z) * s).double()) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


@pytest.mark.parametrize("bits", [2, 3])
def test_single_layer_output_error_below_rtn(bits):
    w, x, h = _correlated_layer()
    grid = UniformGrid(bits=bits, group_size=32, symmetric=False)
    _, w_rtn = encode(w, grid)
    rtn = _output_error(x, w, w_rtn)
    for kwargs in ({}, {"act_order": True}):
        gptq = _output_error(x, w, _gptq_weights(w, h, grid, **kwargs))
        assert gptq < 0.7 * rtn, (kwargs, gptq, rtn)


@pytest.mark.parametrize("group_size", [None, 32, 40])
def test_matches_plain_unblocked_gptq(group_size):
    """Blocked lazy updates + Cholesky give the textbook algorithm's codes. A rounding tie
    decided differently in float32 vs float64 may flip a rare code, so allow 1%."""
    w, _, h = _correlated_layer(rows=32, cols=96, n=2048, seed=1)
    grid = UniformGrid(bits=3, group_size=group_size, symmetric=False)
    plain = _plain_gptq(w, h, grid)
    for block_size in (96, 16, 5):
        res = gptq_quantize(w, h, grid, block_size=block_size)
        agree = float((res.codes == plain).float().mean())
        assert agree > 0.99, (block_size, agree)


def test_column_blocks_never_split_a_dynamic_group():
    for cols, block, group in (
        (576, 128, 192),
        (1536, 128, 192),
        (100, 16, 40),
        (96, 5, 32),
        (64, 128, 7),
    ):
        spans = column_blocks(cols, block, group, static=False)
        assert spans[0][0] == 0 and spans[-1][1] == cols
        assert all(a2 == b1 for (_, a2), (b1, _) in itertools.pairwise(spans))
        assert all(0 < i2 - i1 <= block for i1, i2 in spans)
        for start in range(0, cols, group):
            end = min(start + group, cols)
            inside = next((i1, i2) for i1, i2 in spans if i1 <= start < i2)
            assert start == inside[0] or end <= inside[1], (cols, block, group, start, inside)
    assert column_blocks(300, 128, 192, static=True) == [(0, 128), (128, 256), (256, 300)]


def test_dead_columns_and_symmetric_grid():
    w, x, h = _correlated_layer(rows=16, cols=64, n=1024, seed=2)
    x[:, [3, 40]] = 0.0
    h = 2.0 * x.T.double() @ x.double() / x.shape[0]
    grid = UniformGrid(bits=4, group_size=16, symmetric=True)
    res = gptq_quantize(w, h, grid)
    assert res.dead_columns == 2
    _, w_hat = encode(w, grid, codes=res.codes, scale=res.scale, zero=res.zero)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat[:, [3, 40]], torch.zeros(16, 2))  # no signal: stored as 0
    _, w_rtn = encode(w, grid)
    assert _output_error(x, w, w_hat) < _output_error(x, w, w_rtn)


# ---------------------------------------------------------------------------------------
# The plugin on a tiny Llama
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [96, 1100])  # the second goes through ssyrk if present
def test_gram_is_x_transpose_x(features):
    x = torch.randn(300, features, generator=torch.Generator().manual_seed(3))
    product, upper_only = gram(x)
    if upper_only:
        product = product.triu() + product.triu(1).T
    exact = x.double().T @ x.double()
    assert product.dtype == torch.float64
    assert torch.allclose(product, exact, rtol=1e-5, atol=1e-3)


def test_hessians_of_the_first_block_match_a_direct_computation(tiny, calibration):
    """Captured block inputs (in uneven chunks) + hooks give 2 X^T X / tokens for each
    linear, X being what that linear sees in an ordinary forward pass of the model."""
    windows = calibration[:7]
    block = tiny.model.model.layers[0]
    layers = {rel: block.get_submodule(rel) for rel in tiny.arch.linear_names()}
    seen: dict[str, list[torch.Tensor]] = {rel: [] for rel in layers}
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, rel=rel: seen[rel].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for rel, layer in layers.items()
    ]
    with torch.no_grad():
        tiny.model(input_ids=windows)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        inputs = capture_block_inputs(tiny.model, block, windows, 3, torch.device("cpu"))
        hessians = accumulate_hessians(block, layers, inputs)
    for rel, h in hessians.items():
        x = torch.cat(seen[rel]).double()
        expected = 2.0 * x.T @ x / x.shape[0]
        assert torch.allclose(h, expected, rtol=1e-4, atol=1e-4 * float(expected.diag().mean())), (
            rel
        )


def test_container_decodes_bit_exactly_to_model(tiny, calibration, gptq3):
    model, result = gptq3
    _assert_decodes_to_model(model, tiny, result)
    m = result.metrics
    assert m["layers"] == 14 and m["nominal_bits"] == 3.0
    assert m["calibration_windows"] == calibration.shape[0]
    assert m["calibration_tokens"] == calibration.numel()
    assert 0 < m["output_relative_error"] < m["rtn_output_relative_error"]
    assert {row["role"] for row in result.tables["by_role"]} == set(tiny.arch.linear_names())
    assert read_manifest(result.artifacts["compressed"])["meta"]["method"] == "gptq"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"act_order": False},
        {"act_order": True, "group_size": None, "symmetric": True},
        {"true_sequential": True, "static_groups": True},
        {"quantized_inputs": False},
        {"quantized_inputs": False, "true_sequential": True},
    ],
    ids=[
        "dynamic_groups",
        "act_order-per_channel-symmetric",
        "true_sequential-static",
        "original_inputs",
        "original_inputs-true_sequential",
    ],
)
def test_variants_decode_bit_exactly(tiny, calibration, tmp_path, kwargs):
    args = {"bits": 3, "group_size": 32, "calibration_windows": 8, **kwargs}
    model, result = _compress(GPTQ(**args), tiny, calibration, tmp_path)
    _assert_decodes_to_model(model, tiny, result)
    assert result.metrics["output_relative_error"] < result.metrics["rtn_output_relative_error"]


@pytest.mark.parametrize("act_order", [True, False], ids=["static_groups", "dynamic_groups"])
def test_short_last_group(tiny, calibration, tmp_path, act_order):
    """48 divides neither 64 nor 176: each row ends with a shorter group of its own."""
    model, result = _compress(
        GPTQ(bits=3, group_size=48, act_order=act_order, calibration_windows=6, batch_size=4),
        tiny,
        calibration,
        tmp_path,
    )
    _assert_decodes_to_model(model, tiny, result)
    manifest = read_manifest(result.artifacts["compressed"])
    for name, layer in block_linears(model, tiny.arch).items():
        rows, cols = layer.weight.shape
        scales = manifest["tensors"][f"{name}.weight"]["sections"]["scales"]["length"]
        assert scales == rows * math.ceil(cols / 48) * 2
    assert result.metrics["calibration_windows"] == 6


def test_chunking_does_not_change_the_result(tiny, calibration, tmp_path):
    """Windows go through the blocks in chunks (here 7 = 3+3+1): same Hessians up to
    float summation order, so essentially the same codes as one chunk."""
    a, _ = _compress(
        GPTQ(bits=3, group_size=32, calibration_windows=7, batch_size=3),
        tiny,
        calibration,
        tmp_path / "a",
    )
    b, _ = _compress(
        GPTQ(bits=3, group_size=32, calibration_windows=7, batch_size=7),
        tiny,
        calibration,
        tmp_path / "b",
    )
    for name, layer in block_linears(a, tiny.arch).items():
        other = b.get_submodule(name).weight.data
        assert float((layer.weight.data == other).float().mean()) > 0.99, name


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"quantized_inputs": False, "true_sequential": True}],
    ids=["quantized_inputs", "original_inputs-true_sequential"],
)
def test_offloaded_activations_give_the_same_model(tiny, calibration, tmp_path, kwargs):
    """Activations kept in files instead of memory: the same floats go through the same
    blocks, so the same codes, bit for bit; the files are gone afterwards."""
    args = {"bits": 3, "group_size": 32, "calibration_windows": 7, "batch_size": 3, **kwargs}
    mem, _ = _compress(GPTQ(**args), tiny, calibration, tmp_path / "memory")
    disk, result = _compress(
        GPTQ(**args, offload_activations=True), tiny, calibration, tmp_path / "disk"
    )
    _assert_decodes_to_model(disk, tiny, result)
    for name, layer in block_linears(mem, tiny.arch).items():
        assert torch.equal(layer.weight.data, disk.get_submodule(name).weight.data), name
    assert not list((tmp_path / "disk").glob(".offload-*"))


def _mapping_of(t: torch.Tensor) -> str:
    """The /proc/self/maps pathname of the mapping holding t's first byte ('' if none)."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= ptr < hi:
                return fields[5].strip() if len(fields) == 6 else ""
    return ""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
@pytest.mark.parametrize(
    ("activations", "kwargs"),
    [
        (False, {}),
        (True, {}),
        (True, {"quantized_inputs": False, "true_sequential": True}),
    ],
    ids=["weights", "weights+activations", "both-original_inputs-true_sequential"],
)
def test_offloaded_weights_give_the_same_model_read_from_files(
    tiny, calibration, tmp_path, activations, kwargs
):
    """Weights moved to mapped files before GPTQ and again after each block: the same codes
    bit for bit, every block linear of the returned model reads from an unlinked file of
    the run's scratch folder, and the folder is gone."""
    args = {"bits": 3, "group_size": 32, "calibration_windows": 7, "batch_size": 3, **kwargs}
    mem, _ = _compress(GPTQ(**args), tiny, calibration, tmp_path / "memory")
    plugin = GPTQ(**args, offload_weights=True, offload_activations=activations)
    files, result = _compress(plugin, tiny, calibration, tmp_path / "files")
    _assert_decodes_to_model(files, tiny, result)
    for name, layer in block_linears(mem, tiny.arch).items():
        offloaded = files.get_submodule(name).weight
        assert torch.equal(layer.weight.data, offloaded.data), name
        where = _mapping_of(offloaded)
        assert ".offload-" in where and where.endswith("(deleted)"), (name, where)
    # Norms and embeddings stay where they were.
    assert ".offload-" not in _mapping_of(files.model.embed_tokens.weight)
    assert not list((tmp_path / "files").glob(".offload-*"))


def test_lowers_kl_versus_rtn(tiny, calibration, evaluation, gptq3, tmp_path):
    """The whole pipeline: at 3 bits on the same grid, GPTQ's model is closer to the
    reference than RTN's on held-out text (KL and the last hidden state)."""
    grid = {"bits": 3, "group_size": 32}
    rtn_model = copy.deepcopy(tiny.model)
    RTN(**grid).compress(rtn_model, _context(tiny, calibration, tmp_path / "rtn"))
    gptq_model = gptq3[0]
    rtn = evaluate_causal_lm(rtn_model, evaluation, reference=tiny.model)
    gptq = evaluate_causal_lm(gptq_model, evaluation, reference=tiny.model)
    assert gptq["kl"] < 0.7 * rtn["kl"], (gptq["kl"], rtn["kl"])

    def last_hidden(model):
        return model.model(input_ids=evaluation).last_hidden_state

    with torch.no_grad():
        ref = last_hidden(tiny.model)
        err_rtn = float((last_hidden(rtn_model) - ref).norm() / ref.norm())
        err_gptq = float((last_hidden(gptq_model) - ref).norm() / ref.norm())
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"damp": -0.1}, "damp"),
        ({"damp": 1.5}, "damp"),
        ({"damp": float("nan")}, "damp"),
        ({"block_size": 0}, "block_size"),
        ({"calibration_windows": 0}, "calibration_windows"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, argument):
    with pytest.raises(ConfigError) as info:
        GPTQ(**kwargs)
    assert info.value.argument == argument


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 2.5}, "batch_size"),
        ({"calibration_windows": 1.5}, "calibration_windows"),
        ({"offload_activations": "yes"}, "offload_activations"),
        ({"offload_weights": 1}, "offload_weights"),
    ],
)
def test_wrong_types_are_refused_from_yaml(kwargs, argument):
    # types are checked where a config is bound to the signature (Python callers have
    # their type checker); bounds on both paths (framework/schema.py)
    node = OmegaConf.create({"_target_": "plugins.compressors.gptq.GPTQ", **kwargs})
    with pytest.raises(SculptError, match=rf"^compressor\.{argument}: .* is not a valid"):
        check_node(node, "compressor")


def test_capability_flags():
    assert GPTQ.needs_calibration and GPTQ.changes_weights


def test_every_layer_reports_its_d_of_r_gap_and_a_certified_output_bound(gptq3, tiny) -> None:
    model, result = gptq3
    rows = result.tables["bounds"]
    assert len(rows) == len(block_linears(model, tiny.arch))
    for r in rows:
        # The bound is an inequality computed from the weight error and the activations:
        # it must hold, and it is never absurdly loose on these small layers.
        assert r["output_bound"] >= r["output_error"] > 0
        assert 1.0 <= r["bound_ratio"] < 1e4
        assert r["mse"] > 0 and r["gaussian_dr"] > 0
        assert 3 + (16 + 3) / 32 <= r["rate"] < 3.75  # codes + fp16 scale + zero, whole bytes
    assert result.metrics["bound_ratio_min"] >= 1.0
    assert math.isfinite(result.metrics["mean_gap_bits"])
    assert result.plots["rate_distortion"].exists()
