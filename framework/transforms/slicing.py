"""Slicing the residual stream: rotate it into a basis ordered by how much signal each
direction carries, then delete the last directions (SliceGPT, Ashkboos et al., 2024,
arXiv:2401.15024). Lossy by design: only the rotation is exact; the deletion removes what
the calibration data put in the discarded directions.

Two ways to choose the bases, one piece of weight surgery (with Q_k = Q[:, :k] and the
norm scales folded first): the embedding becomes E Q_k, every reader of a point of the
stream (q, k, v; gate, up; the head) W Q_k, every writer into it (o; down) Q_k^T W.

* slice_residual: one basis for the whole stream. Every residual add stays an identity,
  and the sliced model is an ordinary model of the same class with hidden_size = k
  (head_dim written explicitly, so attention keeps its width): `save_pretrained` /
  `from_pretrained` round-trip it with plain transformers. The price is a basis that fits
  all layers on average instead of each one.
* slice_per_layer: SliceGPT's scheme. Every norm input (each block's attention and MLP
  input, the final norm's) gets its own basis, the PCA of what reaches it in the model
  sliced so far (sequential, block by block, as GPTQ calibrates), so the error of earlier
  slices is seen by the later bases. A residual shortcut from basis Q_a to basis Q_b
  carries the [k, k] matrix Q_a,k^T Q_b,k, which the model class
  framework.models.sliced_llama holds (2 k^2 more weights per block).

RMSNorm after slicing: a k-wide norm divides by sqrt(||x_k||^2 / k) where the full one
divided by sqrt(||x||^2 / d), so the sliced norm's output is off by sqrt(d / k) *
||x_k|| / ||x|| per token. Each norm's scale (1 after folding) is set to that factor's
calibration estimate, sqrt(d / k * kept energy fraction at that norm) (norm_gain).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from framework.calibration import StopForward, capture_block_inputs, first_output
from framework.errors import SculptError
from framework.models.arch import ArchMap, blocks
from framework.models.sliced_llama import to_sliced_llama
from framework.transforms.common import attention_shape, block_parts
from framework.transforms.norms import fold_norm_scales, is_tied, untie_head


def norm_paths(model: nn.Module, arch: ArchMap) -> list[str]:
    """Dotted paths of every norm that reads the residual stream, in forward order."""
    assert arch.attn_norm is not None and arch.mlp_norm is not None
    assert arch.final_norm is not None
    out = []
    for i, _ in enumerate(blocks(model, arch)):
        out += [f"{arch.blocks}.{i}.{arch.attn_norm}", f"{arch.blocks}.{i}.{arch.mlp_norm}"]
    return [*out, arch.final_norm]


def _set_linear(layer: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give `layer` a new weight [out, in] (and bias), in its own dtype, frozen."""
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    layer.out_features, layer.in_features = weight.shape
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(dtype).contiguous(), requires_grad=False)


def _read(layer: nn.Linear, basis_k: torch.Tensor) -> None:
    """A reader of the stream: W <- W Q_k (its input is now the k sliced coordinates)."""
    _set_linear(layer, layer.weight.data.double() @ basis_k)


def _write(layer: nn.Linear, basis_k: torch.Tensor) -> None:
    """A writer into the stream: W <- Q_k^T W, b <- Q_k^T b (it writes k coordinates)."""
    bias = None if layer.bias is None else basis_k.T @ layer.bias.data.double()
    _set_linear(layer, basis_k.T @ layer.weight.data.double(), bias)


def _slice_embedding(model: nn.Module, arch: ArchMap, basis_k: torch.Tensor) -> nn.Embedding:
    embed = model.get_submodule(arch.embed)
    dtype = embed.weight.dtype
    embed.weight = nn.Parameter((embed.weight.data.double() @ basis_k).to(dtype).contiguous())
    embed.embedding_dim = basis_k.shape[1]
    return embed


def _set_norm(model: nn.Module, path: str, keep: int, gain: float) -> None:
    norm = model.get_submodule(path)
    norm.weight = nn.Parameter(torch.full((keep,), float(gain), dtype=norm.weight.dtype))


