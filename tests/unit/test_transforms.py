"""Function-preserving transforms (framework.transforms): every one keeps the logits
within 1e-4 relative error in fp32 while actually changing the weights, on the tiny Llama
(norm scales randomised so folding matters) and, marked slow, on SmolLM2. Each symmetry
also has a near miss that is NOT a symmetry (rotating without folding the norms, a
general rotation of RoPE'd queries/keys, scaling the SiLU gate, splitting a GQA group...)
and must break the model: a transform that silently did nothing, or the wrong thing,
fails here."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from framework.codecs import container_size, read_container, write_container
from framework.codecs.raw import decode_raw, encode_raw
from framework.errors import ConfigError, SculptError
from framework.models import LoadedModel, arch_for, build_tiny_llama, load_packaged
from framework.models.arch import ArchMap
from framework.plugins import Context
from framework.transforms import (
    attention_shape,
    block_parts,
    fold_norm_scales,
    hadamard_matrix,
    is_tied,
    random_orthogonal,
    random_rotation,
    rotate_queries_keys,
    rotate_residual,
    rotate_values,
)
from framework.transforms import permutations as perms
from framework.transforms import rotations as rots
from framework.transforms import scalings as scales
from framework.transforms.common import block_diag_heads, transform_input, transform_output
from framework.transforms.slicing import slice_per_layer, slice_residual
from plugins.compressors.rotate_quant import RotateQuant
from plugins.compressors.rtn import RTN
from plugins.compressors.slice import Slice

TOL = 1e-4
BROKEN = 1e-2  # a near miss must move the logits by at least this much


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pos(n: int, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*(shape or (n,)), generator=g, dtype=torch.float64) + 0.5


# --- the transforms, applied model-wide -------------------------------------------------


def _fold(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    fold_norm_scales(m, arch)


def _residual(kind: str) -> Callable[[nn.Module, ArchMap, torch.Generator], None]:
    def apply(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
        d = m.get_submodule(arch.embed).weight.shape[1]
        rotate_residual(m, arch, random_rotation(d, kind, g))  # type: ignore[arg-type]

    return apply


def _values(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    rotate_values(m, arch, "hadamard", g)


def _queries_keys(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    rotate_queries_keys(m, arch, g)


def _norm_scaling(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    for parts in block_parts(m, arch):
        d = parts.q.in_features
        scales.scale_attention_input(parts, _pos(d, g))
        scales.scale_mlp_input(parts, _pos(d, g))


def _neuron_scaling(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    for block, parts in zip(m.get_submodule(arch.blocks), block_parts(m, arch), strict=True):
        scales.scale_mlp_neurons(block, arch, _pos(parts.mlp_out.in_features, g))


def _value_scaling(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    shape = attention_shape(m, arch)
    for parts in block_parts(m, arch):
        scales.scale_value_channels(parts, shape, _pos(shape.kv_heads * shape.head_dim, g))


def _plane_scaling(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    shape = attention_shape(m, arch)
    for parts in block_parts(m, arch):
        c = _pos(0, g, shape.kv_heads, shape.head_dim // 2)
        scales.scale_query_key_planes(parts, shape, c)


def _neuron_perm(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    for parts in block_parts(m, arch):
        perms.permute_mlp_neurons(parts, torch.randperm(parts.mlp_out.in_features, generator=g))


def _head_perm(m: nn.Module, arch: ArchMap, g: torch.Generator) -> None:
    shape = attention_shape(m, arch)
    for parts in block_parts(m, arch):
        perms.permute_heads(parts, shape, perms.random_head_permutation(shape, g))


TRANSFORMS = {
    "fold_norms": _fold,
    "residual_hadamard": _residual("hadamard"),
    "residual_orthogonal": _residual("orthogonal"),
    "value_rotations": _values,
    "query_key_plane_rotations": _queries_keys,
    "norm_scalings": _norm_scaling,
    "mlp_neuron_scalings": _neuron_scaling,
    "value_scalings": _value_scaling,
    "query_key_plane_scalings": _plane_scaling,
    "mlp_neuron_permutations": _neuron_perm,
    "head_permutations": _head_perm,
}


# --- helpers ----------------------------------------------------------------------------


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _max_weight_change(before: nn.Module, after: nn.Module) -> float:
    a, b = before.state_dict(), after.state_dict()
    return max(
        float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max())
        for k in a
        if a[k].shape == b[k].shape and a[k].is_floating_point()
    )


@pytest.fixture(scope="module")
def tiny_scaled(scaled_tiny) -> LoadedModel:
    return scaled_tiny()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=_gen(3))


def _check_invariant(loaded: LoadedModel, ids: torch.Tensor, name: str) -> None:
    model = copy.deepcopy(loaded.model)
    ref = _logits(loaded.model, ids)
    TRANSFORMS[name](model, loaded.arch, _gen(11))
    err = _rel(_logits(model, ids), ref)
    assert err < TOL, f"{name}: relative logit error {err:.3g}"
    assert _max_weight_change(loaded.model, model) > 1e-3, f"{name} changed no weight"


# --- invariance -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_preserves_tiny_logits(tiny_scaled: LoadedModel, ids, name: str) -> None:
    _check_invariant(tiny_scaled, ids, name)


def test_all_transforms_compose(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    g = _gen(5)
    for fn in TRANSFORMS.values():
        fn(model, tiny_scaled.arch, g)
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) < TOL


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_packaged("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_preserves_smollm2_logits(smollm2: LoadedModel, name: str) -> None:
    text = "In the beginning God created the heaven and the earth."
    ids = smollm2.tokenizer(text, return_tensors="pt").input_ids[:, :16]
    _check_invariant(smollm2, ids, name)


# --- near misses break the model --------------------------------------------------------


def test_rotating_without_folding_the_norms_breaks(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    rotate_residual(model, tiny_scaled.arch, random_orthogonal(64, _gen(1)), fold_norms=False)
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) > BROKEN


def test_general_query_key_rotation_breaks_rope(tiny_scaled: LoadedModel, ids) -> None:
    # The random tiny model attends almost uniformly; sharpen its attention (on both sides
    # of the comparison) so that scores, and so RoPE, matter to the logits.
    sharp = copy.deepcopy(tiny_scaled.model)
    for parts in block_parts(sharp, tiny_scaled.arch):
        parts.q.weight.data *= 8.0
    model = copy.deepcopy(sharp)
    shape = attention_shape(model, tiny_scaled.arch)
    general = torch.stack([random_orthogonal(shape.head_dim, _gen(i)) for i in range(2)])
    for parts in block_parts(model, tiny_scaled.arch):
        with pytest.raises(SculptError, match="RoPE"):
            rots.rotate_query_key_heads(parts, shape, general)
        rots.rotate_query_key_heads(parts, shape, general, rotary=False)  # what no-RoPE allows
    assert _rel(_logits(model, ids), _logits(sharp, ids)) > BROKEN
    # ... while the in-plane rotations stay exact on the sharpened model too.
    planes = copy.deepcopy(sharp)
    rotate_queries_keys(planes, tiny_scaled.arch, _gen(0))
    assert _rel(_logits(planes, ids), _logits(sharp, ids)) < TOL


def test_value_rotation_must_be_shared_by_the_gqa_group(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    shape = attention_shape(model, tiny_scaled.arch)
    parts = block_parts(model, tiny_scaled.arch)[0]
    v_rots = torch.stack([random_orthogonal(shape.head_dim, _gen(i)) for i in range(2)])
    o_rots = torch.stack([random_orthogonal(shape.head_dim, _gen(10 + i)) for i in range(4)])
    transform_output(parts.v, block_diag_heads(v_rots.transpose(1, 2)))
    transform_input(parts.o, block_diag_heads(o_rots))  # one per query head: wrong
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) > BROKEN


def test_scaling_the_silu_gate_breaks(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    block = model.get_submodule(tiny_scaled.arch.blocks)[0]
    s = _pos(176, _gen(2)) * 3
    gate, down = block.mlp.gate_proj, block.mlp.down_proj
    with torch.no_grad():
        gate.weight.mul_(s[:, None].float())
        down.weight.div_(s[None, :].float())
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) > BROKEN


def test_mismatched_neuron_permutation_breaks(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    parts = block_parts(model, tiny_scaled.arch)[0]
    perm = torch.randperm(176, generator=_gen(4))
    parts.mlp_in[0].weight.data = parts.mlp_in[0].weight.data[perm]  # gate only
    parts.mlp_out.weight.data = parts.mlp_out.weight.data[:, perm]
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) > BROKEN


def test_head_permutation_must_respect_gqa(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    shape = attention_shape(model, tiny_scaled.arch)
    parts = block_parts(model, tiny_scaled.arch)[0]
    split = torch.tensor([0, 2, 1, 3])  # heads 0 and 1 share kv head 0: moved apart
    with pytest.raises(SculptError, match="GQA"):
        perms.permute_heads(parts, shape, split)
    perms._permute_heads_unchecked(parts, shape, split, torch.tensor([0, 1]))
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) > BROKEN


def test_bad_scales_and_permutations_are_errors(tiny_scaled: LoadedModel) -> None:
    parts = block_parts(copy.deepcopy(tiny_scaled.model), tiny_scaled.arch)[0]
    with pytest.raises(SculptError, match="positive"):
        scales.scale_attention_input(parts, -torch.ones(64))
    with pytest.raises(SculptError, match="not a permutation"):
        perms.permute_mlp_neurons(parts, torch.zeros(176, dtype=torch.long))
    with pytest.raises(SculptError, match="not orthogonal"):
        rotate_residual(copy.deepcopy(tiny_scaled.model), tiny_scaled.arch, 2 * torch.eye(64))


# --- rotations, tying, architectures ----------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 12, 16, 36, 44, 64, 176, 576, 1536])
def test_hadamard_matrices(n: int) -> None:
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_rotation(n, "hadamard", _gen(0))
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [6, 52])
def test_missing_hadamard_order_is_an_error(n: int) -> None:
    with pytest.raises(SculptError, match="orthogonal"):
        hadamard_matrix(n)


def test_rope_plane_rotations_commute() -> None:
    r = rots.rope_plane_rotations(torch.rand(3, 8, generator=_gen(0)))
    assert all(rots.commutes_with_rope(x) for x in r)
    assert not rots.commutes_with_rope(random_orthogonal(16, _gen(0)))
    reflection = torch.eye(16, dtype=torch.float64)
    reflection[0, 0] = -1.0  # keeps the plane but flips orientation: RoPE's angle flips too
    assert not rots.commutes_with_rope(reflection)


def test_tied_head_is_untied_and_reloads(tiny_scaled: LoadedModel, ids, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(tiny_scaled.model)
    assert is_tied(model, tiny_scaled.arch)
    _residual("hadamard")(model, tiny_scaled.arch, _gen(0))
    assert not is_tied(model, tiny_scaled.arch) and not model.config.tie_word_embeddings
    model.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not is_tied(again, tiny_scaled.arch)
    assert _rel(_logits(again, ids), _logits(tiny_scaled.model, ids)) < TOL


def test_unit_final_norm_keeps_the_tie(ids) -> None:
    loaded = build_tiny_llama()  # norms are 1: nothing to fold, the head stays tied
    model = copy.deepcopy(loaded.model)
    rotate_residual(model, loaded.arch, random_rotation(64, "hadamard", _gen(0)))
    assert is_tied(model, loaded.arch)
    assert _rel(_logits(model, ids), _logits(loaded.model, ids)) < TOL


def test_unsupported_architectures_name_what_is_missing() -> None:
    from transformers import BertConfig, BertModel, OPTConfig, OPTForCausalLM

    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=32,
        )
    )
    with pytest.raises(SculptError, match="LayerNorm"):
        fold_norm_scales(opt, arch_for(opt))
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(SculptError, match="attn_norm"):
        fold_norm_scales(bert, arch_for(bert))
    with pytest.raises(SculptError, match="mlp_up"):
        scales.scale_mlp_neurons(bert.encoder.layer[0], arch_for(bert), torch.ones(32))


# --- slicing ----------------------------------------------------------------------------


def test_slicing_nothing_is_exact(tiny_scaled: LoadedModel, ids) -> None:
    model = copy.deepcopy(tiny_scaled.model)
    slice_residual(model, tiny_scaled.arch, random_orthogonal(64, _gen(0)), keep=64)
    assert _rel(_logits(model, ids), _logits(tiny_scaled.model, ids)) < TOL


def test_slice_plugin_shrinks_and_reloads(
    tiny_scaled: LoadedModel, ids, make_ctx, tmp_path, scaled_tiny
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = scaled_tiny()
    ctx: Context = make_ctx(loaded, tmp_path, stage_name="slice")
    result = Slice(sparsity=0.25).compress(loaded.model, ctx)
    model = result.model
    assert model is not None and model.config.hidden_size == 48
    assert result.metrics["params_after"] < result.metrics["params_before"]
    assert result.metrics["block_weights_kept"] == pytest.approx(0.75)
    out = _logits(model, ids)
    assert 0 < _rel(out, _logits(tiny_scaled.model, ids)) < 1.0  # lossy, not destroyed
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert again.config.hidden_size == 48 and again.config.head_dim == 16
    assert torch.equal(_logits(again, ids), out)
    size = container_size(result.artifacts["compressed"])
    assert size["bits_per_weight"] == 32.0
    assert size["coded_weights"] == sum(
        p.numel() for n, p in model.named_parameters() if "layers" in n and "norm" not in n
    )


def test_slice_config_errors() -> None:
    with pytest.raises(ConfigError, match="sparsity"):
        Slice(sparsity=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        Slice(round_to=0)
    with pytest.raises(ConfigError, match="weighting"):
        Slice(weighting="channel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="basis"):
        Slice(basis="per_block")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="global_mix"):
        Slice(basis="per_layer", global_mix=1.5)
    with pytest.raises(ConfigError, match="global_mix"):
        Slice(global_mix=0.5)  # basis=global has nothing to mix
    assert Slice(sparsity=0.25).kept_width(576) == 432


def _shortcuts(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().double() for n, m in model.named_modules() if n.endswith("_shortcut")]


def test_per_layer_slicing_nothing_is_exact(tiny_scaled: LoadedModel, ids, tiny_windows) -> None:
    """keep = d: every basis is a full rotation, each shortcut the orthogonal change of
    basis between two of them; the logits must not move (1e-4), though nothing is the same."""
    model = copy.deepcopy(tiny_scaled.model)
    sliced, fractions = slice_per_layer(
        model, tiny_scaled.arch, tiny_windows["calibration"], keep=64, batch_size=2
    )
    assert type(sliced).__name__ == "SlicedLlamaForCausalLM"
    assert _rel(_logits(sliced, ids), _logits(tiny_scaled.model, ids)) < TOL
    assert len(fractions) == 5 and all(f == pytest.approx(1.0) for f in fractions.values())
    eye = torch.eye(64, dtype=torch.float64)
    for s in _shortcuts(sliced):
        assert torch.allclose(s @ s.T, eye, atol=1e-5)  # orthogonal ...
        assert float((s - eye).abs().max()) > 0.1  # ... and not the identity: bases differ


def _tiny_param_count(k: int, shortcuts: bool) -> int:
    """SlicedLlama / Llama parameters of the tiny model (vocab 384, 2 layers, 4 heads of 16,
    2 kv heads, MLP 176) at residual width k, head untied."""
    attn = k * 64 + 2 * k * 32 + 64 * k
    block = attn + 3 * k * 176 + 2 * k + (2 * k * k if shortcuts else 0)
    return 2 * 384 * k + 2 * block + k


def test_per_layer_plugin_counts_shortcuts_and_reloads(
    tiny_scaled: LoadedModel, ids, make_ctx, tmp_path, scaled_tiny
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = scaled_tiny()
    block_before = sum(p.numel() for n, p in loaded.model.named_parameters() if "proj" in n)
    ctx: Context = make_ctx(loaded, tmp_path, stage_name="slice")
    result = Slice(sparsity=0.25, basis="per_layer").compress(loaded.model, ctx)
    model = result.model
    assert model is not None and model.config.model_type == "sculpt_sliced_llama"
    assert model.config.hidden_size == 48 and not model.config.tie_word_embeddings
    m = result.metrics
    assert m["params_after"] == sum(p.numel() for p in model.parameters())
    assert m["params_after"] == _tiny_param_count(48, shortcuts=True)
    assert m["params_before"] == _tiny_param_count(64, shortcuts=False) - 384 * 64  # tied
    assert m["shortcut_weights"] == 2 * 2 * 48 * 48
    assert m["block_weights_kept"] == pytest.approx(0.75 + 2 * 2 * 48 * 48 / block_before)
    out = _logits(model, ids)
    assert 0 < _rel(out, _logits(tiny_scaled.model, ids)) < 1.0  # lossy, not destroyed
    model.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    assert type(again) is type(model) and again.config.head_dim == 16
    assert torch.equal(_logits(again, ids), out)
    size = container_size(result.artifacts["compressed"])
    assert size["coded_weights"] == sum(
        p.numel() for n, p in model.named_parameters() if "layers" in n and "norm" not in n
    )


def test_global_mix_one_is_one_basis(make_ctx, tmp_path, scaled_tiny) -> None:
    """global_mix=1: every point's PCA is the global moment's, so every shortcut is the
    identity and the weights are the global basis's (only the norm gains, calibrated on
    the sliced stream, differ); 0.5 lies between: shortcuts neither identity nor free."""
    weights, gaps = {}, {}
    for mix in (1.0, 0.5):
        loaded = scaled_tiny()
        ctx: Context = make_ctx(loaded, tmp_path / str(mix), stage_name="slice")
        result = Slice(sparsity=0.25, basis="per_layer", global_mix=mix).compress(loaded.model, ctx)
        assert result.model is not None
        gaps[mix] = max(float((s - torch.eye(48)).abs().max()) for s in _shortcuts(result.model))
        weights[mix] = result.model.state_dict()
    loaded = scaled_tiny()
    one = Slice(sparsity=0.25).compress(loaded.model, make_ctx(loaded, tmp_path / "g")).model
    assert one is not None
    assert gaps[1.0] < 1e-5 < 0.1 < gaps[0.5]
    for name, w in one.state_dict().items():
        if "proj" in name:
            # up to each basis vector's sign, which eigh may choose either way
            assert torch.allclose(weights[1.0][name].abs(), w.abs(), atol=1e-5), name


def test_per_layer_bases_keep_more_energy_than_one_basis(make_ctx, tmp_path, scaled_tiny) -> None:
    """Each per-layer basis is the PCA of its own point: at every norm it keeps more of the
    (already sliced) stream's energy than the global basis keeps on average. On the random
    tiny model the logits' KL is about the same either way (its residual stream is nearly
    isotropic, there is little to choose), so this is the check that the per-layer bases
    exist and are fitted where they are used; the shortcuts only contract (singular
    values <= 1: a product of two orthonormal k-frames)."""
    energy, kl = {}, {}
    for basis in ("global", "per_layer"):
        loaded = scaled_tiny()
        ctx: Context = make_ctx(loaded, tmp_path / basis, stage_name=basis)
        ref = _logits(copy.deepcopy(loaded.model), ctx.evaluation_windows)
        result = Slice(sparsity=0.5, basis=basis).compress(loaded.model, ctx)  # type: ignore[arg-type]
        assert result.model is not None
        out = _logits(result.model, ctx.evaluation_windows)
        kl[basis] = float(
            (ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean()
        )
        energy[basis] = (result.metrics["energy_kept_min"], result.metrics["energy_kept_mean"])
        for s in _shortcuts(result.model):
            assert float(torch.linalg.svdvals(s).max()) <= 1 + 1e-5
    assert energy["per_layer"][0] > energy["global"][1] + 0.01
    assert 0 < kl["per_layer"] < 2 * kl["global"]


# --- rotate_quant and the raw codec -----------------------------------------------------


def test_rotate_quant_rate_matches_rtn(make_ctx, tmp_path, scaled_tiny) -> None:
    rates = {}
    for name, plugin in {
        "rtn": RTN(bits=3, group_size=32),
        "rot": RotateQuant(group_size=32),
    }.items():
        loaded = scaled_tiny()
        ctx = make_ctx(loaded, tmp_path / name, stage_name=name)
        result = plugin.compress(loaded.model, ctx)
        rates[name] = container_size(result.artifacts["compressed"])
        decoded = read_container(result.artifacts["compressed"])
        for key, value in loaded.model.state_dict().items():
            if key in decoded:
                assert torch.equal(decoded[key], value), key
    assert rates["rot"]["bits_per_weight"] == rates["rtn"]["bits_per_weight"]
    assert rates["rot"]["coded_weights"] == rates["rtn"]["coded_weights"]
    assert rates["rot"]["outside_rate_weights"] > 0  # rotated embedding, head, norms
    assert "outside_rate_weights" not in rates["rtn"]


def test_rotate_quant_config_errors() -> None:
    with pytest.raises(ConfigError, match="gptq"):
        RotateQuant(gptq={"damp": 0.1})  # quantizer is rtn
    with pytest.raises(ConfigError, match="gptq"):
        RotateQuant(quantizer="gptq", gptq={"dampening": 0.1})
    with pytest.raises(ConfigError, match=r"gptq\.damp"):
        RotateQuant(quantizer="gptq", gptq={"damp": 2.0})
    with pytest.raises(ConfigError, match="bits"):
        RotateQuant(bits=9)
    assert RotateQuant(quantizer="gptq").needs_calibration
    assert not RotateQuant().needs_calibration


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_codec_round_trip(dtype: torch.dtype, tmp_path) -> None:
    t = torch.randn(5, 7, generator=_gen(0)).to(dtype)
    assert torch.equal(decode_raw(encode_raw(t)), t)
    path = write_container(tmp_path / "c", {"a": encode_raw(t), "b": encode_raw(t, in_rate=False)})
    assert torch.equal(read_container(path)["b"], t)
    size = container_size(path)
    assert size["coded_weights"] == 35 and size["outside_rate_weights"] == 35
    assert size["bits_per_weight"] == torch.finfo(dtype).bits


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((ref.softmax(-1) * (ref.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean())


def _refit_sliced(
    loaded: LoadedModel,
    windows: torch.Tensor,
    keep: int,
    damp: float | None,
    target: str,
    errors: dict[str, tuple[float, float]],
) -> nn.Module:
    """Per-layer slicing of a copy of `loaded` to `keep`, refitted with ridge `damp`
    (None: no refit); each layer's errors land in `errors`."""
    sliced, _ = slice_per_layer(
        copy.deepcopy(loaded.model),
        loaded.arch,
        windows,
        keep=keep,
        batch_size=8,
        refit_damp=damp,
        refit_errors=errors,
        refit_target=target,
    )
    return sliced


