"""The reference's evaluation, kept on disk between runs.

Every run evaluates the untouched model first (SmolLM2 on the protocol's 40 windows: 3-6
minutes on 2 cores) and keeps what later stages are compared with, a ReferenceCache (the
LM head's inputs, ~47 MB). A sweep of N compressors on one model repeats that work N
times. Here it is stored once under a key that covers everything the result depends on:
every parameter's bytes (names, dtypes, shapes), the evaluation windows, the evaluation
batch size, the head's module name, and the torch version. A different checkpoint, other
windows or a changed weight gives another key, so a hit is the same computation. A
missing, partial or unreadable entry is recomputed (with a warning for the unreadable
kind); the cache never fails a run. Entries are written atomically and read with
safetensors and JSON only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from framework.eval.metrics import ReferenceCache
from framework.io import atomic_dir

log = logging.getLogger("sculpt")

# Bumped whenever what is stored, or how the reference metrics are computed, changes.
FORMAT = "sculpt-reference-v1"


def _feed(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def reference_key(
    model: nn.Module, windows: torch.Tensor, batch_size: int, head: str | None
) -> str:
    """sha256 over the model's state (every tensor by name), the windows and the settings
    the reference's metrics depend on."""
    digest = hashlib.sha256(f"{FORMAT};{torch.__version__};{batch_size};{head}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        _feed(digest, tensor)
    _feed(digest, windows)
    return digest.hexdigest()


def load_reference(
    root: Path, key: str, model: nn.Module, head: str | None
) -> tuple[dict[str, float], ReferenceCache] | None:
    """(metrics, cache) stored under `key`, or None. The head is copied from `model`: the
    key covers its weights, so it is the head the entry was computed with."""
    entry = Path(root) / key
    if not (entry / "metrics.json").is_file():
        return None
    try:
        from safetensors.torch import load_file

        metrics = json.loads((entry / "metrics.json").read_text())
        hidden = load_file(str(entry / "outputs.safetensors"))["hidden"]
        if not isinstance(metrics, dict) or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in metrics.values()
        ):
            raise ValueError("metrics.json is not a flat object of finite numbers")
    except Exception as exc:
        log.warning("reference cache: ignoring unreadable %s (%s)", entry, exc)
        return None
    frozen = copy.deepcopy(model.get_submodule(head)).eval() if head else None
    return {k: float(v) for k, v in metrics.items()}, ReferenceCache(hidden=hidden, head=frozen)


def save_reference(root: Path, key: str, metrics: dict[str, float], cache: ReferenceCache) -> None:
    """Store an entry; a failure (full disk, another process publishing the same key at the
    same moment) is logged and otherwise ignored."""
    from safetensors.torch import save_file

    try:
        with atomic_dir(Path(root) / key) as staging:
            save_file({"hidden": cache.hidden.contiguous()}, str(staging / "outputs.safetensors"))
            (staging / "metrics.json").write_text(json.dumps(metrics, indent=1))
    except OSError as exc:
        log.warning("reference cache: could not store %s (%s)", key, exc)
