"""Read a W&B offline run (`<dir>/wandb/offline-run-*/run-<id>.wandb`) back, without a
server and without the network: what `sculpt compare` reads offline, and what the tests
check logged metrics against.

wandb 0.31 ships no Python reader for its transaction log (the old
`wandb.sdk.internal.datastore` is gone; `wandb-core`, a Go binary, writes it), so this
module decodes the file itself. The format is a LevelDB-style log:

- a 7-byte file header: b":W&B", the magic 0xBEE1 (little endian), version 0;
- 32 KiB blocks of chunks, each with a 7-byte header: crc32 (IEEE, seeded with the type
  byte, as wandb's writer computes it), data length (uint16), type (1 FULL, 2 FIRST,
  3 MIDDLE, 4 LAST); a block tail shorter than a chunk header is zero padding;
- each reassembled record is one `wandb.proto.wandb_internal_pb2.Record` protobuf.

Checksums are verified, so a corrupt or truncated file is an error, not silently fewer
metrics. `leet_records` runs `wandb leet inspect --json`, W&B's own reader, for cross-checks.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The .wandb file is not a W&B transaction log or is corrupt."""


def find_run_files(root: str | Path) -> list[Path]:
    """Every `run-*.wandb` under `root` (a run folder, its wandb/ folder or an offline-run-*)."""
    return sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))


def raw_records(path: str | Path) -> list[bytes]:
    """The serialized records of one .wandb file, checksums verified."""
    data = Path(path).read_bytes()
    if not data.startswith(FILE_HEADER):
        raise WandbLogError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    records: list[bytes] = []
    pending: bytearray | None = None
    pos = len(FILE_HEADER)
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # zero padding at a block's end
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER > len(data):
            raise WandbLogError(f"{path}: truncated chunk header at byte {pos}")
        checksum, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0 and checksum == 0:  # preallocated zeros: end of log
            break
        start = pos + CHUNK_HEADER
        chunk = data[start : start + length]
        if len(chunk) != length:
            raise WandbLogError(f"{path}: truncated record at byte {pos}")
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise WandbLogError(f"{path}: checksum mismatch at byte {pos}")
        if kind == FULL:
            records.append(bytes(chunk))
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbLogError(f"{path}: continuation chunk without a first at byte {pos}")
            pending += chunk
            if kind == LAST:
                records.append(bytes(pending))
                pending = None
        else:
            raise WandbLogError(f"{path}: unknown chunk type {kind} at byte {pos}")
        pos = start + length
    if pending is not None:
        raise WandbLogError(f"{path}: ends inside a record")
    return records


def _item_value(item: Any) -> Any:
    """A HistoryItem/SummaryItem/ConfigItem value: typed oneof (newer writers) or value_json."""
    oneofs = item.DESCRIPTOR.oneofs_by_name
    which = item.WhichOneof("value") if "value" in oneofs else None
    if which == "none":
        return None
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _item_key(item: Any) -> str:
    # W&B's own flattening of a nested value (an image's "path", "_type", ...) is "."
    return ".".join(item.nested_key) if item.nested_key else item.key


@dataclass
class WandbRun:
    path: Path
    run_id: str = ""
    project: str = ""
    display_name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step
    summary: dict[str, Any] = field(default_factory=dict)  # the final state of each key
    exit_code: int | None = None

    def metric(self, key: str) -> list[Any]:
        """Every value logged under `key`, in step order."""
        return [row[key] for row in self.history if key in row]

    def metrics(self) -> dict[str, Any]:
        """The last logged value of every history key."""
        out: dict[str, Any] = {}
        for row in self.history:
            out.update(row)
        return out


def read_run(path: str | Path) -> WandbRun:
    """Decode a .wandb file (or the single one under a folder) into history/summary/config."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = (
            [path]
            if path.suffix == ".wandb"
            else find_run_files(path) or sorted(path.glob("run-*.wandb"))
        )
        if len(files) != 1:
            raise WandbLogError(f"{path}: expected exactly one run-*.wandb, found {len(files)}")
        path = files[0]
    run = WandbRun(path=path)
    for blob in raw_records(path):
        record = pb.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.project = record.run.project
            run.display_name = record.run.display_name
            run.group = record.run.run_group
            run.job_type = record.run.job_type
            run.tags = list(record.run.tags)
            for item in record.run.config.update:
                run.config[_item_key(item)] = _item_value(item)
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = _item_value(item)
        elif kind == "history":
            run.history.append({_item_key(i): _item_value(i) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = _item_value(item)
            for item in record.summary.remove:
                run.summary.pop(_item_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def leet_records(path: str | Path) -> list[dict[str, Any]]:
    """The records as W&B's own `wandb leet inspect --json` prints them (one JSON per line)."""
    exe = Path(sys.executable).with_name("wandb")
    cmd = [str(exe)] if exe.exists() else [shutil.which("wandb") or "wandb"]
    out = subprocess.run(
        [*cmd, "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
