"""Export a uniform-grid quantized model (RTN / GPTQ codes) as a compressed-tensors
checkpoint: the Hugging Face folder format vLLM serves and transformers loads
(`quant_method: compressed-tensors`, format `pack-quantized`).

What fits, exactly (anything else is a SculptError naming the config key to change):

* codec `uniform` or `uniform_ans` (the ANS stream is decoded back to the same integer
  codes: the exported model is the same model, only stored at b bits per code again);
  `ecsq` (a per-tensor step with reconstruction levels) has no compressed-tensors form;
* bits 4 or 8: the widths vLLM's weight-only int kernels (WNA16) serve; the format itself
  packs 1-8 bits, but a 2- or 3-bit folder would load in transformers only;
* group_size dividing every quantized layer's input width (`strategy: group`), or null
  (per-channel, `strategy: channel`); sculpt's shorter last group has no counterpart;
* symmetric or asymmetric (asymmetric stores `weight_zero_point`).

The mapping is exact, not a re-quantization. sculpt stores unsigned codes q in [0, 2^b)
and zero points z with w_hat = (q - z) * s; compressed-tensors stores signed codes
q - 2^(b-1) and zero points z - 2^(b-1), with w_hat = (q' - z') * s, the same numbers.
Scales are sculpt's fp16 values, written as float32 for a float32 model (so decompressing
reproduces the run's weights bit for bit) and as float16 otherwise.

The packing and the config come from compressed-tensors itself (`pack_to_int32`,
`QuantizationConfig`, `ModelCompressor.update_config`), and the written folder is read
back and decompressed with the library's `PackedQuantizationCompressor` before it is
published: a layer that does not decompress to the run's weight fails the export.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from framework.codecs.container import PAYLOAD, _entry_to_encoded, read_container, read_manifest
from framework.codecs.entropy import UNIFORM_ANS_CODEC, ans_decode
from framework.codecs.packing import unpack_bits
from framework.codecs.uniform import CODEC as UNIFORM_CODEC
from framework.codecs.uniform import UniformGrid, dequantize, grid_of, group_params
from framework.errors import SculptError
from framework.eval.metrics import logits_kl
from framework.io import atomic_dir, folder_bytes

CT_BITS = (4, 8)  # what vLLM's compressed-tensors WNA16 kernels serve
FORMAT = "pack-quantized"
SWITCH = "export.compressed_tensors"


@dataclass
class CodedLinear:
    """One linear's integer codes as a quantizer chose them, and the key that chose them."""

    key: str  # config key of the stage whose container holds it (e.g. "compressor")
    grid: UniformGrid
    codes: torch.Tensor  # [rows, cols] int64, in [0, 2^bits)
    scale: torch.Tensor  # [rows, groups] float32 (fp16 values)
    zero: torch.Tensor  # [rows, groups] float32 integers in [0, 2^bits)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.grid)


def check_export_config(node: Any) -> bool:
    """The run's `export` node, checked before anything loads: known keys only (a typo must
    not silently skip the export), booleans, and the library installed when asked for.
    -> whether the compressed-tensors export is on."""
    if node is None:
        return False
    if not hasattr(node, "items"):
        raise SculptError(
            f"export: expected a mapping like {{compressed_tensors: true}}, got {node!r}"
        )
    for key, value in node.items():
        if key != "compressed_tensors":
            raise SculptError(f"export.{key}: unknown export (known: compressed_tensors)")
        if not isinstance(value, bool):
            raise SculptError(f"{SWITCH}: expected true or false, got {value!r}")
    on = bool(node.get("compressed_tensors", False))
    if on and importlib.util.find_spec("compressed_tensors") is None:
        raise SculptError(
            f"{SWITCH}: needs the compressed-tensors package (pip install -e '.[export]')"
        )
    return on


def coded_linears(containers: Iterable[tuple[str, Path]]) -> dict[str, CodedLinear]:
    """Module name -> codes, over the containers in stage order (a later stage's entry
    for the same weight replaces an earlier one). Every container is checksum-verified by
    decoding it first; raw entries (full-precision tensors outside the coded set) are left
    to the dense part of the export. A codec with no compressed-tensors form is an error."""
    out: dict[str, CodedLinear] = {}
    for key, path in containers:
        path = Path(path)
        read_container(path)  # verifies sizes and every sha256 before we trust a byte
        manifest = read_manifest(path)
        payload = (path / PAYLOAD).read_bytes()
        for name, entry in manifest["tensors"].items():
            codec = entry.get("codec")
            if codec == "raw":
                continue
            if codec not in (UNIFORM_CODEC, UNIFORM_ANS_CODEC):
                raise SculptError(
                    f"{key}: {name} is stored with codec '{codec}', which has no compressed-tensors form (only uniform-grid codes export); set {SWITCH}=false"
                )
            if not name.endswith(".weight") or len(entry["shape"]) != 2:
                raise SculptError(f"{key}: {name} is not a 2-D linear weight; cannot export it")
            out[name.removesuffix(".weight")] = _coded(key, _entry_to_encoded(entry, payload))
    return out


