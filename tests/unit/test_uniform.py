"""The uniform codec: the model's w_hat and the container's decode agree bit for bit, the
grid has at most 2^b levels per group, error falls with bits, and the rate is exactly the
hand-counted b + side information per weight (short last group included)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from framework.codecs import container_size, read_container, write_container
from framework.codecs.packing import unpack_bits
from framework.codecs.uniform import UniformGrid, decode, encode, fit_params

ROWS = 8  # a multiple of 8: every packed section is whole bytes, so rates are exact


def weight(rows: int = ROWS, cols: int = 40, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, 3] = 0.4  # an outlier, as real weights have
    return w


# (cols, group_size): divides, does not divide (short last group), per-channel,
# group wider than the row.
SHAPES = [(48, 16), (40, 16), (40, 12), (40, None), (40, 64)]
GRID_CASES = list(itertools.product(range(2, 9), SHAPES, [False, True]))


def grid_id(case: tuple) -> str:
    bits, (cols, g), sym = case
    return f"b{bits}-c{cols}-g{g}-{'sym' if sym else 'asym'}"


@pytest.mark.parametrize("case", GRID_CASES, ids=[grid_id(c) for c in GRID_CASES])
def test_decode_equals_w_hat_bit_exactly(case: tuple) -> None:
    bits, (cols, group), symmetric = case
    grid = UniformGrid(bits=bits, group_size=group, symmetric=symmetric)
    w = weight(cols=cols, seed=bits)
    enc, w_hat = encode(w, grid)
    assert enc.shape == (ROWS, cols)
    assert w_hat.shape == w.shape
    assert torch.equal(decode(enc), w_hat)
    assert not torch.equal(w_hat, w)  # it did quantize
    # codes fit the grid
    codes = unpack_bits(enc.sections["codes"], bits, ROWS * cols)
    assert int(codes.max()) <= (1 << bits) - 1
    assert ("zeros" in enc.sections) is (not symmetric)


@pytest.mark.parametrize("case", GRID_CASES, ids=[grid_id(c) for c in GRID_CASES])
def test_at_most_2_pow_bits_levels_per_group(case: tuple) -> None:
    bits, (cols, group), symmetric = case
    grid = UniformGrid(bits=bits, group_size=group, symmetric=symmetric)
    w = torch.randn(ROWS, cols, generator=torch.Generator().manual_seed(1))  # many distinct values
    _, w_hat = encode(w, grid)
    g = group or cols
    starts = list(range(0, cols, g))
    assert len(starts) == grid.groups(cols)
    for r in range(ROWS):
        for s in starts:
            levels = torch.unique(w_hat[r, s : s + g]).numel()
            assert levels <= 1 << bits, (r, s, levels)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("cols", "group"), SHAPES)
def test_error_decreases_with_bits(cols: int, group: int | None, symmetric: bool) -> None:
    w = torch.randn(64, cols, generator=torch.Generator().manual_seed(2))
    errors = []
    for bits in range(2, 9):
        _, w_hat = encode(w, UniformGrid(bits=bits, group_size=group, symmetric=symmetric))
        errors.append(float((w_hat - w).pow(2).mean()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3 * float(w.pow(2).mean())


@pytest.mark.parametrize("symmetric", [False, True])
def test_short_last_group_has_its_own_scale(symmetric: bool) -> None:
    """cols=40, group 16: groups of 16, 16 and 8. A tiny-range last group must be
    quantized on its own fine grid, not the wide one of its neighbours."""
    w = weight(cols=40)
    w[:, :32] *= 100.0
    grid = UniformGrid(bits=3, group_size=16, symmetric=symmetric)
    scale, _ = fit_params(w, grid)
    assert scale.shape == (ROWS, 3)
    _, w_hat = encode(w, grid)
    err_last = (w_hat[:, 32:] - w[:, 32:]).abs()
    assert torch.all(err_last <= scale[:, 2:3] + 1e-9)
    assert float(scale[:, 2].max()) < float(scale[:, :2].min()) / 10


def test_all_zero_weight_is_exact() -> None:
    w = torch.zeros(ROWS, 40)
    for sym in (False, True):
        enc, w_hat = encode(w, UniformGrid(bits=3, group_size=16, symmetric=sym))
        assert torch.equal(w_hat, w)
        assert torch.equal(decode(enc), w)


def test_given_codes_and_params_are_used_verbatim() -> None:
    """GPTQ hands over its own codes: encode must store exactly those."""
    w = weight(cols=40)
    grid = UniformGrid(bits=4, group_size=16, symmetric=False)
    scale, zero = fit_params(w, grid)
    codes = torch.randint(0, 16, (ROWS, 40), generator=torch.Generator().manual_seed(3)).float()
    enc, w_hat = encode(w, grid, codes=codes, scale=scale, zero=zero)
    stored = unpack_bits(enc.sections["codes"], 4, ROWS * 40).reshape(ROWS, 40)
    np.testing.assert_array_equal(stored, codes.numpy().astype(np.uint8))
    assert torch.equal(decode(enc), w_hat)


def test_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode(torch.zeros(4, 4, 4), UniformGrid(bits=4, group_size=4, symmetric=False))


# (cols, group_size, number of groups per row counted by hand)
RATE_CASES = [(48, 16, 3), (40, 16, 3), (40, 12, 4), (40, None, 1), (96, 32, 3)]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("cols", "group", "groups"), RATE_CASES)
def test_bits_per_weight_matches_hand_count(tmp_path, cols, group, groups, bits, symmetric) -> None:
    """Per weight: b code bits, plus per group one fp16 scale (16 bits) and, asymmetric,
    one b-bit zero point; a short last group counts as a whole group."""
    enc, _ = encode(
        weight(cols=cols), UniformGrid(bits=bits, group_size=group, symmetric=symmetric)
    )
    side_bits_per_group = 16 + (0 if symmetric else bits)
    expected = bits + groups * side_bits_per_group / cols
    if group is not None and cols % group == 0:
        assert expected == pytest.approx(bits + side_bits_per_group / group)  # b + (16[+b])/g
    size = container_size(write_container(tmp_path / "c", {"w": enc}))
    assert size["coded_weights"] == ROWS * cols
    assert size["payload_bytes"] * 8 == ROWS * cols * expected
    assert size["bits_per_weight"] == pytest.approx(expected, rel=1e-12)


def test_short_group_side_info_is_counted(tmp_path) -> None:
    """40 columns in groups of 16 cost 3 groups of side information, not 40/16 = 2.5."""
    bits = 3
    enc, _ = encode(weight(cols=40), UniformGrid(bits=bits, group_size=16, symmetric=False))
    bpw = container_size(write_container(tmp_path / "c", {"w": enc}))["bits_per_weight"]
    assert bpw == pytest.approx(bits + 3 * (16 + bits) / 40)
    assert bpw > bits + (16 + bits) / 16


@pytest.mark.parametrize("symmetric", [False, True])
def test_container_round_trip_is_bit_exact(tmp_path, symmetric: bool) -> None:
    tensors, expected = {}, {}
    for i, (cols, group) in enumerate(SHAPES):
        enc, w_hat = encode(weight(cols=cols, seed=i), UniformGrid(3, group, symmetric))
        tensors[f"t{i}"], expected[f"t{i}"] = enc, w_hat
    out = read_container(write_container(tmp_path / "c", tensors))
    assert set(out) == set(expected)
    for name, w_hat in expected.items():
        assert torch.equal(out[name], w_hat), name


# ---- float_zero: the fp16 group minimum as offset (GGUF Q4_1's min-scale form) ----------


def q4_1_weight(rows: int = ROWS, cols: int = 64, block: int = 32, seed: int = 0) -> torch.Tensor:
    """A weight built the way GGUF dequantizes Q4_1: per block of `block` columns an fp16
    scale d and fp16 minimum m, 4-bit codes using both ends of the range, w = d * q + m."""
    g = torch.Generator().manual_seed(seed)
    blocks = cols // block
    d = (torch.rand(rows, blocks, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(rows, blocks, 1, generator=g) * 0.08).half().float()
    q = torch.randint(0, 16, (rows, blocks, block), generator=g).float()
    q[..., 0], q[..., 1] = 0.0, 15.0  # Q4_1's d = (max - min) / 15: both ends are used
    return (d * q + m).view(rows, cols)


def test_float_zero_reproduces_a_q4_1_weight_exactly() -> None:
    w = q4_1_weight()
    exact, w_hat = encode(w, UniformGrid(bits=4, group_size=32, symmetric=False, float_zero=True))
    assert torch.equal(w_hat, w)
    assert torch.equal(decode(exact), w)
    # The integer zero point cannot express an arbitrary fp16 minimum: not exact there.
    _, w_int = encode(w, UniformGrid(bits=4, group_size=32, symmetric=False))
    assert not torch.equal(w_int, w)
    # 4-bit codes + fp16 scale + fp16 minimum per 32 weights = 5 bits per weight.
    assert 8 * exact.nbytes() / w.numel() == pytest.approx(5.0)


@pytest.mark.parametrize("cols,group", [(40, 16), (40, 12), (40, None), (48, 16)])
def test_float_zero_round_trips_and_ignores_padding(cols: int, group: int | None) -> None:
    grid = UniformGrid(bits=3, group_size=group, symmetric=False, float_zero=True)
    w = weight(cols=cols) + 1.0  # all positive: a 0-inclusive or padded range would show
    enc, w_hat = encode(w, grid)
    assert enc.params["float_zero"] is True
    assert torch.equal(decode(enc), w_hat)
    scale, zero = fit_params(w, grid)
    assert float(zero.min()) > 0.5  # the minimum of the real columns, not of zero padding
    step = scale[:, grid.column_groups(cols)]
    assert bool(((w_hat - w).abs() <= step / 2 + 1e-3).all())


def test_float_zero_corrupt_zeros_section_is_refused() -> None:
    enc, _ = encode(weight(cols=48), UniformGrid(3, 16, False, float_zero=True))
    enc.sections["zeros"] = enc.sections["zeros"][:-2]
    with pytest.raises(ValueError, match="zeros section"):
        decode(enc)


def test_rtn_refuses_float_zero_on_a_symmetric_grid() -> None:
    from framework.errors import ConfigError
    from plugins.compressors.rtn import RTN

    with pytest.raises(ConfigError, match="float_zero"):
        RTN(bits=4, group_size=32, symmetric=True, float_zero=True)
