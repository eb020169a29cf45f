"""framework.transforms.learned_slicing: the hooked view computes the really sliced model,
and the learned rotation lowers the sliced model's KL to the original, on the tiny Llama
with random norm scales (so folding them matters)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from framework.errors import ConfigError
from framework.models import LoadedModel
from framework.plugins import Context
from framework.transforms import random_orthogonal
from framework.transforms.learned_slicing import ProjectedStream, learn_slicing_rotation
from framework.transforms.slicing import (
    kept_fraction,
    norm_gain,
    norm_paths,
    pca_basis,
    slice_residual,
)
from plugins.compressors.slice import Slice, residual_second_moments

D, KEEP = 64, 40


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean())


def _really_sliced(loaded: LoadedModel, basis: torch.Tensor, moments) -> nn.Module:
    model = copy.deepcopy(loaded.model)
    gains = {p: norm_gain(D, KEEP, kept_fraction(c, basis, KEEP)) for p, c in moments.items()}
    return slice_residual(model, loaded.arch, basis, KEEP, gains)


@pytest.fixture(scope="module")
def tokens() -> dict[str, torch.Tensor]:
    every = torch.randint(0, 256, (24, 32), generator=_gen(3))
    return {"calibration": every[:16], "held_out": every[16:]}


def _moments(loaded: LoadedModel, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    paths = norm_paths(loaded.model, loaded.arch)
    return residual_second_moments(loaded.model, paths, windows, 8)


def test_the_hooked_view_is_the_sliced_model(tokens, scaled_tiny) -> None:
    """Projected writes and sqrt(kept share) on each norm = slicing, up to the norms' eps
    (1e-12 here: the tiny model's residual is small enough for eps to show at 1e-3);
    without the norm scaling the two disagree, and with the hooks off nothing changes.
    scale_norms=False is the slice made with norm_correction=false."""
    loaded = scaled_tiny()
    for module in loaded.model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-12
    ids = tokens["held_out"]
    moments = _moments(loaded, tokens["calibration"])
    basis = random_orthogonal(D, _gen(0))
    original = _logits(loaded.model, ids)
    sliced = _logits(_really_sliced(loaded, basis, moments), ids)
    view = ProjectedStream(loaded.model, loaded.arch, moments)
    view.u = basis[:, :KEEP].float()
    assert torch.equal(_logits(loaded.model, ids), original)  # inactive: untouched
    view.active = True
    hooked = _logits(loaded.model, ids)
    assert _rel(hooked, sliced) < 1e-5
    assert _rel(hooked, original) > 1e-2  # the slice itself is lossy
    view.shares = {p: torch.eye(D) / KEEP for p in view.shares}  # every norm scale 1
    assert _rel(_logits(loaded.model, ids), sliced) > 1e-2
    view.remove()
    assert torch.equal(_logits(loaded.model, ids), original)
    # norm_correction=false: the slice's plain sqrt(d / k) norm scales need no norm hook
    plain = copy.deepcopy(loaded.model)
    plain_sliced = _logits(slice_residual(plain, loaded.arch, basis, KEEP), ids)
    unscaled = ProjectedStream(loaded.model, loaded.arch, moments, scale_norms=False)
    unscaled.u, unscaled.active = basis[:, :KEEP].float(), True
    assert _rel(_logits(loaded.model, ids), plain_sliced) < 1e-5
    assert _rel(plain_sliced, sliced) > 1e-2  # the two norm settings are different models
    unscaled.remove()


def test_the_learned_rotation_lowers_the_kl_of_the_real_slice(tokens, scaled_tiny) -> None:
    """From the PCA basis, 20 Adam steps must lower the really sliced model's KL to the
    original on the calibration windows, and the result must stay orthogonal."""
    loaded = scaled_tiny()
    calibration = tokens["calibration"]
    moments = _moments(loaded, calibration)
    _, pca = pca_basis(sum(moments.values()))
    flags = [p.requires_grad for p in loaded.model.parameters()]
    learned, log = learn_slicing_rotation(
        loaded.model, loaded.arch, pca, KEEP, moments, calibration, 20, 1e-2, 4, _gen(0)
    )
    assert len(log["losses"]) == 20 and log["kl_after"] < log["kl_before"]
    assert torch.allclose(learned.T @ learned, torch.eye(D, dtype=torch.float64), atol=1e-10)
    assert [p.requires_grad for p in loaded.model.parameters()] == flags  # as it came
    reference = _logits(loaded.model, calibration)
    kl = {
        name: _kl(reference, _logits(_really_sliced(loaded, basis, moments), calibration))
        for name, basis in (("pca", pca), ("learned", learned))
    }
    assert kl["learned"] < 0.9 * kl["pca"], kl


def test_the_slice_plugin_learns_its_rotation(make_ctx, tmp_path, scaled_tiny) -> None:
    loaded = scaled_tiny()
    ctx: Context = make_ctx(loaded, tmp_path, stage_name="slice")
    result = Slice(sparsity=0.25, rotation_steps=10, rotation_lr=3e-3).compress(loaded.model, ctx)
    assert result.model is not None and type(result.model).__name__ == "LlamaForCausalLM"
    assert result.model.config.hidden_size == 48
    assert result.metrics["rotation_kl_after"] < 0.9 * result.metrics["rotation_kl_before"], (
        result.metrics
    )
    assert [row["step"] for row in result.tables["rotation"]] == list(range(1, 11))


def test_rotation_config_errors() -> None:
    with pytest.raises(ConfigError, match="rotation_steps"):
        Slice(basis="per_layer", rotation_steps=10)
    with pytest.raises(ConfigError, match="rotation_steps"):
        Slice(rotation_steps=-1)
    with pytest.raises(ConfigError, match="rotation_lr"):
        Slice(rotation_steps=10, rotation_lr=0)
