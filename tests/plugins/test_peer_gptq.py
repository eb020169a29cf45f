"""peer_gptq: the clear error when llm-compressor is not installed, the config checks, our
side of the file exchange against a stand-in peer (a small script that answers the job as
the real worker would, with symmetric RTN codes), and, when the peer venv exists, the real
llm-compressor on a tiny Llama (slow)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from framework.codecs import container_size, read_container, read_manifest
from framework.errors import ConfigError, SculptError
from framework.models import block_linears, build_tiny_llama
from framework.plugins import Context
from plugins.compressors import peer_gptq
from plugins.compressors.peer_gptq import PeerGPTQ, PeersMissing

GROUP = 16  # divides the tiny Llama's widths (64, 176), as llm-compressor requires


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama()


def _ctx(tiny, out: Path) -> Context:
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 250, (6, 32), generator=gen)
    return Context(
        tokenizer=tiny.tokenizer,
        arch=tiny.arch,
        output_dir=out,
        calibration_loader=lambda: windows,
        stage_name="compressor",
    )


# ---------------------------------------------------------------------------------------
# Not installed
# ---------------------------------------------------------------------------------------


def test_missing_peer_names_the_fix(tiny, tmp_path: Path) -> None:
    # This venv has no llmcompressor (it would downgrade transformers): a one-line error
    # that says how to install the peer, raised before any work.
    plugin = PeerGPTQ(bits=3, group_size=GROUP, python=sys.executable)
    model = copy.deepcopy(tiny.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeersMissing) as err:
        plugin.compress(model, _ctx(tiny, tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("compressor=peer_gptq needs llm-compressor")
    assert "make peers-venv" in message and peer_gptq.PEERS_PIN in message
    assert isinstance(err.value, SculptError)  # the CLI prints it as one line, exit 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_default_venv(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peer_gptq, "default_peer_python", lambda: tmp_path / "no" / "python")
    monkeypatch.setattr(peer_gptq.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PeersMissing, match=r"no/python does not have: run `make peers-venv`"):
        PeerGPTQ().peer_python()


def test_nonexistent_python(tmp_path: Path) -> None:
    with pytest.raises(PeersMissing, match="make peers-venv"):
        PeerGPTQ(python=str(tmp_path / "python")).peer_python()


# ---------------------------------------------------------------------------------------
# Config checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"bits": 1}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"actorder": "group"}, "actorder"),
        ({"damp": 1.5}, "damp"),
        ({"block_size": 0}, "block_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"calibration_windows": 0}, "calibration_windows"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_bad_arguments(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        PeerGPTQ(**kwargs)
    assert err.value.argument == key


def test_group_that_does_not_divide_a_width(tiny, tmp_path: Path) -> None:
    # llm-compressor has no short last group; refused before the peer is even looked for.
    plugin = PeerGPTQ(bits=3, group_size=192, python=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"192 does not divide the 64 input columns") as err:
        plugin.compress(copy.deepcopy(tiny.model), _ctx(tiny, tmp_path))
    assert err.value.argument == "group_size"


# ---------------------------------------------------------------------------------------
# Our side of the exchange, against a stand-in peer
# ---------------------------------------------------------------------------------------

FAKE_PEER = """#!{python}
# Answers a peer_gptq job as the real worker does, with symmetric RTN in fp16 scales
# (numpy only: importing torch would double the test's time).
import json, sys
from pathlib import Path
if sys.argv[1] == "-c":  # the plugin's "is llmcompressor there" probe
    sys.exit(0)
mode = {mode!r}
if mode == "fail":
    print("Traceback (most recent call last):")
    print("ValueError: the stand-in peer was told to fail")
    sys.exit(1)
if mode == "hang":
    import time; time.sleep(60)