def norm_gain(d: int, keep: int, fraction: float | None = None) -> float:
    """A norm's scale after slicing d -> keep: sqrt(d / keep * kept energy fraction), the
    plain width correction sqrt(d / keep) without a fraction."""
    return math.sqrt(d / keep * (1.0 if fraction is None else fraction))


def _checked_basis(basis: torch.Tensor, d: int, keep: int) -> torch.Tensor:
    """The first `keep` columns of an orthogonal [d, d] basis, float64."""
    if not 0 < keep <= d:
        raise SculptError(f"transforms: cannot keep {keep} of {d} residual dimensions")
    q = basis.to(torch.float64)
    if q.shape != (d, d):
        raise SculptError(f"transforms: basis is {tuple(q.shape)}, residual width is {d}")
    if not torch.allclose(q.T @ q, torch.eye(d, dtype=torch.float64), atol=1e-8):
        raise SculptError("transforms: the slicing basis is not orthogonal")
    return q[:, :keep].contiguous()


def _finish(model: nn.Module, keep: int, head_dim: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.hidden_size = keep
    # Attention's width no longer follows hidden_size / heads: pin it for from_pretrained.
    model.config.head_dim = head_dim
    return model


@torch.no_grad()
def slice_residual(
    model: nn.Module,
    arch: ArchMap,
    basis: torch.Tensor,
    keep: int,
    norm_gains: dict[str, float] | None = None,
) -> nn.Module:
    """Rotate the residual stream by `basis` ([d, d] orthogonal, columns in decreasing
    importance), keep its first `keep` directions, and shrink every tensor touching the
    stream. The model is changed in place (same class, hidden_size = keep) and returned.

    norm_gains: norm path (norm_paths) -> scale of that norm after slicing; missing ones
    get sqrt(d / keep), exact when the discarded directions carry nothing.
    """
    shape = attention_shape(model, arch)
    d = model.get_submodule(arch.embed).weight.shape[1]
    q = _checked_basis(basis, d, keep)
    fold_norm_scales(model, arch)
    assert arch.head is not None
    tied = is_tied(model, arch)
    embed = _slice_embedding(model, arch, q)
    for parts in block_parts(model, arch):
        for layer in (parts.q, parts.k, parts.v, *parts.mlp_in):
            _read(layer, q)
        for layer in (parts.o, parts.mlp_out):
            _write(layer, q)
    head = model.get_submodule(arch.head)
    if tied:
        head.weight = embed.weight
    else:
        _read(head, q)
    gains = norm_gains or {}
    for path in norm_paths(model, arch):
        _set_norm(model, path, keep, gains.get(path, norm_gain(d, keep)))
    return _finish(model, keep, shape.head_dim)


def token_moment(x: torch.Tensor, normalize_tokens: bool = True) -> tuple[torch.Tensor, int]:
    """(sum over tokens of u u^T [d, d] float64, token count) for activations [..., d];
    u = each token divided by its RMS (normalize_tokens) or as it is."""
    u = x.detach().float().reshape(-1, x.shape[-1])
    if normalize_tokens:
        u = u * torch.rsqrt(u.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-30))
    return (u.T @ u).double(), u.shape[0]


