"""Hooks through the ArchMap: capture and patch are exact where they must be."""

from __future__ import annotations

import pytest
import torch

from framework.errors import SculptError
from framework.interventions import (
    capture,
    lens_logits,
    patch,
    residual_stream,
    run_from,
    set_positions,
    site_module,
)
from framework.models import ARCH_MAPS
from plugins.analyzers.causal_trace import subject_positions


@pytest.fixture
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 200, (2, 12), generator=gen)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_residual_is_the_sum_of_embedding_and_increments(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    keys = [("embed", 0)] + [(s, i) for i in range(2) for s in ("residual", "attn", "mlp")]
    with capture(model, arch, keys) as store, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h = store[("embed", 0)]
    for i in range(2):
        h = h + store[("attn", i)] + store[("mlp", i)]
        torch.testing.assert_close(h, store[("residual", i)], rtol=1e-5, atol=1e-5)


def test_patching_clean_activations_into_the_clean_run_changes_nothing(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    keys = [(s, i) for i in range(2) for s in ("residual", "attn", "mlp")]
    with capture(model, arch, keys) as store:
        clean = _logits(model, ids)
    pos = torch.arange(ids.shape[1])
    patches = {k: set_positions(store[k][0], pos) for k in keys}
    with patch(model, arch, patches):
        patched = _logits(model, ids[:1])
    assert torch.equal(patched, clean[:1])


def test_patching_changes_what_it_should(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    clean = _logits(model, ids)
    with patch(model, arch, {("mlp", 0): lambda out: out * 0}):
        ablated = _logits(model, ids)
    assert not torch.allclose(ablated, clean)
    # hooks are gone after the block
    assert torch.equal(_logits(model, ids), clean)


def test_restoring_the_last_layer_recovers_the_clean_run_exactly(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    with capture(model, arch, [("residual", 1)]) as store:
        clean = _logits(model, ids)
    other = torch.flip(ids, dims=[1])
    pos = torch.tensor([ids.shape[1] - 1])
    restore = set_positions(store[("residual", 1)][:, -1], pos, rows=torch.arange(2))
    with patch(model, arch, {("residual", 1): restore}):
        restored = _logits(model, other)
    assert torch.equal(restored[:, -1], clean[:, -1])


def test_lens_on_the_last_layer_is_the_model_output(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    stream = residual_stream(model, arch, ids)
    with torch.no_grad():
        torch.testing.assert_close(lens_logits(model, arch, stream[1]), _logits(model, ids))


def test_unsupported_family_is_a_clear_error(tiny) -> None:
    with pytest.raises(SculptError, match="llama family only"):
        site_module(tiny.model, ARCH_MAPS["opt"], "residual", 0)
    with pytest.raises(SculptError, match="site"):
        site_module(tiny.model, tiny.arch, "mlp_in", 0)
    with pytest.raises(SculptError, match="layer: 5"):
        site_module(tiny.model, tiny.arch, "mlp", 5)


def test_subject_positions(tiny) -> None:
    # byte-level tokenizer: one token per character
    assert subject_positions(tiny.tokenizer, "The Eiffel Tower is", "Eiffel") == list(range(4, 10))


def test_run_from_a_block_matches_the_full_run(tiny, ids) -> None:
    model, arch = tiny.model.eval(), tiny.arch
    with capture(model, arch, [("residual", 0)]) as store:
        full = _logits(model, ids)
    with torch.no_grad():
        rest = run_from(model, arch, 1, store[("residual", 0)]).logits
    torch.testing.assert_close(rest, full)
    assert len(model.model.layers) == 2  # the short list was only for that call
    assert "layers" not in model.model.__dict__


def test_causal_trace_recovers_the_clean_probability_at_the_last_layer(tiny, ctx) -> None:
    from plugins.analyzers.causal_trace import CausalTrace

    trace = CausalTrace(prompt="abcdefgh", subject="bcd", target=None, window=1)
    result = trace.analyze(tiny.model.eval(), ctx)
    rows = result.tables["residual_effect"]
    last = rows[-1]
    # restoring the last block's output at the last position is the clean run itself
    effect = list(last.values())[-1]
    assert effect == pytest.approx(
        result.metrics["p_clean"] - result.metrics["p_corrupted"], abs=1e-4
    )
    # position 0 precedes the subject: identical in both runs, no effect anywhere
    assert all(list(r.values())[1] == 0 for r in rows)
