"""The real `sculpt` CLI end to end on the tiny random Llama, with W&B offline: the run
folder's artifacts are complete and consistent with each other, and the W&B offline run,
read back from its .wandb file, holds the same namespaced metrics as metrics.json."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from cli_runner import TINY, assert_complete_run_folder, run_many, run_sculpt

from framework.config import CONF_DIR
from framework.wandb_offline import find_run_files, read_run

BLOCK_WEIGHT = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
)
NAMESPACED = (
    "reference/perplexity",
    "compressor/perplexity",
    "compressor/bits_per_weight",
    "compressor/kl",
    "compressor/top1_agreement",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single run and one 2-job multirun, both with W&B offline, run side by side."""
    root = tmp_path_factory.mktemp("cli")
    single, sweep = root / "single", root / "sweep"
    results = run_many(
        {
            "single": ([*TINY, "logger=wandb", f"hydra.run.dir={single}"], root / "cwd-single"),
            "multi": (
                ["-m", *TINY, "logger=wandb", "compressor.bits=2,4", f"hydra.sweep.dir={sweep}"],
                root / "cwd-multi",
            ),
        }
    )
    for result in results.values():
        assert result.returncode == 0, result.explain()
    return {"single": single, "sweep": sweep}


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_run_folder_is_complete(runs: dict[str, Path]) -> None:
    folder = runs["single"]
    assert_complete_run_folder(folder)
    metrics = _metrics(folder)
    flat = metrics["flat"]
    assert [s["name"] for s in metrics["stages"]] == ["reference", "analyzer", "compressor"]
    for key in NAMESPACED:
        assert math.isfinite(flat[key]), key
    assert flat["compressor/nominal_bits"] == 3
    # the report is about this run: it shows the measured perplexities
    report = (folder / "report.md").read_text()
    for key in ("reference/perplexity", "compressor/perplexity"):
        assert str(int(flat[key])) in report, key
    assert (folder / ".hydra" / "config.yaml").is_file()
    # nothing escaped into the working directory
    assert not (folder.parent / "cwd-single" / "outputs").exists()


