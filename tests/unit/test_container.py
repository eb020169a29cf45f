"""The compressed container: exact round trip, and every kind of damage is a SculptError
that names the file, never a silently wrong tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.codecs import EncodedTensor, read_container, read_manifest, write_container
from framework.codecs.container import MANIFEST, PAYLOAD
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import SculptError


def _tensors() -> tuple[dict[str, EncodedTensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    specs = {
        "a.weight": ((8, 40), UniformGrid(3, 16, False)),
        "b.weight": ((16, 24), UniformGrid(4, None, True)),
        "c.weight": ((1, 40), UniformGrid(3, None, False)),
    }
    encoded, expected = {}, {}
    for name, (shape, grid) in specs.items():
        enc, w_hat = encode(torch.randn(*shape, generator=g), grid)
        encoded[name], expected[name] = enc, w_hat
    return encoded, expected


@pytest.fixture
def container(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    encoded, expected = _tensors()
    return write_container(tmp_path / "compressed", encoded, meta={"method": "test"}), expected


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_round_trip(container) -> None:
    path, expected = container
    assert sorted(p.name for p in path.iterdir()) == [MANIFEST, PAYLOAD]
    out = read_container(path)
    assert list(out) == list(expected)
    for name, w_hat in expected.items():
        assert torch.equal(out[name], w_hat), name
    manifest = read_manifest(path)
    assert manifest["meta"] == {"method": "test"}
    assert manifest["tensors"]["a.weight"]["shape"] == [8, 40]
    assert manifest["tensors"]["a.weight"]["codec"] == "uniform"
    assert manifest["payload_bytes"] == (path / PAYLOAD).stat().st_size


def test_rewrite_replaces_atomically(container) -> None:
    path, _ = container
    enc, w_hat = encode(torch.ones(2, 8), UniformGrid(8, None, False))
    write_container(path, {"only": enc})
    out = read_container(path)
    assert list(out) == ["only"] and torch.equal(out["only"], w_hat)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_truncated_payload(container) -> None:
    path, _ = container
    data = (path / PAYLOAD).read_bytes()
    (path / PAYLOAD).write_bytes(data[:-3])
    with pytest.raises(SculptError, match="truncated") as err:
        read_container(path)
    assert str(path / PAYLOAD) in str(err.value)


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_flipped_byte(container, where: float) -> None:
    path, _ = container
    data = bytearray((path / PAYLOAD).read_bytes())
    i = int(where * len(data)) if where != -1 else len(data) - 1
    data[i] ^= 0x01
    (path / PAYLOAD).write_bytes(bytes(data))
    with pytest.raises(SculptError, match="sha256") as err:
        read_container(path)
    assert str(path / PAYLOAD) in str(err.value)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("a.weight", [40, 8]),  # transposed
        ("a.weight", [8, 39]),
        ("c.weight", [1, 39]),  # 3-bit codes of 39 and 40 columns pack to the same 15 bytes
        ("b.weight", [16, 25]),
    ],
)
def test_edited_manifest_shape(container, name: str, shape: list[int]) -> None:
    path, _ = container
    _edit_manifest(path, lambda m: m["tensors"][name].__setitem__("shape", shape))
    with pytest.raises(SculptError) as err:
        read_container(path)
    assert str(path) in str(err.value)
    assert name in str(err.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("symmetric", True), ("group_size", 20), ("bits", 4)],
)
def test_edited_codec_params(container, key: str, value) -> None:
    """Flipping symmetric, or changing group size / bits in the manifest must not decode
    the same bytes to some other tensor."""
    path, _ = container
    _edit_manifest(path, lambda m: m["tensors"]["a.weight"]["params"].__setitem__(key, value))
    with pytest.raises(SculptError) as err:
        read_container(path)
    assert str(path) in str(err.value) and "a.weight" in str(err.value)


def test_section_outside_payload(container) -> None:
    path, _ = container
    _edit_manifest(
        path, lambda m: m["tensors"]["a.weight"]["sections"]["codes"].__setitem__("offset", 10**6)
    )
    with pytest.raises(SculptError, match="outside the payload") as err:
        read_container(path)
    assert str(path / MANIFEST) in str(err.value)


def test_missing_manifest(container) -> None:
    path, _ = container
    (path / MANIFEST).unlink()
    with pytest.raises(SculptError, match="missing") as err:
        read_container(path)
    assert str(path / MANIFEST) in str(err.value)


def test_missing_payload(container) -> None:
    path, _ = container
    (path / PAYLOAD).unlink()
    with pytest.raises(SculptError, match="missing") as err:
        read_container(path)
    assert str(path / PAYLOAD) in str(err.value)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "zip"}), json.dumps([1, 2])])
def test_corrupt_or_foreign_manifest(container, text: str) -> None:
    path, _ = container
    (path / MANIFEST).write_text(text)
    with pytest.raises(SculptError) as err:
        read_container(path)
    assert str(path / MANIFEST) in str(err.value)


def test_unsupported_version(container) -> None:
    path, _ = container
    _edit_manifest(path, lambda m: m.__setitem__("version", 99))
    with pytest.raises(SculptError, match="version 99") as err:
        read_container(path)
    assert str(path / MANIFEST) in str(err.value)


def test_unknown_codec(tmp_path: Path) -> None:
    """A container written with a codec this build does not know (e.g. by a newer one)."""
    enc = EncodedTensor(codec="lattice-e8", shape=(2, 4), bits=2.0, sections={"codes": b"\x01\x02"})
    path = write_container(tmp_path / "c", {"x.weight": enc})
    with pytest.raises(SculptError, match="unknown codec 'lattice-e8'") as err:
        read_container(path)
    assert str(path / MANIFEST) in str(err.value) and "x.weight" in str(err.value)


def test_edited_codec_name(container) -> None:
    path, _ = container
    _edit_manifest(path, lambda m: m["tensors"]["a.weight"].__setitem__("codec", "other"))
    with pytest.raises(SculptError) as err:
        read_container(path)
    assert str(path) in str(err.value) and "a.weight" in str(err.value)