def _coded(key: str, enc: Any) -> CodedLinear:
    rows, cols = enc.shape
    grid = grid_of(enc)
    if enc.codec == UNIFORM_ANS_CODEC:
        raw = ans_decode(
            int(enc.params["symbol_offset"]),
            enc.sections["codes_model"],
            enc.sections["codes_stream"],
            rows * cols,
        )
    else:
        raw = unpack_bits(enc.sections["codes"], grid.bits, rows * cols)
    codes = torch.from_numpy(raw.astype(np.int64)).view(rows, cols)
    scale, zero = group_params(enc, grid)
    return CodedLinear(key=key, grid=grid, codes=codes, scale=scale, zero=zero)


def check_fits(name: str, coded: CodedLinear) -> None:
    """One-line SculptError naming the config key when the scheme has no exact
    compressed-tensors pack-quantized form (module docstring: what fits)."""
    grid, key = coded.grid, coded.key
    cols = coded.codes.shape[1]
    if grid.float_zero:
        raise SculptError(
            f"{key}.float_zero: an fp16 group minimum has no compressed-tensors form (its zero points are integers); set it false or set {SWITCH}=false"
        )
    if grid.bits not in CT_BITS:
        raise SculptError(
            f"{key}.bits: {grid.bits}-bit codes do not export to compressed-tensors (pack-quantized int weights served by vLLM: {' or '.join(map(str, CT_BITS))} bits); change it or set {SWITCH}=false"
        )
    if grid.group_size is not None and cols % grid.group_size:
        raise SculptError(
            f"{key}.group_size: {grid.group_size} does not divide {name}'s {cols} input columns (compressed-tensors groups are whole); use a divisor, null (per-channel), or set {SWITCH}=false"
        )


def _scheme_args(grid: UniformGrid) -> dict[str, Any]:
    return {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "strategy": "channel" if grid.group_size is None else "group",
        "group_size": grid.group_size,
        "dynamic": False,
    }


