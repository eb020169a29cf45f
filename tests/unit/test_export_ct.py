"""compressed-tensors export: the folder a run writes loads back (transformers, the
library's own decompressor) to the run's model exactly, its packed tensors are the ones
compressed-tensors' own compressor writes, and a scheme with no exact form is a one-line
error naming the config key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.codecs import write_container
from framework.codecs.entropy import ECSQ, encode_ecsq
from framework.errors import SculptError
from framework.export import coded_linears, export_compressed_tensors
from framework.models import LoadedModel, build_tiny_llama
from framework.plugins import Context
from framework.run import run, validate
from plugins.compressors.rtn import RTN

pytest.importorskip("compressed_tensors")

ATOL = 1e-5  # max |logit difference| allowed after reload; measured: 0.0 (bit-exact)


def _quantized(tmp_path: Path, **rtn: object) -> tuple[LoadedModel, Path]:
    """A tiny Llama (widths 64 and 128: group 32 divides both) quantized by RTN."""
    loaded = build_tiny_llama(intermediate=128)
    loaded.model.eval()
    ctx = Context(tokenizer=loaded.tokenizer, arch=loaded.arch, output_dir=tmp_path, seed=0)
    result = RTN(**rtn).compress(loaded.model, ctx)  # type: ignore[arg-type]
    return loaded, Path(result.artifacts["compressed"])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"),
    [(4, 32, False), (4, 32, True), (8, None, False)],
    ids=["int4-g32-asym", "int4-g32-sym", "int8-channel-asym"],
)
def test_export_reloads_in_transformers_to_the_same_logits(
    tmp_path: Path, bits: int, group_size: int | None, symmetric: bool
) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    loaded, container = _quantized(tmp_path, bits=bits, group_size=group_size, symmetric=symmetric)
    folder = tmp_path / "export" / "compressed_tensors"
    metrics = export_compressed_tensors(
        loaded.model, loaded.tokenizer, [("compressor", container)], folder
    )
    assert metrics["export_ct_layers"] == 14 and metrics["export_ct_max_abs_weight_diff"] == 0.0

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {
        **group["weights"],
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
    }

    reference = _logits(loaded.model)
    # dequantize=True: transformers decompresses at load (the CPU route for every scheme).
    dense = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert not any(n.endswith("weight_packed") for n, _ in dense.named_parameters())
    torch.testing.assert_close(_logits(dense), reference, atol=ATOL, rtol=0)
    if symmetric:
        # The default route (compressed modules, decompressed on the first forward).
        # Asymmetric folders fail it in transformers 5.24 + compressed-tensors 0.20.1: the
        # library sizes the module's zero point unpacked (docs/export.md).
        compressed = AutoModelForCausalLM.from_pretrained(folder)
        torch.testing.assert_close(_logits(compressed), reference, atol=ATOL, rtol=0)


def test_gptq_act_order_exports_without_g_idx(tmp_path: Path, make_ctx) -> None:
    """sculpt's act_order keeps groups contiguous in the original column order (static
    groups), so the export needs no g_idx and reloads exactly."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from plugins.compressors.gptq import GPTQ

    loaded = build_tiny_llama(intermediate=128)
    loaded.model.eval()
    ctx = make_ctx(loaded, tmp_path)
    gptq = GPTQ(bits=4, group_size=32, symmetric=True, act_order=True, batch_size=4)
    container = Path(gptq.compress(loaded.model, ctx).artifacts["compressed"])
    folder = tmp_path / "ct"
    export_compressed_tensors(loaded.model, loaded.tokenizer, [("compressor", container)], folder)
    weights = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert weights["config_groups"]["group_0"]["weights"].get("actorder") is None
    back = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    torch.testing.assert_close(_logits(back), _logits(loaded.model), atol=ATOL, rtol=0)


