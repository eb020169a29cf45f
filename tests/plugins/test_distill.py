"""The distillation stage in one process: it pulls the student towards the teacher, and on
quantized weights (auto) it trains only norm scales and biases, so the grid is kept."""

from __future__ import annotations

import pytest
import torch

from framework.lightning.spec import TrainerSpec
from framework.models import build_tiny_llama
from plugins.editors.distill import Distill


def _kl_to(student: torch.nn.Module, teacher: torch.nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        p = teacher(input_ids=windows).logits.log_softmax(-1)
        q = student(input_ids=windows).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("on_grid", [False, True])
def test_distill_moves_towards_the_teacher(on_grid: bool, tiny, make_ctx, tmp_path) -> None:
    ctx = make_ctx(tiny, tmp_path, stage_name="distill")
    ctx.reference = build_tiny_llama(seed=1).model.eval()
    ctx.trainer = TrainerSpec(max_steps=15, batch_size=2)
    ctx.weights_on_grid = on_grid
    windows = ctx.calibration()
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    kl_before = _kl_to(tiny.model, ctx.reference, windows)

    result = Distill(lr=3e-3).edit(tiny.model, ctx)

    kl_after = _kl_to(tiny.model, ctx.reference, windows)
    assert kl_after < kl_before
    assert result.metrics["loss_last"] < result.metrics["loss_first"]
    changed = {k for k, v in tiny.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    if on_grid:  # norms only: every linear weight is untouched
        assert all("norm" in k for k in changed), changed
    else:
        assert any("proj" in k for k in changed)
    assert (tmp_path / "distill" / "loss.png").exists()


def test_a_time_budget_stops_training_early(tiny, make_ctx, tmp_path) -> None:
    """trainer.max_minutes ends the loop before max_steps, and the stage reports the steps
    it took, not the ones it was allowed."""
    ctx = make_ctx(tiny, tmp_path, stage_name="distill")
    ctx.reference = build_tiny_llama(seed=1).model.eval()
    ctx.trainer = TrainerSpec(max_steps=100_000, max_minutes=0.05, batch_size=2)
    result = Distill(lr=3e-3).edit(tiny.model, ctx)
    steps = result.metrics["steps"]
    assert 1 <= steps < 100_000 and result.metrics["max_steps"] == 100_000
    assert len(result.tables["loss"]) == steps


def test_warmup_scales_the_first_steps(tiny, make_ctx, tmp_path) -> None:
    """Adam's first step moves a weight by about lr whatever its gradient's size; with
    warmup_steps=4 the first step's lr is lr / 4, so the largest change is about a quarter."""
    moved = {}
    for warmup in (0, 4):
        loaded = build_tiny_llama(seed=0)
        ctx = make_ctx(loaded, tmp_path / str(warmup), stage_name="distill")
        ctx.reference = build_tiny_llama(seed=1).model.eval()
        ctx.trainer = TrainerSpec(max_steps=1, batch_size=2, gradient_clip_val=None)
        before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        Distill(lr=1e-3, warmup_steps=warmup).edit(loaded.model, ctx)
        moved[warmup] = max(
            float((v - before[k]).abs().max()) for k, v in loaded.model.state_dict().items()
        )
    assert moved[0] == pytest.approx(1e-3, rel=0.05)
    assert moved[4] == pytest.approx(moved[0] / 4, rel=0.05)


def test_seq_len_cuts_the_windows(tiny, make_ctx, tmp_path) -> None:
    """seq_len=16 turns each 64-token calibration window into 4 training sequences: with
    the same batch size a step sees a quarter of the tokens, and the stage still trains."""
    from framework.errors import ConfigError

    ctx = make_ctx(tiny, tmp_path, stage_name="distill")
    ctx.reference = build_tiny_llama(seed=1).model.eval()
    ctx.trainer = TrainerSpec(max_steps=6, batch_size=2)
    seen: list[tuple[int, ...]] = []
    hook = tiny.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            tuple(
                (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape
            )
        ),
        with_kwargs=True,
    )
    try:
        result = Distill(lr=3e-3, seq_len=16).edit(tiny.model, ctx)
    finally:
        hook.remove()
    assert seen and all(shape[-1] == 16 for shape in seen)
    assert result.metrics["loss_last"] < result.metrics["loss_first"]
    with pytest.raises(ConfigError, match="seq_len"):
        Distill(seq_len=65).edit(tiny.model, ctx)


def test_it_trains_on_the_training_windows_when_the_run_names_some(
    tiny, make_ctx, tmp_path, tiny_windows
) -> None:
    """With data.training set, the student sees those windows and never the calibration
    ones; without it, the calibration ones (Context.training falls back)."""
    ctx = make_ctx(tiny, tmp_path, stage_name="distill")
    ctx.reference = build_tiny_llama(seed=1).model.eval()
    ctx.trainer = TrainerSpec(max_steps=2, batch_size=2)
    assert torch.equal(ctx.training(), ctx.calibration())
    training = tiny_windows["evaluation"][:, :48].clone()  # other text, other length
    ctx.training_loader = lambda: training.clone()
    seen: list[torch.Tensor] = []
    hook = tiny.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        ),
        with_kwargs=True,
    )
    try:
        Distill(lr=3e-3).edit(tiny.model, ctx)
    finally:
        hook.remove()
    assert seen
    assert all(any(torch.equal(row, t) for t in training) for batch in seen for row in batch)
    assert torch.equal(ctx.training(1), training[:1])


def test_bad_values_are_refused() -> None:
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="lr"):
        Distill(lr=0)
    with pytest.raises(ConfigError, match="windows"):
        Distill(windows=0)
    with pytest.raises(ConfigError, match="warmup_steps"):
        Distill(warmup_steps=-1)
    with pytest.raises(ConfigError, match="seq_len"):
        Distill(seq_len=1)
    # a non-integer is refused where config arrives (YAML); Python callers are trusted for types
    from omegaconf import OmegaConf

    from framework.config import check_node
    from framework.errors import SculptError

    node = OmegaConf.create({"_target_": "plugins.editors.distill.Distill", "warmup_steps": 2.5})
    with pytest.raises(SculptError, match=r"^editor\.warmup_steps: 2\.5 is not a valid int"):
        check_node(node, "editor")
