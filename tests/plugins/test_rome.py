"""ROME editor on the tiny Llama: the rank-one update makes the new object win on the rewrite
prompt, lives in the chosen down_proj only and has rank one per request; bad arguments and
unmet thresholds fail naming the key (also through the runner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.errors import ConfigError, SculptError
from framework.models import LoadedModel
from framework.run import run
from plugins.editors.rome import Rome, last_subject_token, object_logprobs

# The subject ends the prompt and the objects are one byte each: the tiny model has two
# blocks and near-uniform random attention, so a value written at the subject's last token
# of block 1 reaches only that position's logits.
PROMPT = "The favourite fruit of {}"
SUBJECT = "Alice Smith"
CANDIDATES = ("!", "?")
# A random tiny model's MLP outputs are ~1e-3 of its residual stream, so ROME's bound on
# ||delta|| relative to ||W k*|| (and the penalty on it) would forbid any visible change.
UNBOUNDED = {"weight_decay": 0.0, "clamp_norm": 1.0e4}


def write_request(model: LoadedModel, path: Path) -> dict:
    """One request whose true object is the one the (random) model prefers before the edit,
    so the edit has something to overturn."""
    text = PROMPT.format(SUBJECT)
    lp = object_logprobs(
        model.model, model.arch, model.tokenizer, [(text, c) for c in CANDIDATES]
    ).tolist()
    true, new = CANDIDATES if lp[0] > lp[1] else CANDIDATES[::-1]
    row = {
        "subject": SUBJECT,
        "prompt": PROMPT,
        "target_true": true,
        "target_new": new,
        "paraphrase_prompts": [f"The fruit most liked by {SUBJECT}"],
        "neighborhood_prompts": ["The favourite fruit of Bob Jones"],
    }
    path.write_text(json.dumps(row) + "\n")
    return row


def test_edit_overturns_the_fact_with_one_rank_one_update(tiny, ctx, tmp_path) -> None:
    model = tiny.model.eval()
    row = write_request(tiny, tmp_path / "req.jsonl")
    text = PROMPT.format(SUBJECT)
    pairs = [(text, row["target_true"]), (text, row["target_new"])]
    lp_before = object_logprobs(model, tiny.arch, tiny.tokenizer, pairs)
    assert lp_before[0] > lp_before[1]
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    editor = Rome(data=str(tmp_path / "req.jsonl"), layer=1, min_efficacy=1.0, **UNBOUNDED)
    result = editor.edit(model, ctx)

    lp_after = object_logprobs(model, tiny.arch, tiny.tokenizer, pairs)
    assert lp_after[1] > lp_after[0]  # the new object now wins on the rewrite prompt
    m = result.metrics
    assert m["efficacy_before"] == 0.0 and m["efficacy"] == 1.0
    assert m["known_before"] == 1.0
    assert m["p_new"] > m["p_new_before"]
    assert result.tables["requests"][0]["efficacy"] == 1

    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    diff = (model.model.layers[1].mlp.down_proj.weight - weights[changed[0]]).double()
    s = torch.linalg.svdvals(diff)
    assert s[0] > 0 and float(s[1] / s[0]) < 1e-5  # rank one

    # the saved factors reproduce the change exactly
    factors = load_file(result.artifacts["updates"])
    rebuilt = factors["left"].double().T @ factors["right"].double()
    torch.testing.assert_close(rebuilt, diff, rtol=1e-4, atol=1e-6)


def test_requests_apply_one_after_another(tiny, ctx, tmp_path) -> None:
    row = write_request(tiny, tmp_path / "req.jsonl")
    other = {**row, "subject": "Carol White"}
    other["paraphrase_prompts"] = []
    (tmp_path / "req.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    model = tiny.model.eval()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = Rome(data=str(tmp_path / "req.jsonl"), layer=0, mode="sequential", **UNBOUNDED).edit(
        model, ctx
    )
    assert result.metrics["requests"] == 2.0
    diff = (model.model.layers[0].mlp.down_proj.weight - w).double()
    s = torch.linalg.svdvals(diff)
    assert float(s[2] / s[0]) < 1e-5 < float(s[1] / s[0])  # two rank-one updates
    assert load_file(result.artifacts["updates"])["left"].shape[0] == 2


def test_joint_update_meets_every_request_at_once(tiny, ctx, tmp_path) -> None:
    """Two requests with opposite new objects for similar subjects: the joint update maps
    each key to its own value, so neither undoes the other."""
    row = write_request(tiny, tmp_path / "req.jsonl")
    text = PROMPT.format("Carol White")
    lp = object_logprobs(tiny.model, tiny.arch, tiny.tokenizer, [(text, c) for c in CANDIDATES])
    true, new = CANDIDATES if lp[0] > lp[1] else CANDIDATES[::-1]
    other = {**row, "subject": "Carol White", "target_true": true, "target_new": new}
    other["paraphrase_prompts"] = []
    (tmp_path / "req.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    model = tiny.model.eval()
    w = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    result = Rome(data=str(tmp_path / "req.jsonl"), layer=0, mode="joint", **UNBOUNDED).edit(
        model, ctx
    )
    assert result.metrics["joint"] == 1.0
    assert result.metrics["efficacy"] == 1.0  # both requests hold after the one update
    diff = (model.model.layers[0].mlp.down_proj.weight - w).double()
    s = torch.linalg.svdvals(diff)
    assert float(s[2] / s[0]) < 1e-5 < float(s[1] / s[0])  # one rank-two update
    factors = load_file(result.artifacts["updates"])
    rebuilt = factors["left"].double().T @ factors["right"].double()
    torch.testing.assert_close(rebuilt, diff, rtol=1e-4, atol=1e-6)


def test_last_subject_token(tiny) -> None:
    tok = tiny.tokenizer  # byte-level: one token per character
    assert last_subject_token(tok, "The Eiffel Tower is", "Eiffel Tower") == 15
    with pytest.raises(SculptError, match="does not occur"):
        last_subject_token(tok, "The Louvre", "Eiffel")


def test_bad_arguments(tiny, ctx, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^steps"):
        Rome(steps=0)
    with pytest.raises(ConfigError, match=r"^min_efficacy"):
        Rome(min_efficacy=1.5)
    with pytest.raises(ConfigError, match=r"^kl_prompt"):
        Rome(kl_prompt="is a")
    with pytest.raises(ConfigError, match=r"^mode"):
        Rome(mode="batch")
    with pytest.raises(ConfigError, match=r"^layer"):
        Rome(layer=7).edit(tiny.model, ctx)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"subject": "A", "prompt": "no slot", "target_true": " x", "target_new": " y"})
    )
    with pytest.raises(SculptError, match="exactly one"):
        Rome(data=str(bad)).edit(tiny.model, ctx)


def test_threshold_fails_the_run(tiny, ctx, tmp_path, compose_cfg, kjv_text) -> None:
    write_request(tiny, tmp_path / "req.jsonl")
    # An edit too weak to move anything: one tiny step.
    weak = dict(data=str(tmp_path / "req.jsonl"), layer=1, steps=1, lr=1e-6)
    with pytest.raises(ConfigError, match=r"^min_efficacy: efficacy score after the edits is 0"):
        Rome(**weak, min_efficacy=0.9).edit(tiny.model.eval(), ctx)

    # Through the runner: one line naming the config key.
    text = tmp_path / "text.txt"  # a short file: tokenizing whole corpora costs seconds
    text.write_text(kjv_text[:20_000])
    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=default",
            "data=text_file",
            f"data.path={text}",
            "save_model=false",
            "checkpoint_stages=false",
            "data.calibration.windows=2",
            "data.evaluation.windows=1",
        ]
    )
    cfg.stages = [
        {
            "_target_": "plugins.editors.rome.Rome",
            **weak,
            "cov_windows": 2,
            "min_specificity": None,
            "min_efficacy": 0.9,
        }
    ]
    with pytest.raises(SculptError, match=r"^stages\[0\]\.min_efficacy: efficacy score"):
        run(cfg)
    assert (Path(cfg.paths.output_dir) / "FAILED").exists()


@pytest.mark.slow
def test_smollm2_edits(tmp_path) -> None:
    """The real model on the first three shipped requests, the layer edit_fact uses."""
    from hydra import compose, initialize_config_dir

    from framework.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=edit_fact",
                "editor.requests=3",
                "data.evaluation.windows=2",
                "save_model=false",
                f"paths.output_dir={tmp_path}",
            ],
        )
    result = run(cfg)
    m = result.metrics
    assert m["editor/efficacy_before"] == 0.0
    assert m["editor/efficacy"] == 1.0
    assert m["editor/neighborhood"] >= 0.5
