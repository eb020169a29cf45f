"""Fuzzing the container reader (hypothesis): truncated payloads, flipped bits in the payload
or the manifest, and edited, re-hashed or swapped manifest entries give a SculptError that
names the container's file, or (for an edit that changes nothing the tensors depend on)
exactly the original tensors: never another exception, never a silently wrong tensor."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.codecs import read_container, write_container
from framework.codecs.container import MANIFEST, PAYLOAD, _header_digest, _table_digest
from framework.codecs.entropy import ECSQ, encode_ecsq, entropy_code_uniform
from framework.codecs.raw import encode_raw
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import SculptError

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _build() -> tuple[str, bytes, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = {k: torch.randn(6, 40, generator=g) for k in "abcde"}
    a, a_hat = encode(w["a"], UniformGrid(3, 16, False))
    b, b_hat = encode(w["b"], UniformGrid(4, None, True))
    c, c_hat = encode_ecsq(w["c"], ECSQ(0.4, 0.1, True))
    d = entropy_code_uniform(encode(w["d"], UniformGrid(2, 8, False))[0])
    d_hat = encode(w["d"], UniformGrid(2, 8, False))[1]
    e = encode_raw(w["e"].half(), in_rate=False)
    encoded = {"a.weight": a, "b.weight": b, "c.weight": c, "d.weight": d, "e.weight": e}
    expected = {"a.weight": a_hat, "b.weight": b_hat, "c.weight": c_hat, "d.weight": d_hat}
    expected["e.weight"] = w["e"].half()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_container(Path(tmp) / "c", encoded, meta={"method": "fuzz"})
        return (path / MANIFEST).read_text(), (path / PAYLOAD).read_bytes(), expected


MANIFEST_TEXT, PAYLOAD_BYTES, EXPECTED = _build()


def _read(manifest: str | bytes, payload: bytes) -> tuple[Path, dict[str, torch.Tensor] | None]:
    """Write the (damaged) files and read them back; None when the reader refused."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / "container"
        path.mkdir()
        raw = manifest.encode("utf-8") if isinstance(manifest, str) else manifest
        (path / MANIFEST).write_bytes(raw)
        (path / PAYLOAD).write_bytes(payload)
        try:
            return path, read_container(path)
        except SculptError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            assert "\n" not in str(exc)
            return path, None


def _assert_exact(out: dict[str, torch.Tensor]) -> None:
    assert list(out) == sorted(EXPECTED)
    for name, tensor in EXPECTED.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name


def test_undamaged_container_reads_exactly() -> None:
    _, out = _read(MANIFEST_TEXT, PAYLOAD_BYTES)
    assert out is not None
    _assert_exact(out)


@FUZZ
@given(keep=st.integers(0, len(PAYLOAD_BYTES) - 1))
def test_truncated_payload(keep: int) -> None:
    _, out = _read(MANIFEST_TEXT, PAYLOAD_BYTES[:keep])
    assert out is None


@FUZZ
@given(flips=st.lists(st.integers(0, 8 * len(PAYLOAD_BYTES) - 1), min_size=1, max_size=4))
def test_flipped_payload_bits(flips: list[int]) -> None:
    data = bytearray(PAYLOAD_BYTES)
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    _, out = _read(MANIFEST_TEXT, bytes(data))
    if bytes(data) == PAYLOAD_BYTES:  # flips that cancel out
        assert out is not None and _assert_exact(out) is None
    else:
        assert out is None  # every payload byte belongs to a checksummed section


@FUZZ
@given(flips=st.lists(st.integers(0, 8 * len(MANIFEST_TEXT.encode()) - 1), min_size=1, max_size=3))
def test_flipped_manifest_bits(flips: list[int]) -> None:
    data = bytearray(MANIFEST_TEXT.encode())
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    _, out = _read(bytes(data), PAYLOAD_BYTES)
    if out is not None:  # e.g. a flip inside `meta`: the tensors must be the originals
        _assert_exact(out)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["codec", "shape", "bits", "params", "sections", "sha256", "offset", "length", "param"]


def _edit(entry: dict[str, Any], field: str, value: Any, pick: int) -> None:
    if field in ("offset", "length"):
        sections = sorted(entry["sections"])
        entry["sections"][sections[pick % len(sections)]][field] = value
    elif field == "param":
        keys = sorted(entry["params"])
        entry["params"][keys[pick % len(keys)]] = value
    else:
        entry[field] = value


