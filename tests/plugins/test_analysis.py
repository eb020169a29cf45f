"""Logit lens, CKA and probes on the tiny Llama: the checks each table carries."""

from __future__ import annotations

import copy
import json

import pytest

from plugins.analyzers.cka import CKA
from plugins.analyzers.logit_lens import LogitLens
from plugins.analyzers.probes import Probes


def test_logit_lens_last_layer_is_the_model(tiny, ctx) -> None:
    result = LogitLens(windows=1).analyze(tiny.model.eval(), ctx)
    last = result.tables["logit_lens"][-1]
    assert last["top1_agreement"] == 1.0
    assert last["kl_to_final"] == pytest.approx(0.0, abs=1e-4)
    assert result.metrics["last_layer_kl"] == pytest.approx(0.0, abs=1e-5)


def test_cka_against_an_identical_reference_is_one(tiny, ctx) -> None:
    model = tiny.model.eval()
    ctx.reference = copy.deepcopy(model)
    result = CKA(windows=1, max_tokens=64).analyze(model, ctx)
    assert result.metrics["reference_cka_min"] == pytest.approx(1.0, abs=1e-9)
    assert all(r["cka_to_reference"] == 1.0 for r in result.tables["cka"])
    assert CKA(compare_reference=False).needs_reference is False
    assert CKA().needs_reference is True


def test_probes_report_the_majority_baseline(tiny, ctx, tmp_path) -> None:
    rows = [{"text": f"item {i} " + ("x" * (i % 7 + 2)), "label": "a"} for i in range(30)]
    rows += [{"text": f"thing {i} " + ("y" * (i % 5 + 2)), "label": "b"} for i in range(20)]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = Probes(data=str(path), folds=2).analyze(tiny.model.eval(), ctx)
    table = result.tables["probes"]
    assert [r["layer"] for r in table] == [0, 1]
    assert all(r["majority_baseline"] == 0.6 for r in table)
    assert result.metrics["examples"] == 50
    half = Probes(data=str(path), folds=2, skip_fraction=0.5).analyze(tiny.model.eval(), ctx)
    assert half.metrics["examples"] == 25
    assert "selectivity" not in table[0]
    # with groups: the probe on unseen groups and the control task (a label per group)
    for r in rows:
        r["group"] = r["text"].split()[-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    grouped = Probes(data=str(path), folds=2).analyze(tiny.model.eval(), ctx)
    assert grouped.metrics["groups"] == len({r["group"] for r in rows})
    for r in grouped.tables["probes"]:
        assert 0 <= r["unseen_groups"] <= 1 and 0 <= r["control"] <= 1
        assert r["selectivity"] == pytest.approx(r["probe_accuracy"] - r["control"], abs=2e-4)
