"""The GPU suite (`make test-gpu`): DeepSpeed ZeRO-3 through Lightning's own
DeepSpeedStrategy, FSDP2 on NCCL, and GPTQ on a CUDA device, each checked against the CPU
result. Skipped where no CUDA device exists; a few minutes on one GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from framework.lightning.spec import TrainerSpec
from framework.models import build_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "single"])
def test_gpu_training_matches_cpu(strategy: str, train_tiny, tmp_path: Path) -> None:
    common = dict(max_steps=4, batch_size=4, gradient_clip_val=None)
    cpu_log, cpu_weights = train_tiny(TrainerSpec(**common), tmp_path / "cpu")
    gpu_log, gpu_weights = train_tiny(
        TrainerSpec(strategy=strategy, accelerator="gpu", devices=1, **common), tmp_path / "gpu"
    )
    # Only `single` trains inside this process (sharded strategies use workers even for one
    # GPU), and it leaves no process group behind for a later CPU stage to reduce through.
    assert not torch.distributed.is_initialized()
    # TF32 and other kernels: agreement to about 1e-3, not bit-exactness.
    torch.testing.assert_close(
        torch.tensor(gpu_log["losses"]), torch.tensor(cpu_log["losses"]), rtol=2e-3, atol=1e-5
    )
    for name, tensor in cpu_weights.items():
        torch.testing.assert_close(gpu_weights[name], tensor, rtol=1e-2, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 on NCCL needs 2 GPUs")
def test_fsdp2_on_two_gpus_holds_half_each(train_tiny, tmp_path: Path) -> None:
    log, _ = train_tiny(
        TrainerSpec(strategy="fsdp2", accelerator="gpu", devices=2, max_steps=4), tmp_path
    )
    assert all(0.45 <= share <= 0.55 for share in log["parameter_fractions"])


def test_gptq_on_gpu_matches_cpu(make_ctx, tmp_path: Path) -> None:
    from plugins.compressors.gptq import GPTQ

    results = {}
    for device in ("cpu", "cuda"):
        loaded = build_tiny_llama(seed=0)
        loaded.model.to(device)
        ctx = make_ctx(loaded, tmp_path / device, stage_name="gptq")
        metrics = GPTQ(bits=3, group_size=32).compress(loaded.model, ctx).metrics
        results[device] = (metrics, {k: v.cpu() for k, v in loaded.model.state_dict().items()})
    cpu_metrics, cpu_weights = results["cpu"]
    gpu_metrics, gpu_weights = results["cuda"]
    assert gpu_metrics["weight_relative_mse"] == pytest.approx(
        cpu_metrics["weight_relative_mse"], rel=0.05
    )
    # Rounding ties can flip a few codes between devices; nearly all weights agree.
    for name, tensor in cpu_weights.items():
        same = torch.isclose(gpu_weights[name], tensor, rtol=1e-3, atol=1e-5).float().mean()
        assert same > 0.98, name
