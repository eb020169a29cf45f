"""Attention-head ablation: zero the slice of the attention output projection that reads
a head's output, which removes that head's contribution to the residual stream exactly
(the weight-level form of TransformerLens-style zero-ablation), saved with the model."""

from __future__ import annotations

import torch
from torch import nn

from framework.errors import ConfigError
from framework.models import blocks
from framework.plugins import Context, Editor, StageResult


class AblateHeads(Editor):
    """Zero-ablate attention heads.

    Args:
        heads: block index -> head indices to remove, e.g. {0: [0, 3], 5: [1]}.
    """

    def __init__(self, heads: dict[int, list[int]]):
        if not heads:
            raise ConfigError("heads", "name at least one {layer: [head, ...]}")
        self.heads = {int(k): sorted({int(h) for h in v}) for k, v in heads.items()}

    @torch.no_grad()
    def edit(self, model: nn.Module, ctx: Context) -> StageResult:
        layers = blocks(model, ctx.arch)
        n_heads = int(getattr(model.config, ctx.arch.num_heads_attr))
        removed = 0
        for layer_idx, head_list in self.heads.items():
            if not 0 <= layer_idx < len(layers):
                raise ConfigError(
                    "heads", f"layer {layer_idx} does not exist (model has {len(layers)})"
                )
            o_proj = layers[layer_idx].get_submodule(ctx.arch.o)
            head_dim = o_proj.in_features // n_heads
            for h in head_list:
                if not 0 <= h < n_heads:
                    raise ConfigError(
                        "heads", f"head {h} of layer {layer_idx} does not exist ({n_heads} heads)"
                    )
                o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
                removed += 1
        return StageResult(metrics={"heads_removed": removed})
