"""Feature labels on the tiny Llama: the activations behind every snippet are the model's
own, the simulation score is a correct Pearson correlation, and the pipeline runs with a
local explainer (the tiny model itself) and with an OpenAI-compatible HTTP endpoint.

The HTTP test talks to a small server this test starts on 127.0.0.1: the test machines
cannot reach the internet, and a real endpoint's answers would not be reproducible."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from framework.dictionary import Dictionary, collect_activations, encode, save_dictionary
from framework.errors import ConfigError
from plugins.analyzers.feature_labels import FeatureLabels, Snippet, pearson, top_positions

LAYER = 1


def _neurons(model, arch, windows: torch.Tensor) -> torch.Tensor:
    """The down projection's input of block LAYER, from a full forward pass (independent
    of the plugin's early-stopping capture)."""
    got = []
    down = model.model.layers[LAYER].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda _m, a: got.append(a[0].detach()))
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None])
    finally:
        handle.remove()
    return torch.cat(got)


def test_pearson_matches_torch_and_is_zero_when_constant() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    expected = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert pearson(a.tolist(), b.tolist()) == pytest.approx(expected, abs=1e-6)
    assert pearson(b.tolist(), b.tolist()) == pytest.approx(1.0)
    assert pearson((3 * b + 1).tolist(), b.tolist()) == pytest.approx(1.0)
    assert pearson((-b).tolist(), b.tolist()) == pytest.approx(-1.0)
    assert pearson([0.5] * 50, b.tolist()) == 0.0


def test_top_positions_skip_the_sink_and_do_not_overlap() -> None:
    acts = torch.zeros(2, 20)
    acts[0, 0] = 100.0  # the attention sink: never a top position
    acts[0, 5], acts[0, 6], acts[1, 10] = 9.0, 8.0, 7.0
    assert top_positions(acts, 2, radius=3) == [(0, 5), (1, 10)]
    assert top_positions(acts, 3, radius=0)[:3] == [(0, 5), (0, 6), (1, 10)]
    excluded = torch.zeros(2, 20, dtype=torch.bool)
    excluded[0, 5] = True  # e.g. a massive-activation token
    assert top_positions(acts, 2, radius=0, excluded=excluded) == [(0, 6), (1, 10)]


def test_snippets_carry_the_true_activations(tiny, ctx) -> None:
    model = tiny.model.eval()
    result = FeatureLabels(layer=LAYER, features=3, explainer="self", windows=4).analyze(model, ctx)
    table = result.tables["feature_labels"]
    assert len(table) == 3 and result.metrics["features"] == 3
    assert {"feature", "label", "score", "top_examples"} <= set(table[0])
    saved = json.loads(Path(result.artifacts["feature_labels"]).read_text())
    windows = ctx.calibration(4)
    acts = _neurons(model, tiny.arch, windows)  # [n, seq, 176]
    body = acts[:, 1:]
    maxima = []
    for record in saved["features"]:
        j, sign = record["feature"], record["sign"]
        a = acts[..., j] * sign
        maxima.append(float(a[:, 1:].max()))
        # The neuron's sign is its largest-magnitude direction.
        assert float((body[..., j] * sign).max()) >= float((-body[..., j] * sign).max())
        for snippet in record["explanation"] + record["held_out"]:
            start, n = snippet["start"], len(snippet["activations"])
            true = a[snippet["row"], start : start + n]
            assert snippet["activations"] == pytest.approx(true.tolist(), abs=1e-5)
            assert start >= 1  # the attention sink is never shown
        # The strongest snippet holds the feature's maximum over the calibration text.
        best = record["explanation"][0]
        assert max(best["activations"]) == pytest.approx(maxima[-1], abs=1e-5)
        assert record["max_activation"] == pytest.approx(maxima[-1], abs=1e-4)
        assert "[[" in best["marked"]
    # rank_by=max: the chosen neurons are the three largest.
    oriented = torch.maximum(body.amax((0, 1)), -body.amin((0, 1)))
    assert sorted(maxima, reverse=True) == pytest.approx(oriented.topk(3).values.tolist(), 1e-5)
    md = Path(result.artifacts["feature_labels_md"]).read_text()
    assert md.count("\n| ") == 3 + 1  # header row + one row per feature


class _Oracle:
    """A simulator that returns the true activations: every score must be 1."""

    def explain(self, messages) -> str:
        assert "[[" in messages[-1]["content"]
        return "the oracle"

    def simulate(self, label: str, snippet: Snippet, unit: str) -> list[float]:
        assert label == "the oracle"
        return list(snippet.activations)


def test_a_perfect_simulator_scores_one(tiny, ctx, monkeypatch) -> None:
    plugin = FeatureLabels(layer=LAYER, features=4, explainer="self", windows=4)
    monkeypatch.setattr(plugin, "make_explainer", lambda model, ctx: _Oracle())
    result = plugin.analyze(tiny.model.eval(), ctx)
    scores = [r["score"] for r in result.tables["feature_labels"]]
    assert scores == pytest.approx([1.0] * 4, abs=1e-6)
    assert result.metrics["mean_score"] == pytest.approx(1.0, abs=1e-6)
    assert {r["label"] for r in result.tables["feature_labels"]} == {"the oracle"}