def _rehash(manifest: dict[str, Any], name: str) -> None:
    """Make an edited entry self-consistent, as a manifest from another container would be."""
    entry = manifest["tensors"][name]
    digest = _header_digest(entry["codec"], entry["shape"], entry["bits"], entry["params"], name)
    for _, loc in sorted(entry["sections"].items()):
        digest.update(PAYLOAD_BYTES[loc["offset"] : loc["offset"] + loc["length"]])
    entry["sha256"] = digest.hexdigest()
    manifest["tensors_sha256"] = _table_digest(manifest["tensors"])


@FUZZ
@given(
    name=st.sampled_from(sorted(EXPECTED)),
    field=st.sampled_from(FIELDS),
    value=JSON_VALUES,
    pick=st.integers(0, 7),
)
def test_edited_manifest_entry(name: str, field: str, value: Any, pick: int) -> None:
    manifest = json.loads(MANIFEST_TEXT)
    _edit(manifest["tensors"][name], field, value, pick)
    _, out = _read(json.dumps(manifest), PAYLOAD_BYTES)
    if out is not None:  # only an edit that set the value it already had
        assert json.loads(json.dumps(manifest)) == json.loads(MANIFEST_TEXT)
        _assert_exact(out)


@FUZZ
@given(
    name=st.sampled_from(sorted(EXPECTED)),
    field=st.sampled_from(["shape", "bits", "param", "codec"]),
    value=JSON_VALUES | st.sampled_from(["uniform", "ecsq", "uniform_ans", "raw"]),
    pick=st.integers(0, 7),
)
def test_rehashed_manifest_entry(name: str, field: str, value: Any, pick: int) -> None:
    """A checksummed but inconsistent entry: whatever the codec makes of it, the reader
    raises a SculptError or returns a tensor of the shape the manifest declares."""
    manifest = json.loads(MANIFEST_TEXT)
    _edit(manifest["tensors"][name], field, value, pick)
    try:
        _rehash(manifest, name)
    except (TypeError, ValueError, KeyError):
        return  # not encodable as a manifest at all (e.g. a NaN inside a shape list)
    _, out = _read(json.dumps(manifest), PAYLOAD_BYTES)
    if out is not None:
        declared = manifest["tensors"][name]["shape"]
        assert tuple(out[name].shape) == tuple(declared)


@pytest.mark.parametrize(
    "damage",
    ["drop_entry", "duplicate_name", "rename", "swap_names", "other_payload", "no_table_sha"],
)
def test_mismatched_manifest(damage: str) -> None:
    manifest = json.loads(MANIFEST_TEXT)
    tensors = manifest["tensors"]
    payload = PAYLOAD_BYTES
    text = None
    if damage == "drop_entry":
        del tensors["b.weight"]
    elif damage == "duplicate_name":
        # Two entries under one name: JSON would silently keep the last one.
        body = json.dumps(tensors["a.weight"])
        text = MANIFEST_TEXT.replace('"tensors": {', f'"tensors": {{"b.weight": {body},', 1)
        assert text != MANIFEST_TEXT
    elif damage == "rename":
        tensors["z.weight"] = tensors.pop("a.weight")
    elif damage == "swap_names":
        tensors["a.weight"], tensors["b.weight"] = tensors["b.weight"], tensors["a.weight"]
    elif damage == "other_payload":
        payload = bytes(reversed(PAYLOAD_BYTES))
    elif damage == "no_table_sha":
        del manifest["tensors_sha256"]
    _, out = _read(text if text is not None else json.dumps(manifest), payload)
    assert out is None, f"{damage} was not detected"


def test_swapped_names_with_a_consistent_table_still_fail() -> None:
    """Even with the table checksum recomputed, each entry's own digest covers its name."""
    manifest = json.loads(MANIFEST_TEXT)
    tensors = manifest["tensors"]
    tensors["a.weight"], tensors["b.weight"] = tensors["b.weight"], tensors["a.weight"]
    manifest["tensors_sha256"] = _table_digest(tensors)
    _, out = _read(json.dumps(manifest), PAYLOAD_BYTES)
    assert out is None


def test_version_1_containers_still_read() -> None:
    """Containers written before entry digests covered names (version 1) stay readable."""
    manifest = json.loads(MANIFEST_TEXT)
    manifest["version"] = 1
    del manifest["tensors_sha256"]
    for name, entry in manifest["tensors"].items():
        digest = _header_digest(
            entry["codec"], entry["shape"], entry["bits"], entry["params"], None
        )
        for _, loc in sorted(entry["sections"].items()):
            digest.update(PAYLOAD_BYTES[loc["offset"] : loc["offset"] + loc["length"]])
        entry["sha256"] = digest.hexdigest()
        assert name
    _, out = _read(json.dumps(manifest), PAYLOAD_BYTES)
    assert out is not None
    _assert_exact(out)
