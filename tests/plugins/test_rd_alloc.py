"""Rate-distortion allocation end to end on a tiny Llama: the budget is met in bytes
written, the menu is really mixed, the container decodes to the model's weights, GPTQ's
layers carry certified output bounds that hold, and bad settings are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch

from framework.codecs import read_container
from framework.errors import ConfigError
from framework.models import block_linears
from framework.ratedistortion import output_error_bound
from plugins.compressors.rd_alloc import RDAlloc, fisher_diagonal

# `tiny`, `tiny_windows` and `make_ctx` are the shared fixtures of tests/conftest.py.


@pytest.fixture
def calibration(tiny_windows) -> torch.Tensor:
    return tiny_windows["calibration"]


def run(plugin: RDAlloc, tiny, make_ctx, tmp_path):
    model = copy.deepcopy(tiny.model)
    return model, plugin.compress(model, make_ctx(tiny, tmp_path))


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_budget_met_in_bytes_and_container_decodes_to_the_model(
    quantizer, tiny, make_ctx, tmp_path
) -> None:
    plugin = RDAlloc(
        budget_bits=3.3,
        quantizer=quantizer,
        bits_choices=[2, 3, 4],
        group_sizes=[32, None],
        sensitivity_windows=4,
        calibration_windows=4,
    )
    model, result = run(plugin, tiny, make_ctx, tmp_path)
    rows = result.tables["allocation"]
    linears = block_linears(model, tiny.arch)
    assert len(rows) == len(linears)
    sizes = [linears[r["layer"]].weight.numel() for r in rows]
    achieved = sum(r["rate"] * n for r, n in zip(rows, sizes)) / sum(sizes)
    assert achieved <= 3.3 + 1e-9
    assert achieved > 3.0  # the budget was spent, not left on the table
    assert result.metrics["bits_per_weight_linears"] == pytest.approx(achieved)
    assert result.metrics["nominal_bits"] == 3.3
    assert len({(r["bits"], r["group_size"]) for r in rows}) > 1  # a real mix
    decoded = read_container(result.artifacts["compressed"])
    for name, layer in linears.items():
        assert torch.equal(decoded[f"{name}.weight"], layer.weight.data)
    # Sensitive layers (per weight) do not get fewer bits than insensitive ones on average.
    by_sens = sorted(rows, key=lambda r: r["sensitivity"])
    half = len(by_sens) // 2
    low = sum(r["rate"] for r in by_sens[:half]) / half
    high = sum(r["rate"] for r in by_sens[half:]) / (len(by_sens) - half)
    assert high >= low
    if quantizer == "gptq":
        for r in rows:
            assert r["output_bound"] >= r["output_error"] * (1 - 1e-9)
            assert r["bound_ratio"] >= 1 - 1e-9
        assert result.metrics["bound_ratio_min"] >= 1 - 1e-9
    assert result.plots["allocation"].exists()


def test_allocation_beats_the_uniform_grid_it_could_have_chosen(
    tiny, calibration, make_ctx, tmp_path
):
    """At the budget of a uniform 3-bit g32 grid, the allocated predicted weighted
    distortion is at most that grid's (it is on the menu), and here strictly lower."""
    from framework.codecs.uniform import UniformGrid, encode

    model = copy.deepcopy(tiny.model)
    linears = block_linears(model, tiny.arch)
    grid = UniformGrid(3, 32, False)
    fisher = fisher_diagonal(model, linears, calibration[:4])
    uniform_bits, uniform_d, n = 0.0, 0.0, 0
    for name, layer in linears.items():
        w = layer.weight.detach().float()
        enc, w_hat = encode(w, grid)
        uniform_bits += 8.0 * enc.nbytes()
        uniform_d += float((fisher[name] * (w - w_hat).pow(2)).sum())
        n += w.numel()
    plugin = RDAlloc(
        budget_bits=uniform_bits / n,
        quantizer="rtn",
        bits_choices=[2, 3, 4, 5],
        group_sizes=[32],
        sensitivity_windows=4,
    )
    _, result = run(plugin, tiny, make_ctx, tmp_path)
    assert result.metrics["predicted_weighted_distortion"] < uniform_d


def test_fisher_is_the_mean_squared_gradient(tiny, calibration) -> None:
    model = copy.deepcopy(tiny.model)
    linears = block_linears(model, tiny.arch)
    name = next(iter(linears))
    fisher = fisher_diagonal(model, linears, calibration[:2])
    flags = [p.requires_grad for p in model.parameters()]
    weight = linears[name].weight
    weight.requires_grad_(True)
    expected = torch.zeros_like(weight)
    for window in calibration[:2]:
        with torch.enable_grad():
            loss = model(input_ids=window[None], labels=window[None]).loss
            (grad,) = torch.autograd.grad(loss, [weight])
        expected += grad.pow(2) / 2
    torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-12)
    weight.requires_grad_(flags[[p is weight for p in model.parameters()].index(True)])
    # fisher_diagonal left every parameter's requires_grad as it found it.
    fisher_diagonal(model, linears, calibration[:1])
    assert [p.requires_grad for p in model.parameters()] == flags


def test_output_error_bound_holds_and_is_tight_on_its_worst_case() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g) * torch.linspace(0.1, 3.0, 16)
    h = 2 * x.T @ x / 500
    w = torch.randn(8, 16, generator=g)
    for _ in range(5):
        e = torch.randn(8, 16, generator=g) * 0.01
        b = output_error_bound(w, w - e, h)
        assert b["output_bound"] >= b["output_error"]
        assert b["output_error"] == pytest.approx(
            float(((e.double() @ h.double()) * e.double()).sum())
        )
    # E = u v^T with v the top eigenvector of H: both bounds are attained (ratio 1).
    v = torch.linalg.eigh(h.double())[1][:, -1].float()
    e = torch.outer(torch.randn(8, generator=g), v) * 0.01
    b = output_error_bound(w, w - e, h)
    assert b["bound_ratio"] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"quantizer": "awq"}, "quantizer"),
        ({"sensitivity": "hessian"}, "sensitivity"),
        ({"bits_choices": [1, 3]}, "bits_choices"),
        ({"group_sizes": [0]}, "group_sizes"),
        ({"bits_choices": []}, "bits_choices"),
        ({"budget_bits": -1}, "budget_bits"),
        ({"damp": 2.0}, "damp"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        RDAlloc(**kwargs)


def test_budget_below_every_option_names_budget_bits(tiny, make_ctx, tmp_path) -> None:
    plugin = RDAlloc(
        budget_bits=1.5, quantizer="rtn", bits_choices=[2], group_sizes=[32], sensitivity="none"
    )
    with pytest.raises(ConfigError, match=r"^budget_bits: .*below the cheapest"):
        run(plugin, tiny, make_ctx, tmp_path)
