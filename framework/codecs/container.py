"""The compressed container: one binary payload (`payload.bin`) holding every tensor's
sections back to back, and `manifest.json` describing each tensor (codec, shape, bits,
parameters, section offsets, sha256 of its description and bytes: an edited manifest entry
is caught like a flipped byte).

Reading verifies sizes and checksums before decoding, so a truncated, bit-flipped or
mismatched file is a clear error, never a silently wrong tensor. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from framework.errors import SculptError
from framework.io import atomic_dir

FORMAT = "sculpt-container"
VERSION = 1
MANIFEST = "manifest.json"
PAYLOAD = "payload.bin"


@dataclass
class EncodedTensor:
    """A tensor in coded form: named byte sections plus the parameters its codec needs."""

    codec: str
    shape: tuple[int, ...]
    bits: float  # nominal code width; the true rate is counted from bytes
    params: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, bytes] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(len(b) for b in self.sections.values())


# codec name -> decode(EncodedTensor) -> torch.Tensor. Codecs register themselves on import.
DECODERS: dict[str, Callable[[EncodedTensor], torch.Tensor]] = {}


def register_codec(name: str, decode: Callable[[EncodedTensor], torch.Tensor]) -> None:
    DECODERS[name] = decode


def write_container(
    path: str | Path, tensors: dict[str, EncodedTensor], meta: dict[str, Any] | None = None
) -> Path:
    """Write atomically: the folder appears complete or not at all."""
    path = Path(path)
    entries: dict[str, Any] = {}
    offset = 0
    with atomic_dir(path) as staging, (staging / PAYLOAD).open("wb") as payload:
        for name, enc in tensors.items():
            digest = _header_digest(enc.codec, list(enc.shape), enc.bits, enc.params)
            sections = {}
            for sec_name, data in enc.sections.items():
                payload.write(data)
                digest.update(data)
                sections[sec_name] = {"offset": offset, "length": len(data)}
                offset += len(data)
            entries[name] = {
                "codec": enc.codec,
                "shape": list(enc.shape),
                "bits": enc.bits,
                "params": enc.params,
                "sections": sections,
                "sha256": digest.hexdigest(),
            }
        payload.flush()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "payload_bytes": offset,
            "meta": meta or {},
            "tensors": entries,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise SculptError(f"{file}: missing container manifest")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SculptError(f"{file}: corrupt manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SculptError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise SculptError(f"{file}: unsupported container version {manifest.get('version')}")
    if not isinstance(manifest.get("tensors"), dict):
        raise SculptError(f"{file}: manifest has no tensor table")
    return manifest


def read_container(path: str | Path) -> dict[str, torch.Tensor]:
    """Decode every tensor, verifying payload size, section bounds and sha256 first."""
    import framework.codecs  # noqa: F401 - registers the built-in codecs

    path = Path(path)
    manifest = read_manifest(path)
    payload_file = path / PAYLOAD
    if not payload_file.is_file():
        raise SculptError(f"{payload_file}: missing container payload")
    data = payload_file.read_bytes()
    if len(data) != manifest.get("payload_bytes"):
        raise SculptError(
            f"{payload_file}: {len(data)} bytes, manifest says {manifest.get('payload_bytes')} (truncated or wrong file)"
        )
    out: dict[str, torch.Tensor] = {}
    for name, entry in manifest["tensors"].items():
        try:
            enc = _entry_to_encoded(entry, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise SculptError(f"{path / MANIFEST}: bad entry for '{name}' ({exc})") from exc
        digest = _header_digest(entry["codec"], entry["shape"], entry["bits"], entry["params"])
        for sec in enc.sections.values():
            digest.update(sec)
        if digest.hexdigest() != entry.get("sha256"):
            raise SculptError(
                f"{payload_file}: sha256 mismatch for '{name}' "
                "(corrupt payload or edited manifest entry)"
            )
        decoder = DECODERS.get(enc.codec)
        if decoder is None:
            raise SculptError(f"{path / MANIFEST}: unknown codec '{enc.codec}' for '{name}'")
        try:
            tensor = decoder(enc)
        except (ValueError, RuntimeError) as exc:
            raise SculptError(f"{path}: cannot decode '{name}' ({exc})") from exc
        if tuple(tensor.shape) != enc.shape:
            raise SculptError(
                f"{path}: '{name}' decoded to {tuple(tensor.shape)}, manifest says {enc.shape}"
            )
        out[name] = tensor
    return out


def _header_digest(codec: Any, shape: Any, bits: Any, params: Any) -> Any:
    """A sha256 started with the entry's description: codec, shape, bits and parameters
    decide how the bytes decode, so a manifest edit must not pass as a valid tensor."""
    # Round-trip through JSON first so the writer hashes exactly what the reader will load.
    header = json.dumps(json.loads(json.dumps([codec, list(shape), bits, params])), sort_keys=True)
    return hashlib.sha256(header.encode("utf-8"))


def _entry_to_encoded(entry: dict[str, Any], data: bytes) -> EncodedTensor:
    sections = {}
    for sec_name, loc in entry["sections"].items():
        start, length = int(loc["offset"]), int(loc["length"])
        if start < 0 or length < 0 or start + length > len(data):
            raise ValueError(f"section '{sec_name}' lies outside the payload")
        sections[sec_name] = data[start : start + length]
    shape = tuple(int(s) for s in entry["shape"])
    if any(s < 0 for s in shape):
        raise ValueError("negative dimension")
    return EncodedTensor(
        codec=str(entry["codec"]),
        shape=shape,
        bits=float(entry["bits"]),
        params=dict(entry["params"]),
        sections=sections,
    )


def container_size(path: str | Path) -> dict[str, float]:
    """Rate accounting from the bytes on disk: payload bits / number of coded weights.

    Entries whose params say ``in_rate: false`` (full-precision weights outside the coded
    set that a method had to change, e.g. a rotated embedding: framework.codecs.raw) are
    left out of bits_per_weight and reported as outside_rate_bytes / outside_rate_weights."""
    path = Path(path)
    manifest = read_manifest(path)
    payload = (path / PAYLOAD).stat().st_size
    n_weights, outside_bytes, outside_weights = 0, 0, 0
    for e in manifest["tensors"].values():
        if isinstance(e.get("params"), dict) and e["params"].get("in_rate") is False:
            outside_bytes += sum(int(s["length"]) for s in e["sections"].values())
            outside_weights += _numel(e["shape"])
        else:
            n_weights += _numel(e["shape"])
    manifest_bytes = (path / MANIFEST).stat().st_size
    out = {
        "payload_bytes": float(payload),
        "manifest_bytes": float(manifest_bytes),
        "coded_weights": float(n_weights),
        "bits_per_weight": 8.0 * (payload - outside_bytes) / max(n_weights, 1),
    }
    if outside_weights:
        out["outside_rate_bytes"] = float(outside_bytes)
        out["outside_rate_weights"] = float(outside_weights)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