def quantization_config(model: nn.Module, coded: dict[str, CodedLinear]) -> Any:
    """compressed-tensors' QuantizationConfig: one config group per distinct grid (targets
    "Linear" when there is one, the module names otherwise), every other Linear ignored."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    by_grid: dict[UniformGrid, list[str]] = {}
    for name, c in coded.items():
        by_grid.setdefault(c.grid, []).append(name)
    groups = {}
    for i, (grid, names) in enumerate(by_grid.items()):
        targets = ["Linear"] if len(by_grid) == 1 else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=QuantizationArgs(**_scheme_args(grid))
        )
    ignore = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in coded
    )
    return QuantizationConfig(
        config_groups=groups,
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )


def _scale_dtype(model: nn.Module) -> torch.dtype:
    # fp16 scale values are exact in float32 and float16, not in bfloat16.
    dtype = next(model.parameters()).dtype
    return torch.float32 if dtype == torch.float32 else torch.float16


def compressed_state(
    model: nn.Module, coded: dict[str, CodedLinear], scale_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The model's state dict with each coded linear's weight replaced by compressed-tensors'
    weight_packed / weight_scale / weight_zero_point (asymmetric) / weight_shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, c in coded.items():
        del state[f"{name}.weight"]
        offset = 1 << (c.grid.bits - 1)  # unsigned sculpt codes -> signed int8 codes
        signed = (c.codes - offset).to(torch.int8)
        state[f"{name}.weight_packed"] = pack_to_int32(signed, c.grid.bits)
        state[f"{name}.weight_scale"] = c.scale.to(scale_dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor(tuple(c.codes.shape))
        if not c.grid.symmetric:
            zp = (c.zero.round().to(torch.int64) - offset).to(torch.int8)
            state[f"{name}.weight_zero_point"] = pack_to_int32(zp, c.grid.bits, packed_dim=0)
    return state


def decompressed_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read an exported folder back and decompress every packed linear with
    compressed-tensors' own PackedQuantizationCompressor: module name -> dense weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    out = {}
    for key in state:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        scheme = _scheme_for(qc, name)
        local = {
            k.removeprefix(f"{name}."): v
            for k, v in state.items()
            if k.startswith(f"{name}.weight_")
        }
        got = PackedQuantizationCompressor.decompress(local, QuantizationScheme(**scheme))
        out[name] = got["weight"]
    return out


def _scheme_for(qc: Any, name: str) -> dict[str, Any]:
    for group in qc.config_groups.values():
        if "Linear" in group.targets or name in group.targets:
            return {"targets": group.targets, "weights": group.weights}
    raise SculptError(f"{name}: no compressed-tensors config group targets it")


def export_compressed_tensors(
    model: nn.Module,
    tokenizer: Any,
    containers: Iterable[tuple[str, Path]],
    path: str | Path,
) -> dict[str, float]:
    """Write `path` (atomically) as a compressed-tensors HF folder from the run's containers
    [(config key, container folder)] and its final model; -> metrics for the run record.

    The final model's weight for every coded linear must equal the container's decode
    (a stage after the compressor that changed it would make the export a different
    model), and the written folder must decompress back to it exactly."""
    from compressed_tensors.compressors import ModelCompressor

    path = Path(path)
    containers = list(containers)
    if not containers:
        raise SculptError(
            f"{SWITCH}: no stage of this run wrote a compressed container (nothing quantized to export)"
        )
    coded = coded_linears(containers)
    if not coded:
        raise SculptError(f"{SWITCH}: the run's containers hold no uniform-grid quantized linear")
    modules = dict(model.named_modules())
    for name, c in coded.items():
        check_fits(name, c)
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise SculptError(f"{c.key}: {name} names no nn.Linear of the model")
        w = layer.weight.detach().cpu()
        w_hat = c.dequantized().to(w.dtype)
        if w.shape != w_hat.shape or not torch.equal(w, w_hat):
            raise SculptError(
                f"{SWITCH}: {name} in the final model is not the decode of {c.key}'s codes (a later stage changed it); the export would be a different model"
            )
    qc = quantization_config(model, coded)
    scale_dtype = _scale_dtype(model)
    with atomic_dir(path) as staging:
        state = compressed_state(model, coded, scale_dtype)
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        ModelCompressor(quantization_config=qc).update_config(str(staging))
        max_diff = 0.0
        back = decompressed_weights(staging)
        if set(back) != set(coded):
            raise SculptError(
                f"{SWITCH}: the written folder holds {len(back)} packed linears, expected {len(coded)}"
            )
        for name, w in back.items():
            ref = modules[name].weight.detach().cpu()
            max_diff = max(max_diff, float((w.to(ref.dtype) - ref).abs().max()))
        if scale_dtype == torch.float32 and max_diff != 0.0:
            raise SculptError(
                f"{SWITCH}: the written folder decompresses to weights {max_diff:.3g} away from the run's (expected exact)"
            )
    n_weights = sum(math.prod(c.codes.shape) for c in coded.values())
    return {
        "export_ct_bytes": float(folder_bytes(path)),
        "export_ct_layers": float(len(coded)),
        "export_ct_coded_weights": float(n_weights),
        "export_ct_max_abs_weight_diff": max_diff,
    }


def compare_load_back(
    run_dir: str | Path, windows: int = 4, seq_len: int = 512, dequantize: bool = True
) -> dict[str, float]:
    """Load `<run>/model` (the run's dequantized model) and `<run>/export/compressed_tensors`
    with transformers and compare their logits on KJV windows: max |difference|, KL, top-1.

    dequantize=True decompresses at load (loads every scheme on CPU); False takes
    transformers' default route (compressed modules, decompressed on the first forward),
    which fails for asymmetric folders with compressed-tensors 0.20.1 (docs/export.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

    from framework.data import WindowSpec, make_windows, tokenize
    from framework.data.sources import kjv

    run_dir = Path(run_dir)
    folder = run_dir / "export" / "compressed_tensors"
    ours = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    ct = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = make_windows(
        tokenize(tokenizer, kjv()[: 40 * windows * seq_len]),
        WindowSpec(source="", windows=windows, seq_len=seq_len, sampling="sequential"),
        "data.evaluation",
    )
    max_diff, kl, agree = 0.0, 0.0, 0.0
    with torch.no_grad():
        for row in tokens:
            a = ours(row[None]).logits.float()
            b = ct(row[None]).logits.float()
            max_diff = max(max_diff, float((a - b).abs().max()))
            kl += float(logits_kl(a, b)) / len(tokens)
            agree += float((a.argmax(-1) == b.argmax(-1)).float().mean()) / len(tokens)
    return {
        "max_abs_logit_diff": max_diff,
        "kl": kl,
        "top1_agreement": agree,
        "export_bytes": float(folder_bytes(folder)),
        "model_bytes": float(folder_bytes(run_dir / "model")),
    }


if __name__ == "__main__":  # python -m framework.export.compressed_tensors RUN_DIR [--compressed]
    import sys

    route = "--compressed" not in sys.argv[2:]
    print(json.dumps(compare_load_back(sys.argv[1], dequantize=route), indent=1))
