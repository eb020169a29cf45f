from framework.models import sliced_llama  # noqa: F401  (registers its Auto classes)
from framework.models.arch import ARCH_MAPS, ArchMap, arch_for, block_linears, blocks
from framework.models.loading import (
    LoadedModel,
    build_tiny_llama,
    load_gguf,
    load_hf,
    load_packaged,
)

__all__ = [
    "ARCH_MAPS",
    "ArchMap",
    "LoadedModel",
    "arch_for",
    "block_linears",
    "blocks",
    "build_tiny_llama",
    "load_gguf",
    "load_hf",
    "load_packaged",
]