def _run_block(
    block: nn.Module,
    chunks: list[torch.Tensor],
    calls: list[tuple[slice, tuple[Any, ...], dict[str, Any]]],
    stop_at: nn.Module | None = None,
) -> list[torch.Tensor]:
    """The block's output for each chunk, or (stop_at) what that submodule receives."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())
        raise StopForward

    handle = stop_at.register_forward_pre_hook(hook) if stop_at is not None else None
    out = []
    try:
        for x, (_, args, kwargs) in zip(chunks, calls, strict=True):
            try:
                out.append(first_output(block(x, *args, **kwargs)))
            except StopForward:
                out.append(seen.pop())
    finally:
        if handle is not None:
            handle.remove()
    return out


def _outputs_of(
    block: nn.Module,
    layers: dict[str, nn.Linear],
    chunks: list[torch.Tensor],
    calls: list[tuple[slice, tuple[Any, ...], dict[str, Any]]],
    inputs_of: dict[str, nn.Module] | None = None,
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The block's output per chunk, and what each of `layers` produced on the way (and,
    for `inputs_of`, what each of those modules received)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    seen |= {name: [] for name in inputs_of or {}}
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, name=name: seen[name].append(out.detach()))
        for name, layer in layers.items()
    ]
    handles += [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: seen[name].append(args[0].detach())
        )
        for name, module in (inputs_of or {}).items()
    ]
    try:
        stream = _run_block(block, chunks, calls)
    finally:
        for h in handles:
            h.remove()
    return stream, seen


def _ls_error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, energy: float) -> float:
    """||X W^T - Y||^2 / ||Y||^2 from G = X^T X, C = X^T Y and ||Y||^2 alone."""
    squared = float((w @ gram * w).sum() - 2 * (w * cross.T).sum()) + energy
    return squared / max(energy, 1e-30)


@torch.no_grad()
def refit_linears(
    layers: list[nn.Linear],
    inputs: list[torch.Tensor],
    targets: list[list[torch.Tensor]],
    damp: float,
    project: torch.Tensor | None = None,
) -> list[tuple[float, float]]:
    """Least-squares refit of linears that share one input: each W becomes the ridge
    solution of min ||X W^T - Y||^2 over the calibration tokens (X the sliced model's own
    input to the layer, Y the original model's output there, projected by `project` [d, k]
    for a writer into the sliced stream), plus a ridge lambda ||W - W_sliced||^2 with
    lambda = `damp` times the mean of diag(X^T X) (as GPTQ dampens its Hessian). Returns
    each layer's relative error (||X W^T - Y||^2 / ||Y||^2) before and after."""
    gram: torch.Tensor | None = None
    cross: list[torch.Tensor | None] = [None] * len(layers)
    energy = [0.0] * len(layers)
    proj = None if project is None else project.float()
    for i, x in enumerate(inputs):
        # Products in float32 a chunk at a time, sums across chunks in float64: the float64
        # products cost several times more on a CPU and add nothing at this size.
        x2 = x.reshape(-1, x.shape[-1]).float()
        g = (x2.T @ x2).double()
        gram = g if gram is None else gram + g
        for j, target in enumerate(targets):
            y = target[i].reshape(-1, target[i].shape[-1]).float()
            if proj is not None:
                y = y @ proj.to(y.device)
            c = (x2.T @ y).double()
            cross[j] = c if cross[j] is None else cross[j] + c
            energy[j] += float(y.double().pow(2).sum())
    assert gram is not None
    ridge = damp * float(gram.diagonal().mean()) + 1e-12
    solve = torch.linalg.cholesky(
        gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    )
    errors = []
    for layer, c, total in zip(layers, cross, energy, strict=True):
        assert c is not None
        old = layer.weight.data.double()
        # The ridge pulls towards the sliced weight, not towards zero: directions the
        # calibration tokens do not reach keep what slicing gave them.
        new = torch.cholesky_solve(c + ridge * old.T, solve).T
        before, after = (_ls_error(w, gram, c, total) for w in (old, new))
        errors.append((before, after))
        _set_linear(layer, new)
    return errors


def _stream_targets(
    original: list[torch.Tensor],
    sliced: list[torch.Tensor],
    q_from: torch.Tensor,
    q_to: torch.Tensor,
) -> list[torch.Tensor]:
    """Per chunk, what a writer into basis `q_to` must add for the sliced stream to hold the
    original one: the original stream in the new basis, less what the sliced shortcut
    carries over from the sliced stream in basis `q_from`."""
    lift = q_from.T @ q_to
    return [
        (t.double() @ q_to - x.double() @ lift.to(x.device)).to(t.dtype)
        for t, x in zip(original, sliced, strict=True)
    ]


