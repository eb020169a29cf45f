"""Exports of a run's quantized model to formats other tools serve (no plugin imports)."""

from framework.export.compressed_tensors import (
    CT_BITS,
    CodedLinear,
    check_export_config,
    coded_linears,
    export_compressed_tensors,
)

__all__ = [
    "CT_BITS",
    "CodedLinear",
    "check_export_config",
    "coded_linears",
    "export_compressed_tensors",
]