import numpy as np
from safetensors.numpy import load_file, save_file
worker = Path(sys.argv[1]).read_text()  # what the real peer would run: whole and valid
compile(worker, sys.argv[1], "exec")
assert "def _peer_worker(job_dir" in worker and "_peer_worker(sys.argv[1])" in worker
job = Path(sys.argv[2])
spec = json.loads((job / "job.json").read_text())
weights = load_file(str(job / "model" / "model.safetensors"))
assert load_file(str(job / "calibration.safetensors"))["input_ids"].shape == (6, 32)
bits, g = spec["bits"], spec["group_size"]
half, out, layers = 1 << (bits - 1), {{}}, {{}}
for name in spec["targets"]:
    w = weights[name + ".weight"].astype(np.float32)
    rows, cols = w.shape
    amax = np.abs(w.reshape(rows, cols // g, g)).max(-1)
    scale = (amax / (half - 0.5)).astype(np.float16).astype(np.float32)
    s = np.repeat(scale, g, axis=1)
    signed = np.clip(np.round(w / s), -half, half - 1)
    out[name + ".codes"] = np.ascontiguousarray((signed + half).astype(np.uint8))
    out[name + ".scale"] = np.ascontiguousarray(scale)
    layers[name] = {{"max_abs_diff": 0.0}}
save_file(out, str(job / "result.safetensors"))
(job / "result.json").write_text(json.dumps({{
    "seconds": 1.5, "load_seconds": 0.1, "layers": layers, "rtn_fallback": [],
    "versions": {{"llmcompressor": "stand-in"}},
}}))
"""


def _fake_peer(tmp_path: Path, mode: str = "ok") -> str:
    path = tmp_path / f"fake_peer_{mode}"
    path.write_text(FAKE_PEER.format(python=sys.executable, mode=mode))
    path.chmod(0o755)
    return str(path)


def test_exchange_with_a_stand_in_peer(tiny, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny.model)
    ctx = _ctx(tiny, tmp_path / "run")
    plugin = PeerGPTQ(bits=3, group_size=GROUP, python=_fake_peer(tmp_path))
    result = plugin.compress(model, ctx)

    m = result.metrics
    assert m["nominal_bits"] == 3.0 and m["layers"] == 14
    assert m["peer_seconds"] == 1.5 and m["peer_total_seconds"] > 0
    assert m["calibration_windows"] == 6 and m["calibration_tokens"] == 6 * 32
    assert 0 < m["weight_relative_mse"] < 0.2
    # The container holds every block linear and decodes to exactly the model's weights.
    decoded = read_container(result.artifacts["compressed"])
    linears = block_linears(model, tiny.arch)
    assert set(decoded) == {f"{n}.weight" for n in linears}
    state = model.state_dict()
    for key, tensor in decoded.items():
        assert torch.equal(tensor, state[key]), key
    # Symmetric: codes plus one fp16 scale per group, no zero points.
    manifest = read_manifest(result.artifacts["compressed"])
    assert manifest["meta"]["peer_versions"] == {"llmcompressor": "stand-in"}
    assert manifest["meta"]["symmetric"] is True
    size = container_size(result.artifacts["compressed"])
    assert size["coded_weights"] == sum(layer.weight.numel() for layer in linears.values())
    assert size["bits_per_weight"] == pytest.approx(3 + 16 / GROUP, abs=1e-3)
    # The exchange folder is gone; the peer's output is kept beside the run.
    assert not list((tmp_path / "run").glob(".peer_gptq_job*"))
    assert (tmp_path / "run" / "compressor_peer.log").exists()


def test_failed_peer_is_one_line_with_its_log(tiny, tmp_path: Path) -> None:
    plugin = PeerGPTQ(bits=3, group_size=GROUP, python=_fake_peer(tmp_path, "fail"))
    with pytest.raises(SculptError) as err:
        plugin.compress(copy.deepcopy(tiny.model), _ctx(tiny, tmp_path / "run"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("peer_gptq: llm-compressor failed (exit 1): ValueError: the stand-in")
    assert message.endswith("compressor_peer.log")
    assert not list((tmp_path / "run").glob(".peer_gptq_job*"))


def test_peer_past_its_timeout(tiny, tmp_path: Path) -> None:
    plugin = PeerGPTQ(bits=3, group_size=GROUP, python=_fake_peer(tmp_path, "hang"), timeout_s=1)
    with pytest.raises(SculptError, match=r"ran past timeout_s=1"):
        plugin.compress(copy.deepcopy(tiny.model), _ctx(tiny, tmp_path / "run"))


# ---------------------------------------------------------------------------------------
# The real llm-compressor (slow: importing it alone takes ~10 s)
# ---------------------------------------------------------------------------------------


def _real_peer() -> str | None:
    try:
        return str(PeerGPTQ().peer_python())
    except PeersMissing:
        return None


@pytest.mark.slow
def test_real_peer_on_a_tiny_llama(tiny, tmp_path: Path) -> None:
    python = _real_peer()
    if python is None:
        pytest.skip("llm-compressor is not installed (make peers-venv)")
    from plugins.compressors.rtn import RTN

    ctx = _ctx(tiny, tmp_path / "peer")
    windows = ctx.calibration()
    model = copy.deepcopy(tiny.model).eval()
    result = PeerGPTQ(bits=3, group_size=GROUP, python=python).compress(model, ctx)
    assert result.metrics["peer_max_abs_diff"] == 0.0
    assert result.metrics["peer_rtn_fallback_layers"] == 0.0
    decoded = read_container(result.artifacts["compressed"])
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in decoded.items())
    versions = read_manifest(result.artifacts["compressed"])["meta"]["peer_versions"]
    assert versions["llmcompressor"] == peer_gptq.PEERS_PIN.split("==")[1]

    # GPTQ fits the calibration windows better than round-to-nearest on the same grid.
    rtn_model = copy.deepcopy(tiny.model).eval()
    RTN(bits=3, group_size=GROUP, symmetric=True).compress(rtn_model, _ctx(tiny, tmp_path / "rtn"))

    def kl(m) -> float:
        with torch.no_grad():
            ref = torch.log_softmax(tiny.model.eval()(windows).logits, -1)
            got = torch.log_softmax(m(windows).logits, -1)
        return float((ref.exp() * (ref - got)).sum(-1).mean())

    assert kl(model) < kl(rtn_model)
    json.dumps(result.metrics)  # plain numbers only
