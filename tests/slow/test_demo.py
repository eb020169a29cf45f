"""The real default job on SmolLM2-135M (PROTOCOL.md: KJV 40x512 evaluation, Shakespeare
calibration, RTN 3-bit group 192), MiniLM as an encoder, and a validator stopping a run on
the real model. Minutes each on 2 cores: `make test-slow` / `pytest -m slow`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from cli_runner import assert_complete_run_folder, run_sculpt

from framework.wandb_offline import find_run_files, read_run

pytestmark = pytest.mark.slow

SMALL_DATA = (
    "data.evaluation.windows=8",
    "data.evaluation.seq_len=256",
    "data.calibration.windows=8",
    "data.calibration.seq_len=256",
)


def _flat(folder: Path) -> dict[str, float]:
    return json.loads((folder / "metrics.json").read_text())["flat"]


def _assert_container_is_the_saved_model(folder: Path, expected_tensors: int) -> None:
    from safetensors.torch import load_file

    from framework.codecs import read_container

    decoded = read_container(folder / "compressed")
    assert len(decoded) == expected_tensors
    saved: dict[str, torch.Tensor] = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        saved.update(load_file(file))
    missing = sorted(set(decoded) - set(saved))
    assert not missing, f"container tensors not in model/: {missing[:5]}"
    for name, tensor in decoded.items():
        assert torch.equal(tensor.to(saved[name].dtype), saved[name]), name


def test_default_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_sculpt([f"hydra.run.dir={run_dir}"], tmp_path / "cwd", timeout=3600)
    assert result.returncode == 0, result.explain()
    assert_complete_run_folder(run_dir)
    flat = _flat(run_dir)
    ref, got = flat["reference/perplexity"], flat["compressor/perplexity"]
    assert 9.0 < ref < 12.5  # measured ~10.6 on 40x512 KJV tokens
    assert math.isfinite(got) and got > ref
    assert flat["compressor/kl"] > 0
    assert 0.3 < flat["compressor/top1_agreement"] < 1.0
    # 3-bit codes + per group of 192: an fp16 scale and a 3-bit zero point
    assert flat["compressor/bits_per_weight"] == pytest.approx(3 + 19 / 192, abs=0.05)
    assert flat["reference/tokens"] == 40 * 511
    # PROTOCOL.md: 210 block matrices (30 layers x 7 linears)
    _assert_container_is_the_saved_model(run_dir, expected_tensors=210)
    # the default logger is W&B offline, with the same numbers
    files = find_run_files(run_dir / "wandb")
    assert len(files) == 1, files
    run = read_run(files[0])
    for key in ("reference/perplexity", "compressor/perplexity", "compressor/bits_per_weight"):
        assert run.metric(key) == [flat[key]], key


def test_minilm_encoder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["model=minilm", "logger=none", *SMALL_DATA, f"hydra.run.dir={run_dir}"]
    result = run_sculpt(args, tmp_path / "cwd", timeout=1800)
    assert result.returncode == 0, result.explain()
    assert_complete_run_folder(run_dir)
    flat = _flat(run_dir)
    cosine = flat["compressor/cosine_to_reference"]
    assert 0.5 < cosine < 1.0
    assert "compressor/perplexity" not in flat  # no LM head: no perplexity claimed
    # 6 BERT layers x (q, k, v, attention output, intermediate, output)
    _assert_container_is_the_saved_model(run_dir, expected_tensors=36)

    from transformers import AutoModel

    model = AutoModel.from_pretrained(run_dir / "model")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[101, 7592, 2088, 102]])).last_hidden_state
    assert torch.isfinite(out).all()


def test_validator_stops_a_real_run(tmp_path: Path) -> None:
    """2-bit RTN wrecks SmolLM2 (perplexity rises many-fold): a 0.01% limit stops the run."""
    run_dir = tmp_path / "run"
    args = [
        "eval.max_ppl_increase=0.0001",
        "compressor.bits=2",
        "stages=[compressor]",
        "logger=none",
        *SMALL_DATA,
        f"hydra.run.dir={run_dir}",
    ]
    result = run_sculpt(args, tmp_path / "cwd", timeout=1800)
    assert result.returncode == 2, result.explain()
    lines = result.stderr_lines()
    assert len(lines) == 1 and lines[0].startswith("sculpt: error: eval.max_ppl_increase"), lines
    assert "->" in lines[0]  # reference -> measured perplexity
    assert (run_dir / "FAILED").is_file()
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "model").exists()
