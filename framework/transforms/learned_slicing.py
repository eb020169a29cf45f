"""A slicing basis learned by gradient descent on the model's own output.

PCA (slicing.py) keeps the directions of the residual stream that carry the most energy;
the model may need others. Starting from a PCA basis Q0, the basis is turned by a learned
rotation, Q = Q0 exp(A - A^T), A trained with Adam on KL(original || sliced) over
calibration windows while every weight stays frozen. This is SpinQuant's recipe (Liu et
al., 2024, arXiv:2405.16406: learn the rotation on the output loss, from a good start),
applied to the subspace a slice keeps instead of a quantizer's input. It is not free of
training, so it is reported as what it is: the kept subspace (k (d - k) degrees of
freedom) is fitted on the calibration text, the weights themselves untouched; the result
is still one global basis, so the sliced model stays a plain model of the original class.

The model is not resliced at every step. Slicing to U = Q[:, :k] is, up to the norms'
epsilon, the original model with its residual stream projected on span(U) wherever
something writes into it (embedding, o_proj, down_proj) and each norm's output scaled by
sqrt(f), f the share of that norm's calibration energy (the RMS-normalised second moment,
as the PCA weighs it) inside span(U): exactly the correction `slicing.norm_gain` bakes into
the sliced norms (without it, `scale_norms=False`, the plain sqrt(d / k) width correction
needs no hook). `ProjectedStream` installs those hooks; tests check it against the
really sliced model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from framework.eval.metrics import kl_per_token
from framework.models.arch import ArchMap
from framework.transforms.common import block_parts


class ProjectedStream:
    """Hooks that make `model` compute what it would compute sliced to span(u), while
    `active`: every write into the residual stream projected on span(u) (u: [d, k],
    orthonormal columns, float32), every norm output scaled by sqrt(kept energy share)
    when `scale_norms` (the slice's norm_correction). `moments`: norm path -> that norm
    input's second moment [d, d] (any scale)."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchMap,
        moments: dict[str, torch.Tensor],
        scale_norms: bool = True,
    ):
        self.active = False
        self.u: torch.Tensor | None = None
        self.shares = {p: (c / torch.trace(c)).float() for p, c in moments.items()}
        writers = [model.get_submodule(arch.embed)]
        for parts in block_parts(model, arch):
            writers += [parts.o, parts.mlp_out]
        self._handles = [w.register_forward_hook(self._project) for w in writers]
        if scale_norms:
            self._handles += [
                model.get_submodule(path).register_forward_hook(self._scale(path))
                for path in self.shares
            ]

    def _project(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> Any:
        if not self.active:
            return None
        assert self.u is not None
        return (out @ self.u) @ self.u.T

    def _scale(self, path: str) -> Callable[..., Any]:
        def run(_module: nn.Module, _args: Any, out: torch.Tensor) -> Any:
            if not self.active:
                return None
            assert self.u is not None
            return out * torch.sqrt(torch.trace(self.u.T @ self.shares[path] @ self.u))

        return run

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), nats."""
    return kl_per_token(teacher_logp, F.log_softmax(student_logits.float(), dim=-1)).mean()


@torch.enable_grad()  # callers (a compressor's compress) usually run under no_grad
def learn_slicing_rotation(
    model: nn.Module,
    arch: ArchMap,
    basis: torch.Tensor,
    keep: int,
    moments: dict[str, torch.Tensor],
    windows: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    track: Callable[[Iterable[int]], Iterator[int]] = iter,
    scale_norms: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Turn `basis` ([d, d] orthogonal, float64; its first `keep` columns are what a slice
    keeps) by a rotation learned on KL(original || sliced) over random batches of
    `windows`. Returns the new [d, d] basis (float64, orthogonal to rounding) and a log:
    the loss per step and the KL on the first batch_size windows before and after.
    `scale_norms`: whether the slice will set its norm scales from the kept energy
    (Slice's norm_correction), so that the rotation is trained on the model it makes."""
    d = basis.shape[0]
    skew = torch.zeros(d, d, dtype=torch.float64, requires_grad=True)
    start = basis.to(torch.float64)

    def current() -> torch.Tensor:
        return start @ torch.linalg.matrix_exp(skew - skew.T)

    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    view = ProjectedStream(model, arch, moments, scale_norms)
    device = next(model.parameters()).device

    def kl_on(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            view.active = False
            target = F.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        view.active, view.u = True, current()[:, :keep].float().to(device)
        try:
            return token_kl(model(input_ids=batch, use_cache=False).logits, target)
        finally:
            view.active = False

    probe = windows[:batch_size].to(device)
    losses: list[float] = []
    try:
        with torch.no_grad():
            before = float(kl_on(probe))
        optimizer = torch.optim.Adam([skew], lr=lr)
        for _ in track(range(steps)):
            pick = torch.randint(0, windows.shape[0], (batch_size,), generator=generator)
            loss = kl_on(windows[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            after = float(kl_on(probe))
            learned = current().detach()
    finally:
        view.remove()
        for p in trainable:
            p.requires_grad_(True)
    return learned, {"losses": losses, "kl_before": before, "kl_after": after}