@torch.no_grad()
def slice_per_layer(
    model: nn.Module,
    arch: ArchMap,
    windows: torch.Tensor,
    keep: int,
    batch_size: int,
    normalize_tokens: bool = True,
    norm_correction: bool = True,
    anchor: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
    refit_damp: float | None = None,
    refit_errors: dict[str, tuple[float, float]] | None = None,
    refit_target: str = "layer",
    track: Callable[[Any], Any] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """SliceGPT's per-layer slicing, calibrated sequentially on `windows`. Returns the
    sliced model (a new SlicedLlamaForCausalLM, hidden_size = keep; `model` is left folded
    and untied, not sliced) and, per norm path, the energy fraction its basis keeps.

    At each norm input, in forward order, the PCA (PROTOCOL weighting: each token
    RMS-normalised first when normalize_tokens) of the d-wide stream as the model sliced
    so far produces it: the shortcut into that point still maps the k sliced coordinates
    back to d (Q_prev,k^T), the sublayer writes d. Then the point's readers take Q_k, its
    norm the gain (norm_gain), the writers into it Q_k^T, the shortcut Q_prev,k^T Q_k.

    anchor ([d, d] second moment, e.g. the global basis's) with anchor_weight a in [0, 1]:
    each point's PCA is of (1 - a) C / tr C + a anchor / tr anchor instead of C, pulling
    the bases towards one shared basis (a = 1: every basis the anchor's, identity
    shortcuts up to rounding). The kept fractions are always of C itself.

    refit_damp (a ridge, e.g. 0.01; None: off): after each linear is sliced, refit it by
    least squares (refit_linears) so that, on the sliced model's own inputs, it produces
    what the original layer produced on the original model's inputs (a writer: that
    output in the new basis). The original model runs beside the sliced one, block by
    block; each layer's error before and after goes to `refit_errors` by its path.
    refit_target=stream: a writer (o, down) is fitted instead to what the stream should
    hold after it, the original model's stream in the new basis minus what the sliced
    model's shortcut already carries, so it also absorbs the error the stream has
    accumulated so far, where its input can predict it.
    track: wraps the loop over blocks (progress reporting, e.g. Context.track).
    """
    if arch.family != "llama":
        raise SculptError(
            f"transforms: per-layer slicing needs a llama-family model, not '{arch.family}'"
        )
    shape = attention_shape(model, arch)
    d = model.get_submodule(arch.embed).weight.shape[1]
    if not 0 < keep <= d:
        raise SculptError(f"transforms: cannot keep {keep} of {d} residual dimensions")
    fold_norm_scales(model, arch)
    untie_head(model, arch)
    sliced = to_sliced_llama(model).eval()
    paths = norm_paths(sliced, arch)
    fractions: dict[str, float] = {}

    def settle(path: str, xs: list[torch.Tensor]) -> torch.Tensor:
        """The basis at `path` from the activations reaching it; sets its norm."""
        moments = [token_moment(x, normalize_tokens) for x in xs]
        cov = sum(m for m, _ in moments) / sum(n for _, n in moments)
        mixed = cov
        if anchor is not None and anchor_weight > 0:
            a = anchor.to(cov) / torch.trace(anchor.to(cov))
            mixed = (1 - anchor_weight) * cov / torch.trace(cov) + anchor_weight * a
        _, vectors = pca_basis(mixed)
        fractions[path] = kept_fraction(cov, vectors, keep)
        _set_norm(
            sliced, path, keep, norm_gain(d, keep, fractions[path] if norm_correction else None)
        )
        return vectors[:, :keep].contiguous()

    def project(xs: list[torch.Tensor], q: torch.Tensor) -> list[torch.Tensor]:
        return [(x.double() @ q.to(x.device)).to(x.dtype) for x in xs]

    device = next(sliced.parameters()).device
    layers = blocks(sliced, arch)
    inputs = capture_block_inputs(sliced, layers[0], windows, batch_size, device)
    chunks = [inputs.hidden[rows] for rows, _, _ in inputs.calls]
    q = settle(paths[0], chunks)
    _slice_embedding(sliced, arch, q)
    chunks = project(chunks, q)
    assert arch.mlp_norm is not None and arch.head is not None
    refit = refit_damp is not None
    if refit:
        # The original model (folded, untied: the same function) runs beside the sliced one.
        teacher_blocks = blocks(model, arch)
        teacher_parts = block_parts(model, arch)
        teacher_in = capture_block_inputs(model, teacher_blocks[0], windows, batch_size, device)
        teacher_chunks = [teacher_in.hidden[rows] for rows, _, _ in teacher_in.calls]
    calls = inputs.calls

    def fit(i: int, names: list[str], group: list[nn.Linear], targets, stop_at, proj=None):
        assert refit_damp is not None
        xs = _run_block(layers[i], chunks, calls, stop_at)
        errors = refit_linears(group, xs, [targets[n] for n in names], refit_damp, proj)
        if refit_errors is not None:
            for name, err in zip(names, errors, strict=True):
                refit_errors[f"{arch.blocks}.{i}.{name}"] = err

    pairs = list(zip(layers, block_parts(sliced, arch), strict=True))
    for i, (block, parts) in enumerate(track(pairs) if track else pairs):
        if refit:
            tp = teacher_parts[i]
            wanted = {"q": tp.q, "k": tp.k, "v": tp.v, "o": tp.o, "mlp_out": tp.mlp_out}
            wanted |= {f"mlp_in{j}": m for j, m in enumerate(tp.mlp_in)}
            # The stream target also needs the original stream between the two sublayers.
            mid = {"mid": teacher_blocks[i].get_submodule(arch.mlp_norm)}
            teacher_chunks, want = _outputs_of(
                teacher_blocks[i],
                wanted,
                teacher_chunks,
                teacher_in.calls,
                mid if refit_target == "stream" else None,
            )
            stream_in = chunks  # the sliced stream entering the block, basis q
        for layer in (parts.q, parts.k, parts.v):
            _read(layer, q)
        if refit:
            fit(i, ["q", "k", "v"], [parts.q, parts.k, parts.v], want, parts.q)
        _set_linear(block.attn_shortcut, q)  # for now back to d: x_k Q_k^T
        mids = _run_block(block, chunks, calls, block.get_submodule(arch.mlp_norm))
        q_mid = settle(paths[2 * i + 1], mids)
        del mids
        _set_linear(block.attn_shortcut, (q.T @ q_mid).T)
        _write(parts.o, q_mid)
        if refit and refit_target == "stream":
            want["o"] = _stream_targets(want["mid"], stream_in, q, q_mid)
            fit(i, ["o"], [parts.o], want, parts.o)
        elif refit:
            fit(i, ["o"], [parts.o], want, parts.o, q_mid)
        for layer in parts.mlp_in:
            _read(layer, q_mid)
        if refit:
            names = [f"mlp_in{j}" for j in range(len(parts.mlp_in))]
            fit(i, names, parts.mlp_in, want, parts.mlp_in[0])
        _set_linear(block.mlp_shortcut, q_mid)
        outs = _run_block(block, chunks, calls)
        q_out = settle(paths[2 * i + 2], outs)
        _set_linear(block.mlp_shortcut, (q_mid.T @ q_out).T)
        _write(parts.mlp_out, q_out)
        if refit and refit_target == "stream":
            mids_now = _run_block(block, chunks, calls, block.get_submodule(arch.mlp_norm))
            want["mlp_out"] = _stream_targets(teacher_chunks, mids_now, q_mid, q_out)
            del mids_now
            fit(i, ["mlp_out"], [parts.mlp_out], want, parts.mlp_out)
        elif refit:
            fit(i, ["mlp_out"], [parts.mlp_out], want, parts.mlp_out, q_out)
        if refit:
            del want
            chunks = _run_block(block, chunks, calls)  # the stream as the refit block makes it
        else:
            chunks = project(outs, q_out)
        q = q_out
        del outs
    _read(sliced.get_submodule(arch.head), q)
    return _finish(sliced, keep, shape.head_dim), fractions


def kept_fraction(cov: torch.Tensor, basis: torch.Tensor, keep: int) -> float:
    """Share of a second-moment matrix's energy inside the first `keep` basis columns."""
    top = basis[:, :keep].to(cov.dtype)
    total = float(torch.trace(cov))
    return float(torch.trace(top.T @ cov @ top)) / total if total > 0 else 1.0


def pca_basis(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of a symmetric second-moment matrix, by decreasing eigenvalue."""
    values, vectors = torch.linalg.eigh(cov.double())
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order]