def test_saved_model_loads_and_reproduces_the_measured_perplexity(runs: dict[str, Path]) -> None:
    """model/ loads with plain transformers (no sculpt code), every weight present, and its
    perplexity on the evaluation windows is the compressed perplexity in metrics.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from framework.data.sources import kjv

    folder = runs["single"]
    model, info = AutoModelForCausalLM.from_pretrained(folder / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    # debug=default evaluates the first 4 non-overlapping 128-token windows of the KJV; the
    # tiny model's tokenizer is byte-level, so a prefix of the text gives the same tokens
    ids = tokenizer(kjv()[:4096], add_special_tokens=False)["input_ids"][: 4 * 128]
    assert len(ids) == 4 * 128
    windows = torch.tensor(ids).view(4, 128)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    assert torch.isfinite(logits).all()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)
    )
    measured = _metrics(folder)["flat"]["compressor/perplexity"]
    assert math.exp(float(nll)) == pytest.approx(measured, rel=1e-4)


def test_container_decodes_bit_exactly_to_saved_weights(runs: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from framework.codecs import read_container
    from framework.models import build_tiny_llama

    folder = runs["single"]
    decoded = read_container(folder / "compressed")
    saved: dict[str, torch.Tensor] = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        saved.update(load_file(file))
    block = {k for k in saved if BLOCK_WEIGHT.fullmatch(k)}
    assert len(block) == 2 * 7
    assert set(decoded) == block
    original = dict(build_tiny_llama().model.named_parameters())
    for name in sorted(block):
        w = saved[name]
        assert decoded[name].shape == w.shape
        assert torch.equal(decoded[name].to(w.dtype), w), name
        # the saved model is the compressed one: 3-bit codes, one group per row here
        # (rows of 64 or 176 < group 192), so at most 8 distinct values per row
        assert max(len(torch.unique(row)) for row in w) <= 2**3, name
        assert not torch.equal(w, original[name].detach()), f"{name} was not quantized"
    # the rate in metrics.json is the payload's bytes over the coded weights
    flat = _metrics(folder)["flat"]
    payload_bits = 8 * (folder / "compressed" / "payload.bin").stat().st_size
    assert flat["compressor/bits_per_weight"] == pytest.approx(
        payload_bits / sum(w.numel() for w in decoded.values())
    )


def test_wandb_offline_run_holds_the_namespaced_metrics(runs: dict[str, Path]) -> None:
    folder = runs["single"]
    files = find_run_files(folder / "wandb")
    assert len(files) == 1, files
    run = read_run(files[0])
    assert run.run_id and files[0].name == f"run-{run.run_id}.wandb"
    assert run.exit_code == 0
    assert run.project == "sculpt"
    assert run.config["compressor"]["bits"] == 3
    assert run.config["model"]["_target_"] == "framework.models.build_tiny_llama"
    flat = _metrics(folder)["flat"]
    logged = run.metrics()  # the history: what run.log() sent, step by step
    for key in NAMESPACED:
        assert logged[key] == flat[key], key
        assert run.metric(key) == [flat[key]], f"{key} logged more than once"
    # every stage metric was logged under its stage's namespace
    for key, value in flat.items():
        if key.startswith(("reference/", "analyzer/", "compressor/")) and not key.endswith(
            "model_dir_bytes"
        ):
            assert logged.get(key) == value, key
    # the summary holds the complete flat metrics, final/* included
    for key, value in flat.items():
        assert run.summary.get(key) == value, key
    # the analyzer's table and plot were logged as W&B media, each under a key of its own
    assert logged.get("analyzer/tables/layers._type") == "table-file"
    assert logged.get("analyzer/plots/layer_stats._type") == "image-file"
    media = {k.split(".", 1)[0] for k in logged if "." in k}
    clashes = sorted(m for m in media if m in logged)
    assert not clashes, f"media logged under a metric's key: {clashes}"


def test_multirun_jobs_are_complete_and_keep_their_own_wandb_runs(runs: dict[str, Path]) -> None:
    sweep = runs["sweep"]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    assert not (sweep / "wandb").exists(), "W&B wrote into the sweep folder, not the job folders"
    seen: dict[int, str] = {}
    bpw: dict[int, float] = {}
    for job in jobs:
        assert_complete_run_folder(job)
        flat = _metrics(job)["flat"]
        bits = int(flat["compressor/nominal_bits"])
        files = find_run_files(job)
        assert len(files) == 1, f"job {job.name}: {files}"
        run = read_run(files[0])
        assert run.exit_code == 0
        assert run.config["compressor"]["bits"] == bits
        # only this job's own numbers: one value per key, equal to its metrics.json
        assert run.metric("compressor/nominal_bits") == [bits]
        assert run.metric("compressor/bits_per_weight") == [flat["compressor/bits_per_weight"]]
        assert run.metric("reference/perplexity") == [flat["reference/perplexity"]]
        assert run.summary["compressor/bits_per_weight"] == flat["compressor/bits_per_weight"]
        seen[bits] = run.run_id
        bpw[bits] = flat["compressor/bits_per_weight"]
    assert set(seen) == {2, 4}
    assert seen[2] != seen[4], "the two jobs merged into one W&B run"
    assert bpw[2] < bpw[4]


def test_help_lists_the_config_groups(tmp_path: Path) -> None:
    result = run_sculpt(["--help"], tmp_path)
    assert result.returncode == 0, result.explain()
    text = result.stdout
    assert "Configuration groups" in text
    listed: dict[str, set[str]] = {}
    # Only the group listing, not the composed config printed after it.
    groups_part = text.split("Configuration groups", 1)[1].split("== Config ==", 1)[0]
    for line in groups_part.splitlines():
        m = re.fullmatch(r"([\w/]+): (.+)", line.strip())
        if m:
            listed[m.group(1)] = {o.strip() for o in m.group(2).split(",")}
    for group in (
        "analyzer",
        "compressor",
        "data",
        "debug",
        "editor",
        "eval",
        "launcher",
        "logger",
        "model",
        "trainer",
    ):
        options = {p.stem for p in (CONF_DIR / group).glob("*.yaml")}
        assert listed.get(group) == options, (
            f"{group}: help lists {listed.get(group)}, conf has {options}"
        )
    assert not any(tmp_path.iterdir()), "--help created files"


def test_wandb_runs_carry_group_job_type_and_tags(runs: dict[str, Path]) -> None:
    jobs = [read_run(f) for f in find_run_files(runs["sweep"])]
    assert len(jobs) == 2
    assert len({j.group for j in jobs}) == 1 and jobs[0].group.startswith("debug-")
    for job in jobs:
        assert job.job_type == "analyzer+compressor"  # the stages this run executed
        assert "compressor:rtn" in job.tags and "model:tiny_llama" in job.tags


def test_compare_tabulates_a_sweep_from_its_offline_runs(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    result = run_sculpt(["compare", str(runs["sweep"]), "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.explain()
    header, *rows = [
        line.strip("| ").split(" | ") for line in (out / "compare.md").read_text().splitlines()
    ]
    rows = rows[1:]  # the |---| separator
    assert header[:2] == ["run", "compressor.bits"]  # the one config key that varies
    assert "final/perplexity" in header and "compressor/bits_per_weight" in header
    assert len(rows) == 2
    by_bits = {row[1]: dict(zip(header, row)) for row in rows}
    for job in sorted(runs["sweep"].glob("[0-9]")):
        flat = _metrics(job)["flat"]
        bits = json.loads(json.dumps(flat["compressor/nominal_bits"]))
        row = by_bits[str(int(bits))]
        assert float(row["final/perplexity"]) == pytest.approx(flat["final/perplexity"], rel=1e-3)
    assert (out / "compare.png").stat().st_size > 1000
    assert (out / "compare.csv").read_text().count("\n") == 3
    # the rich table went to the terminal too
    assert "final/perplexity" in result.stdout


def test_compare_without_runs_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_sculpt(["compare", str(tmp_path)], tmp_path)
    assert result.returncode == 2
    assert result.stderr_lines() == [
        "sculpt: error: compare: no W&B runs found (was the run made with logger=none?)"
    ]
