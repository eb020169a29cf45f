"""Sparse dictionaries (TopK sparse autoencoders) as files, and the activations they read.

File format (``dictionary.safetensors``, written by plugins/analyzers/sae.py, read by any
plugin through ``load_dictionary``):

* tensors ``encoder.weight`` [F, d], ``encoder.bias`` [F], ``decoder.weight`` [d, F] (unit
  norm columns: column i is feature i's direction in the residual stream), ``decoder.bias``
  [d];
* metadata strings ``layer``, ``site`` (residual / mlp / attn, see framework.interventions),
  ``k``, ``activation`` ("topk"), ``model`` (name, "" when unknown); writers may add more.

Encoding: f = topk_k(relu(encoder.weight @ (x - decoder.bias) + encoder.bias)), every other
entry 0; decoding: x_hat = decoder.weight @ f + decoder.bias (Gao et al., 2024, "Scaling and
evaluating sparse autoencoders"). Nothing here imports Lightning: the training lives in
framework.lightning.dictionary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from framework.errors import SculptError
from framework.interventions import capture, check_supported, site_module
from framework.io import atomic_write_bytes
from framework.models.arch import ArchMap, blocks

DICTIONARY_FILE = "dictionary.safetensors"
TENSORS = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")


@dataclass
class Dictionary:
    encoder_weight: torch.Tensor  # [F, d]
    encoder_bias: torch.Tensor  # [F]
    decoder_weight: torch.Tensor  # [d, F], unit-norm columns
    decoder_bias: torch.Tensor  # [d]
    k: int
    layer: int
    site: str = "residual"
    model: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # every string in the file

    @property
    def features(self) -> int:
        return int(self.encoder_weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.encoder_weight.shape[1])

    def direction(self, feature: int) -> torch.Tensor:
        """Feature ``feature``'s unit direction in the residual stream (its decoder column)."""
        if not 0 <= feature < self.features:
            raise SculptError(f"feature: {feature} is not in [0, {self.features})")
        return self.decoder_weight[:, feature]


def encode(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> feature activations [..., F]: topk(relu(W_e (x - b_d) + b_e)), the
    other entries 0 (at most k nonzero per row)."""
    w = d.encoder_weight.to(x.dtype)
    pre = torch.relu((x - d.decoder_bias.to(x.dtype)) @ w.T + d.encoder_bias.to(x.dtype))
    values, index = pre.topk(d.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, index, values)


def decode(d: Dictionary, f: torch.Tensor) -> torch.Tensor:
    """Feature activations [..., F] -> reconstruction [..., d]: W_d f + b_d."""
    return f @ d.decoder_weight.to(f.dtype).T + d.decoder_bias.to(f.dtype)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the
    rows of x [n, d] (0: perfect; 1: no better than the mean)."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def save_dictionary(path: str | Path, d: Dictionary) -> Path:
    """Write ``d`` as safetensors, atomically (temp + rename)."""
    from safetensors.torch import save

    tensors = {
        "encoder.weight": d.encoder_weight,
        "encoder.bias": d.encoder_bias,
        "decoder.weight": d.decoder_weight,
        "decoder.bias": d.decoder_bias,
    }
    metadata = {
        **d.metadata,
        "layer": str(d.layer),
        "site": d.site,
        "k": str(d.k),
        "activation": "topk",
        "model": d.model,
    }
    data = save({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, metadata)
    return atomic_write_bytes(path, data)


def load_dictionary(path: str | Path) -> Dictionary:
    """Read a dictionary file; a missing tensor or metadata key, an unknown activation or
    inconsistent shapes are a SculptError naming the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SculptError(f"dictionary: {path} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
        names = set(fh.keys())  # safe_open is not a container: no `in fh`
        missing = [t for t in TENSORS if t not in names]
        if missing:
            raise SculptError(f"dictionary: {path} lacks tensor(s) {', '.join(missing)}")
        t = {name: fh.get_tensor(name).float() for name in TENSORS}
    for key in ("layer", "site", "k", "activation"):
        if key not in meta:
            raise SculptError(f"dictionary: {path} lacks metadata '{key}'")
    if meta["activation"] != "topk":
        raise SculptError(f"dictionary: {path}: activation '{meta['activation']}' is not topk")
    n, d = t["encoder.weight"].shape
    shapes = {"encoder.bias": (n,), "decoder.weight": (d, n), "decoder.bias": (d,)}
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise SculptError(
                f"dictionary: {path}: {name} has shape {tuple(t[name].shape)}, expected {shape}"
            )
    return Dictionary(
        encoder_weight=t["encoder.weight"],
        encoder_bias=t["encoder.bias"],
        decoder_weight=t["decoder.weight"],
        decoder_bias=t["decoder.bias"],
        k=int(meta["k"]),
        layer=int(meta["layer"]),
        site=meta["site"],
        model=meta.get("model", ""),
        metadata=meta,
    )


def massive_mask(x: torch.Tensor, ratio: float, reference: float | None = None) -> torch.Tensor:
    """Rows of x [n, d] whose norm exceeds ``ratio`` x ``reference`` (default: x's median
    row norm): "massive activations" (Sun et al., 2024), a sink-like token's few huge
    channels. On SmolLM2's middle layer 8 such tokens in 82k (not at position 0) hold 77%
    of the centred variance, so an FVU including them measures those 8 tokens."""
    norms = x.norm(dim=-1)
    ref = float(norms.median()) if reference is None else reference
    return norms > ratio * ref


class _Enough(Exception):
    """Raised by a hook once the block holding the wanted site has run."""


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    arch: ArchMap,
    windows: torch.Tensor,
    layer: int,
    site: str = "residual",
    batch_size: int = 8,
    skip_first: bool = True,
    track=None,
) -> torch.Tensor:
    """One site's activations over every token of ``windows`` [n, seq], as [tokens, d]
    float32, window by window; ``skip_first`` leaves out each window's first position (a
    Llama's attention sink carries huge channels whatever the token, which would dominate
    any reconstruction loss). The forward pass stops after block ``layer``: the blocks
    after it would only cost time."""
    check_supported(arch, "dictionaries")
    site_module(model, arch, site, layer)  # names a bad site / layer before any work

    def stop(*_: object) -> None:
        raise _Enough

    starts = range(0, len(windows), batch_size)
    chunks: list[torch.Tensor] = []
    with capture(model, arch, [(site, layer)]) as store:
        # Registered after capture's hook, so the site is recorded before the stop.
        handle = blocks(model, arch)[layer].register_forward_hook(stop)
        try:
            for start in track(starts, "collect activations") if track else starts:
                with contextlib.suppress(_Enough):
                    model(input_ids=windows[start : start + batch_size], use_cache=False)
                h = store.pop((site, layer)).float()
                chunks.append((h[:, 1:] if skip_first else h).reshape(-1, h.shape[-1]).clone())
        finally:
            handle.remove()
    return torch.cat(chunks)
