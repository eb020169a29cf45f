"""Compressed containers and the codecs that fill them. Importing registers the codecs."""

from framework.codecs import entropy, incoherent, raw, uniform  # noqa: F401 - register their codecs
from framework.codecs.container import (
    EncodedTensor,
    container_size,
    read_container,
    read_manifest,
    write_container,
)

__all__ = ["EncodedTensor", "container_size", "read_container", "read_manifest", "write_container"]