def test_sae_dictionary_features(tiny, ctx) -> None:
    model = tiny.model.eval()
    gen = torch.Generator().manual_seed(3)
    f, d = 32, 64
    w = torch.randn(f, d, generator=gen)
    dictionary = Dictionary(
        encoder_weight=w,
        encoder_bias=torch.zeros(f),
        decoder_weight=torch.nn.functional.normalize(w.T.clone(), dim=0),
        decoder_bias=torch.zeros(d),
        k=4,
        layer=LAYER,
        site="residual",
    )
    # Where an earlier `sae` stage of the run leaves it; the relative path finds it there.
    save_dictionary(ctx.output_dir / "sae" / "dictionary.safetensors", dictionary)
    plugin = FeatureLabels(
        dictionary="sae/dictionary.safetensors", features=2, explainer="self", windows=4
    )
    result = plugin.analyze(model, ctx)
    saved = json.loads(Path(result.artifacts["feature_labels"]).read_text())
    assert saved["unit"] == "feature" and saved["layer"] == LAYER
    windows = ctx.calibration(4)
    x = collect_activations(model, tiny.arch, windows, LAYER, "residual", skip_first=False)
    acts = encode(dictionary, x).reshape(len(windows), windows.shape[1], f)
    top = acts[:, 1:].amax((0, 1))
    assert [r["feature"] for r in saved["features"]] == top.topk(2).indices.tolist()
    for record in saved["features"]:
        assert record["sign"] == 1
        best = record["explanation"][0]
        assert max(best["activations"]) == pytest.approx(float(top[record["feature"]]), 1e-5)


class _Endpoint(BaseHTTPRequestHandler):
    requests: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Endpoint.requests.append({"auth": self.headers.get("Authorization"), **body})
        prompt = body["messages"][-1]["content"]
        if "fires on:" in prompt:  # a simulation: alternate 10 and 0, one line per token
            reply = "\n".join(f"t{i}\t{10 if i % 2 == 0 else 0}" for i in range(40))
        else:
            reply = "Label: letters near the marked one."
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data.encode())

    def log_message(self, *args) -> None:
        pass


def test_http_explainer(tiny, ctx, monkeypatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Endpoint.requests.clear()
    monkeypatch.setenv("SCULPT_TEST_KEY", "sk-local")
    try:
        api = {
            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
            "model": "stub-explainer",
            "api_key_env": "SCULPT_TEST_KEY",
            "timeout_s": 10,
        }
        plugin = FeatureLabels(layer=LAYER, features=2, windows=4, api=api)
        result = plugin.analyze(tiny.model.eval(), ctx)
    finally:
        server.shutdown()
        server.server_close()
    table = result.tables["feature_labels"]
    assert [r["label"] for r in table] == ["letters near the marked one"] * 2
    # 2 features x (1 label + 4 top + 4 random simulations)
    assert len(_Endpoint.requests) == 2 * 9
    assert {r["auth"] for r in _Endpoint.requests} == {"Bearer sk-local"}
    assert {r["model"] for r in _Endpoint.requests} == {"stub-explainer"}
    assert all(r["temperature"] == 0 for r in _Endpoint.requests)
    saved = json.loads(Path(result.artifacts["feature_labels"]).read_text())
    simulated = saved["features"][0]["held_out"][0]["simulated"]
    assert simulated[:4] == [1.0, 0.0, 1.0, 0.0]


def test_bad_configs_name_their_key(monkeypatch, tiny, ctx) -> None:
    for kwargs, key in (
        ({"rank_by": "median"}, "rank_by"),
        ({"features": 0}, "features"),
        ({"feature_ids": [-1]}, "feature_ids"),
        ({"explain_examples": 0}, "explain_examples"),
        ({"api": {"model": "m"}}, "api.base_url"),
        ({"api": {"base_url": "ftp://x", "model": "m"}}, "api.base_url"),
        ({"api": {"base_url": "http://x", "model": "m", "key": 1}}, "api"),
    ):
        with pytest.raises(ConfigError) as info:
            FeatureLabels(**kwargs)
        assert info.value.argument == key
    with pytest.raises(ConfigError) as info:
        FeatureLabels(layer=7, explainer="self").analyze(tiny.model, ctx)
    assert info.value.argument == "layer"
    with pytest.raises(ConfigError) as info:
        FeatureLabels(dictionary="/nonexistent/d.safetensors").analyze(tiny.model, ctx)
    assert info.value.argument == "dictionary"


@pytest.mark.slow
def test_smollm2_explainer_labels_its_own_neurons(make_ctx, tmp_path) -> None:
    """SmolLM2 labels three of its own MLP neurons: labels are text, scores are finite."""
    from framework.models import load_packaged

    loaded = load_packaged("smollm2-135m-instruct")
    ctx = make_ctx(loaded, tmp_path)
    plugin = FeatureLabels(layer=15, features=2, windows=4, explainer="smollm2-135m-instruct")
    result = plugin.analyze(loaded.model, ctx)
    for row in result.tables["feature_labels"]:
        assert row["label"] and row["label"] != "(no label)"
        assert -1.0 <= row["score"] <= 1.0
