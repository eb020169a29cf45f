"""Sharded training and sharded weight edits with real torch.distributed processes (gloo,
2 ranks on CPU): FSDP2 through Lightning's ModelParallelStrategy, and DeepSpeed ZeRO-3
through a DeepSpeed engine with its CPU accelerator. `make test-distributed`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from framework.lightning.launch import free_port
from framework.lightning.spec import TrainerSpec
from framework.models import build_tiny_llama

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def _spec(strategy: str, devices: int) -> TrainerSpec:
    return TrainerSpec(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=STEPS,
        batch_size=4,
        gradient_clip_val=None,  # FSDP2 under Lightning clips nothing; compare like with like
    )


@pytest.fixture(scope="module")
def single_process(train_tiny, tmp_path_factory: pytest.TempPathFactory):
    return train_tiny(_spec("single", 1), tmp_path_factory.mktemp("single"))


# ZeRO-2 partitions optimizer state and gradients but keeps full parameters on each rank.
PARAMETER_SHARE = {"fsdp2": 0.5, "deepspeed_zero3": 0.5, "deepspeed_zero2": 1.0}


@pytest.mark.parametrize("strategy", list(PARAMETER_SHARE))
def test_two_ranks_match_one_process_and_hold_their_share(
    strategy: str, single_process, train_tiny, tmp_path: Path
) -> None:
    (ref_log, ref_weights) = single_process
    log, weights = train_tiny(_spec(strategy, 2), tmp_path)
    assert log["world_size"] == 2 and log["strategy"] == strategy
    assert len(log["losses"]) == len(ref_log["losses"]) == STEPS
    # The same global batches and the same updates: the losses agree step by step.
    torch.testing.assert_close(
        torch.tensor(log["losses"]), torch.tensor(ref_log["losses"]), rtol=1e-4, atol=1e-6
    )
    assert log["losses"][-1] < log["losses"][0]  # it trained
    # ZeRO-3 and FSDP2 shard: each rank holds about half of the parameters.
    assert len(log["parameter_fractions"]) == 2
    for share in log["parameter_fractions"]:
        assert share == pytest.approx(PARAMETER_SHARE[strategy], abs=0.05), share
    # The gathered result is the one-process result.
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fsdp2", "zero3"])
def test_compressor_edits_sharded_weights_like_unsharded(kind: str, tmp_path: Path) -> None:
    from framework.plugins import Context
    from plugins.compressors.rtn import RTN

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(REPO / "tests" / "distributed" / "sharded_edit_worker.py"),
            kind,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for before, after in result["shares"]:
        assert 0.45 <= before <= 0.55 and 0.45 <= after <= 0.55  # sharded before and after
    edited = load_file(tmp_path / "edited.safetensors")

    loaded = build_tiny_llama(seed=0)
    ctx = Context(tokenizer=loaded.tokenizer, arch=loaded.arch, output_dir=tmp_path / "single")
    metrics = RTN(bits=3, group_size=32).compress(loaded.model, ctx).metrics
    expected = loaded.model.state_dict()
    assert result["metrics"]["weight_relative_mse"] == pytest.approx(
        metrics["weight_relative_mse"], rel=1e-9
    )
    changed = 0
    for name, tensor in expected.items():
        assert torch.equal(edited[name], tensor), name
        changed += int(not torch.equal(tensor, build_tiny_llama(seed=0).model.state_dict()[name]))
    assert changed >= 14  # the 7 linears of each of the 2 blocks were quantized


def test_the_cli_distils_with_two_fsdp2_ranks(tmp_path: Path) -> None:
    """The whole pipeline: compress in the run's process, distil on 2 FSDP2 workers, evaluate
    the gathered result, as a user runs it."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from cli_runner import TINY, run_sculpt

    run_dir = tmp_path / "run"
    args = [*TINY, "~analyzer", "editor=distill", "trainer=fsdp2", "trainer.max_steps=5"]
    result = run_sculpt([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.explain()
    flat = json.loads((run_dir / "metrics.json").read_text())["flat"]
    assert flat["editor/world_size"] == 2
    assert flat["editor/rank_parameter_share_max"] == pytest.approx(0.5, abs=0.05)
    assert flat["editor/loss_last"] < flat["editor/loss_first"]
    assert flat["editor/kl"] < flat["compressor/kl"]  # distillation recovered some of the loss
    assert "training on 2 processes (fsdp2, torchrun)" in result.stdout + result.stderr
