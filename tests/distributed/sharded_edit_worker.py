"""Run under torchrun by test_sharded.py: shard the tiny Llama (FSDP2 or DeepSpeed ZeRO-3),
apply the real RTN compressor through edit_sharded, and write what each rank held and the
gathered result. Usage: python -m torch.distributed.run --nproc_per_node=2
tests/distributed/sharded_edit_worker.py {fsdp2|zero3} OUT_DIR"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(kind: str, out: Path) -> None:
    from framework.lightning.modules import local_parameter_fraction
    from framework.lightning.sharding import edit_sharded
    from framework.lightning.worker import full_state_dict
    from framework.models import build_tiny_llama
    from framework.plugins import Context
    from plugins.compressors.rtn import RTN

    loaded = build_tiny_llama(seed=0)
    model = loaded.model
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.distributed.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        model.requires_grad_(True)  # loaders freeze; ZeRO-3 partitions trainable groups
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        model = engine.module
    rank = torch.distributed.get_rank()
    before = local_parameter_fraction(model)

    def compress(full_model: torch.nn.Module) -> dict[str, float]:
        ctx = Context(tokenizer=loaded.tokenizer, arch=loaded.arch, output_dir=out / "run")
        return RTN(bits=3, group_size=32).compress(full_model, ctx).metrics

    def replica() -> torch.nn.Module:
        return build_tiny_llama(seed=1).model  # other values: the load must overwrite all

    metrics = edit_sharded(model, compress, replica)
    after = local_parameter_fraction(model)
    state = full_state_dict(model)
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, (before, after))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, out / "edited.safetensors")
        (out / "result.json").write_text(json.dumps({"shares": shares, "metrics": metrics}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
