"""Function-preserving transforms of transformer weights: the exact symmetries of a
Llama-family decoder, applied in place through the architecture map.

* norms.py: fold RMSNorm scales into the linears that read them (untying a tied head);
* rotations.py: O(d) on the residual stream, O(h) per kv head on values/outputs,
  SO(2) per RoPE plane on queries/keys; seeded random Hadamard or Haar rotations;
* scalings.py: positive diagonal scalings between a norm or linear and its reader;
* permutations.py: S_n on MLP neurons, S_kv wr S_r on attention heads (GQA-aware);
* slicing.py: deleting the least-used directions of a rotated residual stream (lossy).
* learned_slicing.py: a slicing basis turned by a rotation learned on the output KL.

Each keeps the logits equal up to float rounding (tests/unit/test_transforms.py checks
1e-4 relative error on the tiny Llama and SmolLM2), except slicing, which is lossy by
design.
"""

from framework.transforms.common import AttentionShape, BlockParts, attention_shape, block_parts
from framework.transforms.norms import fold_norm_scales, is_tied, untie_head
from framework.transforms.rotations import (
    hadamard_matrix,
    random_orthogonal,
    random_rotation,
    rotate_queries_keys,
    rotate_residual,
    rotate_values,
)

__all__ = [
    "AttentionShape",
    "BlockParts",
    "attention_shape",
    "block_parts",
    "fold_norm_scales",
    "hadamard_matrix",
    "is_tied",
    "random_orthogonal",
    "random_rotation",
    "rotate_queries_keys",
    "rotate_residual",
    "rotate_values",
    "untie_head",
]
