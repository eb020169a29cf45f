"""framework.eval.reference_cache: the reference's evaluation stored between runs, under a
key that changes with anything the result depends on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from framework.eval import evaluate_causal_lm
from framework.eval.reference_cache import load_reference, reference_key, save_reference
from framework.run import run

HEAD = "lm_head"


def test_the_key_follows_weights_windows_and_batch_size(tiny, tiny_windows) -> None:
    windows = tiny_windows["evaluation"]
    key = reference_key(tiny.model, windows, 4, HEAD)
    assert key == reference_key(copy.deepcopy(tiny.model), windows.clone(), 4, HEAD)
    changed = copy.deepcopy(tiny.model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-6
    others = {
        reference_key(changed, windows, 4, HEAD),
        reference_key(tiny.model, windows[:, :-1], 4, HEAD),
        reference_key(tiny.model, windows.flip(0), 4, HEAD),
        reference_key(tiny.model, windows, 2, HEAD),
        reference_key(tiny.model, windows, 4, None),
    }
    assert key not in others and len(others) == 5


def test_an_entry_gives_back_the_same_comparisons(tiny, tiny_windows, tmp_path: Path) -> None:
    windows = tiny_windows["evaluation"]
    metrics, cache = evaluate_causal_lm(tiny.model, windows, cache_head=HEAD)
    key = reference_key(tiny.model, windows, 4, HEAD)
    assert load_reference(tmp_path, key, tiny.model, HEAD) is None  # nothing stored yet
    save_reference(tmp_path, key, metrics, cache)
    assert [p.name for p in tmp_path.iterdir()] == [key]  # no staging folder left
    got_metrics, got = load_reference(tmp_path, key, tiny.model, HEAD)
    assert got_metrics == pytest.approx(metrics)
    assert torch.equal(got.hidden, cache.hidden)
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        other.model.layers[0].self_attn.o_proj.weight.mul_(0.5)
    direct = evaluate_causal_lm(other, windows, reference=cache)
    via_disk = evaluate_causal_lm(other, windows, reference=got)
    assert direct["kl"] > 0 and via_disk == pytest.approx(direct)


@pytest.mark.parametrize("damage", ["metrics", "outputs", "nan"])
def test_an_unreadable_entry_is_recomputed_not_trusted(
    tiny, tiny_windows, tmp_path: Path, damage: str, caplog
) -> None:
    windows = tiny_windows["evaluation"]
    metrics, cache = evaluate_causal_lm(tiny.model, windows, cache_head=HEAD)
    key = reference_key(tiny.model, windows, 4, HEAD)
    save_reference(tmp_path, key, metrics, cache)
    if damage == "metrics":
        (tmp_path / key / "metrics.json").write_text("{not json")
    elif damage == "outputs":
        blob = tmp_path / key / "outputs.safetensors"
        blob.write_bytes(blob.read_bytes()[:100])
    else:
        (tmp_path / key / "metrics.json").write_text('{"perplexity": NaN}')
    assert load_reference(tmp_path, key, tiny.model, HEAD) is None
    assert "ignoring unreadable" in caplog.text


def test_a_second_run_takes_the_reference_from_the_cache(compose_cfg, tmp_path: Path) -> None:
    store = tmp_path / "store"
    overrides = ["model=tiny_llama", "debug=default", f"eval.reference_cache={store}"]
    first = run(compose_cfg([*overrides, "paths.output_dir=" + str(tmp_path / "a")]))
    second = run(compose_cfg([*overrides, "paths.output_dir=" + str(tmp_path / "b")]))
    ref_a, ref_b = first.stages[0].eval, second.stages[0].eval
    assert "reference_cached" not in ref_a and ref_b["reference_cached"] == 1.0
    assert ref_b["perplexity"] == ref_a["perplexity"]
    # Every later comparison is against the same reference outputs.
    for stage_a, stage_b in zip(first.stages[1:], second.stages[1:], strict=True):
        for metric in ("kl", "top1_agreement", "perplexity"):
            if metric in stage_a.eval:
                assert stage_b.eval[metric] == pytest.approx(stage_a.eval[metric], rel=1e-6)
    off = run(
        compose_cfg(
            [*overrides[:2], "eval.reference_cache=null", "paths.output_dir=" + str(tmp_path / "c")]
        )
    )
    assert "reference_cached" not in off.stages[0].eval