def test_rotate_quant_exports_its_raw_tensors_dense(tmp_path: Path) -> None:
    """rotate_quant's container also holds raw tensors (rotated embedding, untied head,
    folded norms): they go to the folder dense, from the model."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from plugins.compressors.rotate_quant import RotateQuant

    loaded = build_tiny_llama(intermediate=128)
    loaded.model.eval()
    ctx = Context(tokenizer=loaded.tokenizer, arch=loaded.arch, output_dir=tmp_path, seed=0)
    result = RotateQuant(bits=4, group_size=32).compress(loaded.model, ctx)
    folder = tmp_path / "ct"
    export_compressed_tensors(
        loaded.model, loaded.tokenizer, [("compressor", result.artifacts["compressed"])], folder
    )
    back = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    torch.testing.assert_close(_logits(back), _logits(loaded.model), atol=ATOL, rtol=0)


def test_packed_tensors_match_compressed_tensors_own_compressor(tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    loaded, container = _quantized(tmp_path, bits=4, group_size=32, symmetric=False)
    folder = tmp_path / "ct"
    export_compressed_tensors(loaded.model, loaded.tokenizer, [("compressor", container)], folder)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    coded = coded_linears([("compressor", container)])[name]
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
    )
    # The library quantizes the run's (dense) weight with the same scales and zero points
    # (its signed convention: zero - 8) and packs it itself.
    theirs = PackedQuantizationCompressor.compress(
        {
            "weight": loaded.model.get_submodule(name).weight.detach(),
            "weight_scale": coded.scale,
            "weight_zero_point": (coded.zero - 8).to(torch.int8),
        },
        scheme,
    )
    for key in ("weight_packed", "weight_zero_point", "weight_shape"):
        assert torch.equal(state[f"{name}.{key}"], theirs[key]), key
    assert torch.equal(state[f"{name}.weight_scale"], coded.scale)
    assert f"{name}.weight" not in state and "model.embed_tokens.weight" in state


@pytest.mark.parametrize(
    ("rtn", "message"),
    [
        ({"bits": 3, "group_size": 32}, r"^compressor\.bits: 3-bit codes do not export"),
        ({"bits": 4, "group_size": 48}, r"^compressor\.group_size: 48 does not divide"),
    ],
)
def test_a_scheme_with_no_exact_form_names_the_key(
    tmp_path: Path, rtn: dict[str, int], message: str
) -> None:
    loaded, container = _quantized(tmp_path, **rtn)
    folder = tmp_path / "ct"
    with pytest.raises(SculptError, match=message):
        export_compressed_tensors(
            loaded.model, loaded.tokenizer, [("compressor", container)], folder
        )
    assert not folder.exists()  # atomic: nothing half-written


def test_entropy_coded_codes_export_ecsq_does_not(tmp_path: Path) -> None:
    loaded, container = _quantized(tmp_path, bits=4, group_size=32, entropy_code=True)
    metrics = export_compressed_tensors(
        loaded.model, loaded.tokenizer, [("compressor", container)], tmp_path / "ct"
    )
    assert metrics["export_ct_max_abs_weight_diff"] == 0.0  # ANS decodes to the same codes
    w = loaded.model.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    enc, _ = encode_ecsq(w, ECSQ(step=0.01))
    ecsq = write_container(tmp_path / "ecsq", {"model.layers.0.mlp.up_proj.weight": enc})
    with pytest.raises(SculptError, match=r"^compressor2: .* codec 'ecsq'"):
        export_compressed_tensors(
            loaded.model, loaded.tokenizer, [("compressor2", ecsq)], tmp_path / "ct2"
        )


def test_weights_changed_after_the_compressor_refuse_to_export(tmp_path: Path) -> None:
    loaded, container = _quantized(tmp_path, bits=4, group_size=32)
    with torch.no_grad():
        loaded.model.get_submodule("model.layers.0.self_attn.o_proj").weight.mul_(1.01)
    with pytest.raises(SculptError, match=r"^export\.compressed_tensors: .*o_proj .*later stage"):
        export_compressed_tensors(
            loaded.model, loaded.tokenizer, [("compressor", container)], tmp_path / "ct"
        )


def test_a_run_writes_the_export_folder(compose_cfg) -> None:
    # The standard tiny Llama: widths 64 and 176, so group 16 (divides both).
    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=default",
            "stages=[compressor]",
            "compressor.bits=4",
            "compressor.group_size=16",
            "save_model=false",
            "export.compressed_tensors=true",
        ]
    )
    result = run(cfg)
    folder = result.output_dir / "export" / "compressed_tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    metrics = json.loads((result.output_dir / "metrics.json").read_text())["flat"]
    assert metrics["compressor/export_ct_bytes"] > 0
    assert metrics["compressor/export_ct_max_abs_weight_diff"] == 0.0


def test_a_run_with_a_scheme_that_does_not_fit_fails_naming_the_key(compose_cfg) -> None:
    cfg = compose_cfg(
        [
            "model=tiny_llama",
            "debug=default",
            "stages=[compressor]",
            "compressor.bits=3",
            "save_model=false",
            "export.compressed_tensors=true",
        ]
    )
    with pytest.raises(SculptError, match=r"^compressor\.bits: 3-bit codes do not export"):
        run(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+export.compressed_tensor=true", r"^export\.compressed_tensor: unknown export"),
        ("export.compressed_tensors=yes", r"^export\.compressed_tensors: expected true or false"),
    ],
)
def test_the_export_switch_is_checked_before_the_run(
    compose_cfg, override: str, message: str
) -> None:
    cfg = compose_cfg(["model=tiny_llama", "debug=default", override])
    with pytest.raises(SculptError, match=message):
        validate(cfg)
