"""The compressed container: one binary payload (`payload.bin`) holding every tensor's
sections back to back, and `manifest.json` describing each tensor (codec, shape, bits,
parameters, section offsets, sha256 of its name, description and bytes: an edited manifest
entry is caught like a flipped byte), plus a sha256 over the table of names and entry
digests (a dropped or added entry is caught too).

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
# 2: entry digests cover the tensor's name, sections are hashed in name order, and the
# manifest carries `tensors_sha256`. Version 1 containers still read (without those checks).
VERSION = 2
READABLE_VERSIONS = (1, 2)
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
            digest = _header_digest(enc.codec, list(enc.shape), enc.bits, enc.params, name)
            sections = {}
            # Name order: the manifest is written with sorted keys, and the reader hashes the
            # sections in the order it finds them there.
            for sec_name, data in sorted(enc.sections.items()):
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
            "tensors_sha256": _table_digest(entries),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise SculptError(f"{file}: missing container manifest")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # JSONDecodeError is a ValueError, as is a duplicated key (_unique_keys): a flipped
        # byte in a tensor's name must not let one entry silently shadow another.
        raise SculptError(f"{file}: corrupt manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SculptError(f"{file}: not a {FORMAT} manifest")
    version = manifest.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise SculptError(f"{file}: unsupported container version {version!r}")
    if not isinstance(manifest.get("tensors"), dict):
        raise SculptError(f"{file}: manifest has no tensor table")
    if version >= 2 and manifest.get("tensors_sha256") != _table_digest(manifest["tensors"]):
        raise SculptError(
            f"{file}: tensor table checksum mismatch (entries edited, added or removed)"
        )
    return manifest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _table_digest(entries: dict[str, Any]) -> str:
    """sha256 over the (name, entry sha256) pairs, in name order (the manifest is written
    with sorted keys)."""
    table = [
        [name, e.get("sha256") if isinstance(e, dict) else None]
        for name, e in sorted(entries.items())
    ]
    return hashlib.sha256(json.dumps(table).encode("utf-8")).hexdigest()


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
        out[name] = _read_entry(path, name, entry, data, int(manifest["version"]))
    return out


def _read_entry(path: Path, name: str, entry: Any, data: bytes, version: int) -> torch.Tensor:
    """Verify one entry's bounds and sha256, then decode it. Any failure, whatever a codec
    raises on bytes or parameters it cannot interpret, is a SculptError naming the file."""
    payload_file = path / PAYLOAD
    try:
        enc = _entry_to_encoded(entry, data)
        digest = _header_digest(
            entry["codec"],
            entry["shape"],
            entry["bits"],
            entry["params"],
            name if version >= 2 else None,
        )
    except Exception as exc:  # a malformed entry can fail in many ways; all mean the same
        raise SculptError(f"{path / MANIFEST}: bad entry for '{name}' ({exc})") from exc
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
    except Exception as exc:  # checksummed but inconsistent (e.g. a manifest from elsewhere)
        raise SculptError(f"{path}: cannot decode '{name}' ({exc})") from exc
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != enc.shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise SculptError(f"{path}: '{name}' decoded to {got}, manifest says {enc.shape}")
    return tensor


def _header_digest(codec: Any, shape: Any, bits: Any, params: Any, name: str | None) -> Any:
    """A sha256 started with the entry's description: codec, shape, bits and parameters
    decide how the bytes decode, and the name says which tensor it is, so a manifest edit
    must not pass as a valid tensor. name=None: version 1 (no name)."""
    described = [codec, list(shape), bits, params]
    if name is not None:
        described.insert(0, name)
    # Round-trip through JSON first so the writer hashes exactly what the reader will load.
    header = json.dumps(json.loads(json.dumps(described)), sort_keys=True)
    return hashlib.sha256(header.encode("utf-8"))


def _entry_to_encoded(entry: dict[str, Any], data: bytes) -> EncodedTensor:
    sections = {}
    for sec_name, loc in sorted(entry["sections"].items()):
        start, length = loc["offset"], loc["length"]
        if type(start) is not int or type(length) is not int:
            raise ValueError(f"section '{sec_name}' offset/length are not integers")
        if start < 0 or length < 0 or start + length > len(data):
            raise ValueError(f"section '{sec_name}' lies outside the payload")
        sections[sec_name] = data[start : start + length]
    if not isinstance(entry["shape"], list) or any(type(s) is not int for s in entry["shape"]):
        raise ValueError("shape is not a list of integers")
    shape = tuple(entry["shape"])
    if any(s < 0 for s in shape):
        raise ValueError("negative dimension")
    if not isinstance(entry["params"], dict) or not isinstance(entry["codec"], str):
        raise ValueError("params must be an object and codec a string")
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
