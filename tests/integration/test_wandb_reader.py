"""The W&B offline-run reader the CLI tests rely on, checked against a log written by the
real wandb client (large enough to span many 32 KiB blocks and split records) and against
W&B's own `wandb leet inspect --json`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from framework.wandb_offline import WandbLogError, leet_records, raw_records, read_run

WRITER = textwrap.dedent(
    """
    import sys, wandb
    run = wandb.init(project="reader-test", dir=sys.argv[1], mode="offline",
                     config={"bits": 3, "nested": {"group": [1, 2]}})
    for i in range(120):
        run.log({"stage/value": i * 0.25, "stage/flag": i % 2 == 0, "stage/text": "x" * (40 * i)})
    run.log({"big/blob": "y" * 70000})  # one record longer than two blocks
    run.summary["final/value"] = 1.5
    run.finish()
    """
)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wandb_reader")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", WRITER, str(root)], env=env, check=True, timeout=300)
    files = sorted(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    return files[0]


def test_reads_what_wandb_wrote(logged_run: Path) -> None:
    assert logged_run.stat().st_size > 4 * 32768
    run = read_run(logged_run)
    assert logged_run.name == f"run-{run.run_id}.wandb"
    assert run.project == "reader-test"
    assert run.config["bits"] == 3 and run.config["nested"] == {"group": [1, 2]}
    assert run.metric("stage/value") == [i * 0.25 for i in range(120)]
    assert run.metric("stage/flag") == [i % 2 == 0 for i in range(120)]
    assert run.metric("stage/text")[-1] == "x" * (40 * 119)
    assert run.metric("big/blob") == ["y" * 70000]
    assert run.summary["final/value"] == 1.5
    assert run.summary["stage/value"] == 119 * 0.25
    assert run.exit_code == 0


def test_agrees_with_wandb_leet_inspect(logged_run: Path) -> None:
    records = leet_records(logged_run)
    assert len(records) == len(raw_records(logged_run))
    leet_history = [r["history"]["item"] for r in records if r["type"] == "history"]
    ours = read_run(logged_run).history
    assert len(leet_history) == len(ours)
    for theirs, mine in zip(leet_history, ours, strict=True):
        for key in ("stage/value", "stage/flag", "big/blob"):
            assert theirs.get(key) == mine.get(key)


def test_corruption_is_an_error(logged_run: Path, tmp_path: Path) -> None:
    data = bytearray(logged_run.read_bytes())
    inside_blob = data.index(b"y" * 1000) + 500  # the middle of the 70 kB record
    flipped = tmp_path / "flipped.wandb"
    data[inside_blob] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(WandbLogError, match="checksum"):
        read_run(flipped)
    truncated = tmp_path / "truncated.wandb"
    truncated.write_bytes(logged_run.read_bytes()[:inside_blob])
    with pytest.raises(WandbLogError, match=r"truncated|ends inside"):
        read_run(truncated)
    not_wandb = tmp_path / "other.wandb"
    not_wandb.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(WandbLogError, match="not a W&B"):
        read_run(not_wandb)
