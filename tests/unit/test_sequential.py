"""framework.sequential: the pieces of the sequential quantization driver that GPTQ and QuIP
share beyond the driver itself (which tests/plugins/test_gptq.py and test_quip.py run end to
end): output errors, linear groups and per-role summaries."""

from __future__ import annotations

import pytest
import torch

from framework.models.arch import ARCH_MAPS
from framework.sequential import (
    errors_by_role,
    relative_output_errors,
    sequential_groups,
)


def test_relative_output_errors_measure_in_the_inputs_metric() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    x[:, 3] *= 10.0  # one input far larger than the others
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(8, 16, generator=g)
    off_big, off_small = w.clone(), w.clone()
    off_big[:, 3] += 0.1
    off_small[:, 4] += 0.1
    exact, zero, big, small = relative_output_errors(
        w, h, w, torch.zeros_like(w), off_big, off_small
    )
    assert exact == 0.0 and zero == pytest.approx(1.0)
    # The same weight error costs ~100x more on the input that is 10x larger.
    assert big / small == pytest.approx(100.0, rel=0.3)
    direct = ((x @ (w - off_big).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()
    assert big == pytest.approx(direct, rel=1e-4)


def test_sequential_groups_follow_the_forward_order() -> None:
    llama = ARCH_MAPS["llama"]
    groups = sequential_groups(llama, true_sequential=True)
    assert groups == [
        (llama.q, llama.k, llama.v),
        (llama.o,),
        tuple(llama.mlp_in),
        (llama.mlp_out,),
    ]
    (together,) = sequential_groups(llama, true_sequential=False)
    assert together == tuple(n for g in groups for n in g)


def test_errors_by_role_average_each_role() -> None:
    rows = [
        {"role": "q", "weight_rel_mse": 1.0, "output_rel_err": 2.0, "rtn_output_rel_err": 4.0},
        {"role": "q", "weight_rel_mse": 3.0, "output_rel_err": 4.0, "rtn_output_rel_err": 6.0},
        {"role": "down", "weight_rel_mse": 5.0, "output_rel_err": 6.0, "rtn_output_rel_err": 7.0},
    ]
    by_role = {r["role"]: r for r in errors_by_role(rows)}
    assert by_role["q"] == {
        "role": "q",
        "layers": 2,
        "weight_rel_mse": 2.0,
        "output_rel_err": 3.0,
        "rtn_output_rel_err": 5.0,
    }
    assert by_role["down"]["layers"] == 1 and by_role["down"]["output_rel_err"] == 6.0
