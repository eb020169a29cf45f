"""Edit validation: an editor is judged against the model just before it (not only the
reference), and `eval.limits` bounds any stage's own metric, failing with the key named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.errors import SculptError
from framework.eval.validators import check_limits_config, check_stage, edit_metrics
from framework.run import run, validate

# RTN changes the weights, then an editor zero-ablates a head of the quantized model.
PIPELINE = ["compressor.bits=4", "editor=ablate_heads", "save_model=false"]


def test_edit_metrics_compare_with_the_model_before_the_edit() -> None:
    got = {"perplexity": 11.0, "kl": 0.5, "kl_to_previous": 0.1, "top1_to_previous": 0.9}
    out = edit_metrics(got, {"perplexity": 10.0}, unedited_is_reference=False)
    assert out["ppl_change_vs_unedited"] == pytest.approx(0.1)
    assert out["kl_to_unedited"] == 0.1 and out["top1_to_unedited"] == 0.9
    assert "kl_to_previous" not in out and out["kl"] == 0.5
    first = edit_metrics({"perplexity": 11.0, "kl": 0.5}, {"perplexity": 10.0}, True)
    assert first["kl_to_unedited"] == 0.5


def _eval(**kwargs: object):
    base = {
        "max_ppl_increase": None,
        "max_kl": None,
        "min_top1": None,
        "min_cosine": None,
        "max_edit_kl": None,
        "max_edit_ppl_increase": None,
        "min_edit_top1": None,
        "limits": {},
    }
    return OmegaConf.create({**base, **kwargs})


def test_edit_limits_apply_to_editors_only() -> None:
    evaluation = {"perplexity": 10.0, "kl_to_unedited": 0.05}
    cfg = _eval(max_edit_kl=0.01)
    check_stage(cfg, "compressor", "compressor", {"perplexity": 10.0}, {}, evaluation)
    with pytest.raises(
        SculptError, match=r"^eval\.max_edit_kl: stage 'editor' has kl_to_unedited=0\.05"
    ):
        check_stage(cfg, "editor", "editor", {"perplexity": 10.0}, {}, evaluation)


def test_limits_bound_a_stage_own_metric() -> None:
    cfg = _eval(limits={"editor": {"efficacy": {"min": 0.9}}})
    check_stage(cfg, "editor", "editor", {}, {"efficacy": 0.95}, {})
    with pytest.raises(
        SculptError, match=r"^eval\.limits\.editor\.efficacy: .*efficacy=0\.5, limit min 0\.9"
    ):
        check_stage(cfg, "editor", "editor", {}, {"efficacy": 0.5}, {})
    with pytest.raises(
        SculptError, match=r"eval\.limits\.editor\.efficacy: .*no metric 'efficacy'"
    ):
        check_stage(cfg, "editor", "editor", {}, {"other": 1.0}, {})
    nan_cfg = _eval(limits={"editor": {"kl": {"max": 1.0}}})
    with pytest.raises(SculptError, match="kl=nan"):
        check_stage(nan_cfg, "editor", "editor", {}, {}, {"kl": float("nan")})


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"editr": {"kl": {"max": 1}}},
            r"eval\.limits\.editr: this run has no stage named 'editr'",
        ),
        ({"editor": {"kl": {"below": 1}}}, r"eval\.limits\.editor\.kl: expected"),
        (
            {"editor": {"kl": {"max": "low"}}},
            r"eval\.limits\.editor\.kl\.max: 'low' is not a number",
        ),
    ],
)
def test_bad_limits_are_refused_before_loading(limits: dict, message: str) -> None:
    with pytest.raises(SculptError, match=message):
        check_limits_config(OmegaConf.create({"limits": limits}), ["reference", "editor"])


def test_validate_checks_limits_against_the_run_stages(compose_cfg) -> None:
    cfg = compose_cfg(["model=tiny_llama", "debug=default", "+eval.limits.nostage.kl.max=1"])
    with pytest.raises(SculptError, match=r"eval\.limits\.nostage"):
        validate(cfg)


def test_an_edit_after_compression_is_measured_against_the_compressed_model(
    compose_cfg, tmp_path: Path
) -> None:
    cfg = compose_cfg(["model=tiny_llama", "debug=default", *PIPELINE])
    result = run(cfg)
    editor = next(r for r in result.stages if r.name == "editor")
    compressor = next(r for r in result.stages if r.name == "compressor")
    # Against the reference the edited model carries the quantization error too; against
    # the model before the edit only the ablation's own change.
    assert editor.eval["kl_to_unedited"] > 0
    assert editor.eval["kl_to_unedited"] != pytest.approx(editor.eval["kl"], rel=1e-3)
    assert editor.eval["ppl_change_vs_unedited"] == pytest.approx(
        editor.eval["perplexity"] / compressor.eval["perplexity"] - 1
    )
    assert "kl_to_unedited" not in compressor.eval


def test_a_broken_edit_limit_fails_the_run_and_names_the_key(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["model=tiny_llama", "debug=default", *PIPELINE, "eval.max_edit_kl=1e-12", "logger=none"]
    )
    with pytest.raises(
        SculptError, match=r"^eval\.max_edit_kl: stage 'editor' has kl_to_unedited="
    ):
        run(cfg)
    assert (tmp_path / "FAILED").read_text().startswith("eval.max_edit_kl")
    assert not (tmp_path / "metrics.json").exists()


def test_limits_on_an_analyzer_metric_pass_and_are_recorded(compose_cfg, tmp_path: Path) -> None:
    cfg = compose_cfg(
        ["model=tiny_llama", "debug=default", "~compressor", "+eval.limits.compressor=null"]
    )
    # A null entry for a stage is allowed only when that stage exists; here it does not.
    with pytest.raises(SculptError, match=r"eval\.limits\.compressor"):
        run(cfg)
    cfg = compose_cfg(
        ["model=tiny_llama", "debug=default", "~compressor", "+eval.limits.analyzer.layers.min=1"]
    )
    run(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["flat"]["analyzer/layers"] >= 1