@pytest.mark.parametrize("target", ["layer", "stream"])
def test_refit_of_nothing_sliced_keeps_the_function(
    target: str, tiny_scaled: LoadedModel, ids, tiny_windows
) -> None:
    """keep = d: every sliced linear already reproduces the original outputs exactly, so the
    least-squares refit (the default ridge, which pulls towards the sliced weight) must
    leave the logits where they were."""
    errors: dict[str, tuple[float, float]] = {}
    sliced = _refit_sliced(tiny_scaled, tiny_windows["calibration"], 64, 0.01, target, errors)
    assert len(errors) == 2 * 7  # q, k, v, o, gate, up, down per block
    # float32 products: the relative error reads as zero to about 1e-6
    assert all(before < 1e-5 and after < 1e-5 for before, after in errors.values())
    assert _rel(_logits(sliced, ids), _logits(tiny_scaled.model, ids)) < TOL


@pytest.mark.parametrize("target", ["layer", "stream"])
def test_refit_lowers_every_layer_error_and_the_kl(target: str, scaled_tiny) -> None:
    """At 50% the sliced linears miss the original outputs; the refit must lower each one's
    calibration error and bring the logits closer to the original's, on the calibration
    windows where it was fitted and on held-out windows of the same distribution (2,048
    calibration tokens: enough for the widest input, the MLP's 176)."""
    loaded = scaled_tiny()
    tokens = torch.randint(0, 384, (40, 64), generator=_gen(3))
    sets = {"calibration": tokens[:32], "held_out": tokens[32:]}
    refs = {k: _logits(loaded.model, w) for k, w in sets.items()}
    kl: dict[bool, dict[str, float]] = {}
    errors: dict[str, tuple[float, float]] = {}
    for refit in (False, True):
        damp = 0.01 if refit else None
        sliced = _refit_sliced(loaded, sets["calibration"], 32, damp, target, errors)
        kl[refit] = {k: _kl(refs[k], _logits(sliced, w)) for k, w in sets.items()}
    assert len(errors) == 14
    assert all(after <= before + 1e-9 for before, after in errors.values())
    assert sum(a for _, a in errors.values()) < 0.9 * sum(b for b, _ in errors.values())
    assert kl[True]["calibration"] < 0.9 * kl[False]["calibration"]
    assert kl[True]["held_out"] < kl[False]["held_out"]


def test_refit_config_errors() -> None:
    with pytest.raises(ConfigError, match="refit"):
        Slice(refit=True)  # basis=global
    with pytest.raises(ConfigError, match="refit"):
        Slice(basis="per_layer", refit="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="refit_damp"):
        Slice(basis="per_layer", refit=True, refit_damp=0)
    with pytest.raises(ConfigError, match="refit_target"):
        Slice(basis="per_layer", refit=True, refit_target="block")  # type: ignore[arg-type]
