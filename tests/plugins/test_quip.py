"""QuIP: the incoherent codec (round trip, corruption, rate from bytes, rotation undone by
the decoder), block LDLQ against a plain explicit-inverse reference and against no feedback
and RTN, E8 against a scalar grid, and the plugin end to end through the runner."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from framework.codecs import container_size, read_container, write_container
from framework.codecs.incoherent import (
    Codebook,
    decode,
    default_constants,
    encode,
    fit_scales,
    quantize_unit,
    rotation_kind,
    rotations,
)
from framework.errors import ConfigError
from framework.run import run
from plugins.compressors.quip import QuIP, _quantize_columns, block_ldlq


def _book(kind: str = "e8", bits: int = 2, group_size: int | None = None) -> Codebook:
    return Codebook(kind, bits, group_size, default_constants(kind, bits))


def _layer_problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian weight and the Hessian 2 X^T X / n of correlated inputs whose scales
    spread over two decades (a PSD matrix far from the identity, as real layers have)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mix
    return w, (2.0 * x.T @ x / x.shape[0]).double()


def _code(w: torch.Tensor, book: Codebook, seed: int = 7, rotation: str = "hadamard"):
    """Rotate and code w to nearest points -> (entry, decoded weight)."""
    rows, cols = w.shape
    kinds = rotation_kind(rows, rotation), rotation_kind(cols, rotation)
    u, v = rotations(rows, cols, seed, *kinds)
    w_rot = u @ w.double() @ v.T
    scale = fit_scales(w_rot, book)
    _, codes = _quantize_columns(w_rot, scale, book, 0)
    return encode((rows, cols), book, codes, scale, seed, *kinds)


# ---------------------------------------------------------------------------------------
# The codec
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "kind", "bits", "group_size"),
    [
        ((64, 176), "e8", 2, None),  # tiny Llama's down projection: both orders Hadamard
        ((24, 40), "e8", 3, 16),  # residual stage, a shorter last scale group
        ((10, 16), "uniform", 3, None),  # no Hadamard of order 10: Haar rows
    ],
)
def test_container_round_trip_is_bit_exact_and_rate_counts_every_byte(
    tmp_path, shape, kind, bits, group_size
):
    book = _book(kind, bits, group_size)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    enc, w_hat = _code(w, book)
    path = write_container(tmp_path / "c", {"layer.weight": enc})
    decoded = read_container(path)["layer.weight"]
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, w_hat)
    rows, cols = shape
    expected_bytes = (
        math.ceil(rows * cols // book.dim * book.code_bits / 8)  # packed codes
        + 2 * rows * book.groups(cols)  # fp16 scales
        + 4  # the rotation seed
    )
    assert enc.nbytes() == expected_bytes
    assert container_size(path)["bits_per_weight"] == pytest.approx(8 * expected_bytes / w.numel())
    assert book.code_bits / book.dim == bits  # fixed rate: 16 bits per E8 vector at 2 bits


def test_corrupt_or_truncated_sections_raise_clear_errors():
    enc, _ = _code(torch.randn(16, 32, generator=torch.Generator().manual_seed(1)), _book())

    def broken(**sections: bytes):
        return dataclasses.replace(enc, sections={**enc.sections, **sections})

    with pytest.raises(ValueError, match="codes section has 127 bytes, expected 128"):
        decode(broken(codes=enc.sections["codes"][:-1]))
    with pytest.raises(ValueError, match="scales section has 30 bytes, expected 32"):
        decode(broken(scales=enc.sections["scales"][:-2]))
    with pytest.raises(ValueError, match="seed section has 3 bytes"):
        decode(broken(seed=b"\0\0\0"))
    # 0xffff is a valid 16-bit field but past the 56,881 points of the 2-bit ball.
    with pytest.raises(ValueError, match="index outside the codebook"):
        decode(broken(codes=b"\xff" * len(enc.sections["codes"])))
    with pytest.raises(ValueError, match="constants"):
        decode(dataclasses.replace(enc, params={**enc.params, "constants": [1.0, 2.0]}))


def test_decoder_undoes_the_rotation_exactly_and_the_rotation_makes_weights_incoherent():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 176, generator=g) * 0.02
    w[5, 17], w[40, 100] = 3.0, -2.5  # outliers a per-row grid would waste its levels on
    rows, cols = w.shape
    u, v = rotations(rows, cols, 3, "hadamard", "hadamard")
    eye = torch.eye(rows, dtype=torch.float64)
    assert torch.allclose(u @ u.T, eye, atol=1e-12)
    w_rot = u @ w.double() @ v.T
    peak = float(w.abs().max() / w.pow(2).mean().sqrt())
    assert float(w_rot.abs().max() / w_rot.pow(2).mean().sqrt()) < peak / 5
    # At 8 bits the decoded weight is the original up to the grid's small error: the
    # decoder's U^T Q V is the exact inverse of the encoder's U W V^T.
    _, w_hat = _code(w, _book("uniform", 8), seed=3)
    assert float((w_hat - w).pow(2).sum() / w.pow(2).sum()) < 1e-4
    # Decoding with rotations from another seed gives garbage: the seed is what undoes it.
    enc, _ = _code(w, _book("uniform", 8), seed=3)
    other = decode(dataclasses.replace(enc, sections={**enc.sections, "seed": b"\4\0\0\0"}))
    assert float((other - w).pow(2).sum() / w.pow(2).sum()) > 0.5


# ---------------------------------------------------------------------------------------
# Block LDLQ and the codebook
# ---------------------------------------------------------------------------------------


def _plain_block_ldlq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, book: Codebook):
    """The textbook sequence: fix one block of columns, then give the remaining columns
    the optimal correction -E_b [Hinv_bb]^-1 Hinv_bF, with Hinv the explicit inverse of the
    Hessian restricted to the columns not yet fixed."""
    w = w.double().clone()
    cols = w.shape[1]
    d = book.dim
    hd = h + 0.01 * float(torch.diag(h).mean()) * torch.eye(cols, dtype=torch.float64)
    codes = []
    for j in range(0, cols, d):
        q, c = _quantize_columns(w[:, j : j + d], scale, book, j)
        codes.append(c)
        hinv = torch.linalg.inv(hd[j:, j:])
        err = w[:, j : j + d] - q
        w[:, j + d :] -= err @ torch.linalg.solve(hinv[:d, :d], hinv[:d, d:])
    return np.concatenate(codes, axis=1)


@pytest.mark.parametrize(("kind", "block_size"), [("e8", 128), ("e8", 24), ("uniform", 16)])
def test_block_ldlq_matches_the_plain_explicit_inverse_algorithm(kind, block_size):
    w, h = _layer_problem(rows=24, cols=64, seed=3)
    book = _book(kind, 2)
    scale = fit_scales(w.double(), book)
    codes, _, _ = block_ldlq(w.double(), h, scale, book, damp=0.01, block_size=block_size)
    plain = _plain_block_ldlq(w, h, scale, book)
    # A point near a Voronoi boundary may go either way under rounding differences.
    assert (codes == plain).mean() > 0.97


@pytest.mark.parametrize("kind", ["e8", "uniform"])
def test_ldlq_output_error_beats_no_feedback_and_rtn_at_the_same_rate(kind):
    w, h = _layer_problem(rows=64, cols=128, seed=4)
    layer = nn.Linear(128, 64, bias=False)
    layer.weight.data.copy_(w)
    plugin = QuIP(bits=2, codebook=kind)
    enc, stats = plugin.quantize_into(layer, h, plugin.book, "blocks.0.mlp.down_proj")
    e = w - layer.weight.data
    assert stats["output_rel_err"] == pytest.approx(
        float(torch.einsum("ij,jk,ik->", e.double(), h, e.double()))
        / float(torch.einsum("ij,jk,ik->", w.double(), h, w.double())),
        rel=1e-4,
    )
    assert stats["output_rel_err"] < 0.75 * stats["nofeedback_output_rel_err"]
    assert stats["nofeedback_output_rel_err"] < stats["rtn_output_rel_err"]
    assert torch.equal(decode(enc), layer.weight.data)  # what the model holds is the decode


def test_e8_beats_a_uniform_scalar_grid_at_two_bits_on_gaussian_rows():
    x = np.random.default_rng(5).standard_normal((4096, 8))
    mse = {}
    for kind in ("e8", "uniform"):
        book = _book(kind, 2)
        values, _ = quantize_unit(x.reshape(-1, book.dim), book)
        mse[kind] = float(((values.reshape(x.shape) - x) ** 2).mean())
    # Lloyd-Max's 4-level scalar quantizer reaches 0.1175; the 5-shell E8 ball about 0.098
    # at the same 16 bits per 8 weights (Gaussian D(2) = 0.0625).
    assert mse["uniform"] > 0.115
    assert mse["e8"] < 0.9 * mse["uniform"]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"bits": 5}, "bits"),
        ({"codebook": "uniform", "bits": 9}, "bits"),
        ({"codebook": "pq"}, "codebook"),
        ({"group_size": 12}, "group_size"),
        ({"rotation": "dct"}, "rotation"),
        ({"damp": 1.5}, "damp"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, argument):
    with pytest.raises(ConfigError) as info:
        QuIP(**kwargs)
    assert info.value.argument == argument


# ---------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offload",
    [[], ["compressor.offload_weights=true", "compressor.offload_activations=true"]],
    ids=["in_memory", "offloaded"],
)
def test_runs_through_the_runner_and_the_container_decodes_to_the_model(compose_cfg, offload):
    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=default",
            "compressor=quip",
            "~analyzer",
            "logger=none",
            *offload,
        ]
    )
    result = run(cfg)
    (stage,) = [s for s in result.stages if s.kind == "compressor"]
    decoded = read_container(stage.artifacts["compressed"])
    weights = dict(result.model.state_dict())
    assert len(decoded) == 14  # 2 blocks x 7 linears
    for name, tensor in decoded.items():
        assert torch.equal(tensor, weights[name]), name
    m = stage.metrics
    assert m["nominal_bits"] == 2.0
    # 16 bits per 8 weights, plus one fp16 scale per row (0.25 bit at 64 columns) and a
    # 4-byte seed per tensor.
    assert 2.1 < m["actual_bits"] < 2.3
    assert m["actual_bits"] == pytest.approx(
        container_size(stage.artifacts["compressed"])["bits_per_weight"]
    )
    assert m["output_relative_error"] < m["nofeedback_output_relative_error"]
    assert m["output_relative_error"] < m["rtn_output_relative_error"]
    assert math.isfinite(m["mean_gap_bits"])
    # Every layer's certified output bound holds (bound / measured >= 1).
    assert m["bound_ratio_min"] >= 1.0
    assert m["bound_ratio_max"] < 1e4


def test_rotation_none_is_the_identity_and_round_trips() -> None:
    """rotation=none: the same codebook on the raw weights (the incoherence ablation); the
    codec decodes it without any rotation."""
    from framework.codecs.incoherent import rotation_kind, rotations

    assert rotation_kind(576, "none") == "identity"
    u, v = rotations(6, 16, 123, "identity", "identity")
    assert torch.equal(u, torch.eye(6, dtype=torch.float64))
    assert torch.equal(v, torch.eye(16, dtype=torch.float64))
    QuIP(bits=2, rotation="none")  # accepted
    with pytest.raises(ConfigError, match="rotation"):
        QuIP(bits=2, rotation="random")
