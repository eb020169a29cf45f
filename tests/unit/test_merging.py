"""framework.transforms.merging: a duplicated unit is merged at no cost, least-squares
compensation beats plain removal of the same units, groups (heads) work alike, and bad
arguments are refused."""

from __future__ import annotations

import pytest
import torch

from framework.errors import SculptError
from framework.transforms.merging import merge_units


def _layer(cols: int = 48, out: int = 24, tokens: int = 2000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Correlated activations, as a real layer's are.
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    a = torch.randn(tokens, cols, generator=g) @ mix
    w = torch.randn(out, cols, generator=g)
    return a, w


def _output_error(a: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    ref = a.double() @ w.double().T
    return float((a.double() @ w_new.double().T - ref).norm() / ref.norm())


def test_a_duplicated_neuron_is_merged_into_its_twin_without_error():
    a, w = _layer()
    a[:, 30] = -1.5 * a[:, 11]  # neuron 30 is a scaled copy of 11
    res = merge_units(w, a.T @ a, 1, damp=0.0)  # singular: damped just enough
    assert int(res.removed[0]) in (11, 30)
    assert res.twin_cosine == pytest.approx(1.0, abs=1e-6)
    gone = int(res.removed[0])
    assert torch.all(res.weight[:, gone] == 0)
    assert _output_error(a, w, res.weight) < 1e-4
    # The merge is the twin's column absorbing the removed one's, scaled.
    twin = 11 if gone == 30 else 30
    scale = -1.5 if gone == 30 else -1 / 1.5
    torch.testing.assert_close(
        res.weight[:, twin], w[:, twin] + scale * w[:, gone], atol=1e-3, rtol=1e-3
    )


@pytest.mark.parametrize("unit_size", [1, 8])
def test_compensation_beats_plain_removal_of_the_same_units(unit_size):
    a, w = _layer()
    h = a.T @ a
    merged = merge_units(w, h, 2, unit_size=unit_size)
    plain = w.clone()
    cols = (merged.removed[:, None] * unit_size + torch.arange(unit_size)).flatten()
    plain[:, cols] = 0.0
    assert _output_error(a, w, merged.weight) < 0.7 * _output_error(a, w, plain)
    # The reported error is the measured one (H is A^T A here).
    assert merged.relative_error == pytest.approx(_output_error(a, w, merged.weight) ** 2, 1e-3)
    # Greedy removal without compensation picks by the same cost and only zeroes.
    bare = merge_units(w, h, 2, unit_size=unit_size, compensate=False)
    kept = torch.ones(w.shape[1], dtype=torch.bool)
    kept[(bare.removed[:, None] * unit_size + torch.arange(unit_size)).flatten()] = False
    torch.testing.assert_close(bare.weight[:, kept], w[:, kept])


def test_a_duplicated_head_is_merged_without_error():
    a, w = _layer(cols=32)
    a[:, 24:32] = a[:, 8:16] @ torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    res = merge_units(w, a.T @ a, 1, unit_size=8, damp=0.0)
    assert int(res.removed[0]) in (1, 3)  # either of the pair carries the other
    assert _output_error(a, w, res.weight) < 1e-4


def test_removing_nothing_changes_nothing_and_bad_arguments_are_refused():
    a, w = _layer()
    res = merge_units(w, a.T @ a, 0)
    assert torch.equal(res.weight, w) and res.removed.numel() == 0 and res.cost == 0.0
    with pytest.raises(SculptError, match="Hessian"):
        merge_units(w, torch.eye(5), 1)
    with pytest.raises(SculptError, match="units of 5"):
        merge_units(w, a.T @ a, 1, unit_size=5)
    with pytest.raises(SculptError, match="cannot remove"):
        merge_units(w, a.T @ a, 48)
