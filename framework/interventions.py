"""Activation capture and patching through forward hooks, kept in one place.

Sites are named through the architecture map, never by module type:

* ``embed``: the token embeddings (the residual stream before block 0);
* ``residual``: a block's output, the residual stream after block ``layer``;
* ``attn``: the attention output that block ``layer`` adds to the stream (the output of
  its ``o`` projection; for Llama exactly ``self_attn``'s output);
* ``mlp``: the MLP output it adds (the output of ``mlp_out``, Llama's ``down_proj``).

Hooking the two output projections rather than the ``self_attn`` / ``mlp`` modules keeps
the site inside what the ArchMap names, and their outputs are the residual increments
themselves (Llama has no dropout or bias after them). Only pre-norm decoders whose residual
stream is the block output (the Llama family: Llama, Mistral, Qwen2, SmolLM2 and the tiny
test Llama) are supported; anything else is a SculptError naming the family.

Plain hooks were chosen over nnsight / pyvene: the four sites above are all causal tracing,
the logit lens, CKA and probes need, and a dependency that wraps the model would have to
agree with every other stage (compression, saving) on what the model object is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from framework.errors import SculptError
from framework.models.arch import ArchMap, blocks

Site = Literal["embed", "residual", "attn", "mlp"]
SITES: tuple[str, ...] = ("embed", "residual", "attn", "mlp")
SUPPORTED_FAMILIES = ("llama",)

#: (site, layer); layer is ignored (use 0) for ``embed``.
SiteKey = tuple[str, int]
#: Receives the site's output [batch, seq, hidden] and returns the replacement (or None to
#: keep the tensor it edited in place).
PatchFn = Callable[[torch.Tensor], torch.Tensor | None]


def check_supported(arch: ArchMap, what: str = "interventions") -> None:
    if arch.family not in SUPPORTED_FAMILIES:
        raise SculptError(
            f"model: {what} support the {', '.join(SUPPORTED_FAMILIES)} family only "
            f"(pre-norm decoder with a residual stream per block); got '{arch.family}'"
        )


def num_layers(model: nn.Module, arch: ArchMap) -> int:
    return len(blocks(model, arch))


def site_module(model: nn.Module, arch: ArchMap, site: str, layer: int = 0) -> nn.Module:
    """The module whose forward output is the named site."""
    check_supported(arch)
    if site == "embed":
        return model.get_submodule(arch.embed)
    if site not in SITES:
        raise SculptError(f"site: '{site}' is not one of {', '.join(SITES)}")
    layers = blocks(model, arch)
    if not -len(layers) <= layer < len(layers):
        raise SculptError(f"layer: {layer} does not exist (model has {len(layers)} blocks)")
    block = layers[layer]
    if site == "residual":
        return block
    return block.get_submodule(arch.o if site == "attn" else arch.mlp_out)


def _output(out: object) -> torch.Tensor:
    # Decoder layers return a tensor in transformers >= 4.5x, a tuple before.
    return out[0] if isinstance(out, tuple) else out  # type: ignore[return-value]


def _replace(out: object, new: torch.Tensor) -> object:
    return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def capture(
    model: nn.Module, arch: ArchMap, sites: Iterable[SiteKey], detach: bool = True
) -> Iterator[dict[SiteKey, torch.Tensor]]:
    """Record each site's output during the forward passes run inside the block.

    The dict is filled as the model runs; a second forward pass overwrites it."""
    store: dict[SiteKey, torch.Tensor] = {}
    handles = []
    try:
        for key in dict.fromkeys(sites):
            module = site_module(model, arch, *key)

            def hook(_m: nn.Module, _a: object, out: object, key: SiteKey = key) -> None:
                value = _output(out)
                store[key] = value.detach() if detach else value

            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def patch(model: nn.Module, arch: ArchMap, patches: Mapping[SiteKey, PatchFn]) -> Iterator[None]:
    """Replace site outputs during the forward passes run inside the block."""
    handles = []
    try:
        for key, fn in patches.items():
            module = site_module(model, arch, *key)

            def hook(_m: nn.Module, _a: object, out: object, fn: PatchFn = fn) -> object:
                value = _output(out)
                new = fn(value)
                return _replace(out, value if new is None else new)

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def set_positions(
    values: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None
) -> PatchFn:
    """A patch writing ``values[i]`` at ``(rows[i], positions[i])`` (every row when rows is
    None; then values is [k, hidden] for k positions)."""

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()  # never write into a tensor autograd or a caller still holds
        if rows is None:
            out[:, positions] = values.to(out.dtype)
        else:
            out[rows, positions] = values.to(out.dtype)
        return out

    return fn


def add_at_positions(delta: torch.Tensor, positions: torch.Tensor) -> PatchFn:
    """A patch adding ``delta`` ([batch, k, hidden]) at ``positions`` of every row."""

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, positions] = out[:, positions] + delta.to(out.dtype)
        return out

    return fn


def residual_stream(
    model: nn.Module, arch: ArchMap, input_ids: torch.Tensor, layers: Iterable[int] | None = None
) -> dict[int, torch.Tensor]:
    """The residual stream after each requested block (all by default): layer -> [b, s, d].

    Not ``output_hidden_states``: transformers stores the last entry after the final norm,
    which would make the last layer the odd one out."""
    wanted = list(range(num_layers(model, arch))) if layers is None else list(layers)
    with capture(model, arch, [("residual", i) for i in wanted]) as store, torch.no_grad():
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return {i: store[("residual", i)] for i in wanted}


def lens_logits(model: nn.Module, arch: ArchMap, hidden: torch.Tensor) -> torch.Tensor:
    """The logit lens (nostalgebraist, 2020): the final norm and the LM head applied to a
    residual stream state. On the last block's output it gives the model's own logits."""
    check_supported(arch, "the logit lens")
    if arch.head is None or arch.final_norm is None:
        raise SculptError(f"model: the {arch.family} map names no final norm / LM head")
    norm = model.get_submodule(arch.final_norm)
    head = model.get_submodule(arch.head)
    return head(norm(hidden))


def run_from(
    model: nn.Module, arch: ArchMap, start: int, hidden: torch.Tensor, **kwargs: object
) -> object:
    """Run the model from block ``start`` on, given the residual stream before it
    (``hidden``, [b, s, d]: the embeddings for start=0, else block start-1's output).

    Blocks before ``start`` are not run: when an intervention only touches block ``start``
    or later, their outputs are those of a run already captured, and skipping them halves
    the cost of a layer sweep. Hooks registered on the blocks still fire (same modules)."""
    check_supported(arch)
    parent_path, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attr)
    if not 0 <= start < len(full):
        raise SculptError(f"layer: {start} does not exist (model has {len(full)} blocks)")
    # Modules keep their identity (and their hooks); only the list the loop walks shrinks.
    # An instance attribute shadows the registered submodule for this call without
    # touching _modules (so state_dict and parameters never see the short list).
    parent.__dict__[attr] = nn.ModuleList(list(full)[start:])
    try:
        return model(inputs_embeds=hidden, use_cache=False, **kwargs)
    finally:
        del parent.__dict__[attr]
