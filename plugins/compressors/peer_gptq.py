"""The peer: llm-compressor's GPTQ (vLLM project, PyPI `llmcompressor`), run on the run's
own model and calibration windows so that its numbers sit in the same table as ours.

llm-compressor pins transformers and compressed-tensors to other versions than sculpt's
(0.14.0.1 wants transformers<=5.17 and compressed-tensors==0.19.0), so it cannot share our
venv. It runs in a venv of its own (`make peers-venv`, by default `<venv>/peers`) as a
subprocess, and the two sides exchange files only: the model as an HF safetensors folder,
the calibration windows as a safetensors tensor, the settings as JSON one way; the codes
and scales as safetensors and a JSON summary back. Nothing is pickled in either direction.

What the peer is asked for mirrors our GPTQ's scope and grid: the block linears only (LM
head and embeddings untouched, `framework.models.block_linears`), b-bit symmetric integer
weights with one scale per `group_size` input columns, llm-compressor's defaults otherwise
(static activation ordering, dampening 0.01, block 128, its sequential pipeline). One
deliberate departure: the scales are asked for in fp16 (`scale_dtype`), because fp16 is what
our container stores, so the weights the peer chose are exactly the weights decoded from
the container, and the bits counted are the bits the model needs.

Its codes go into our container with the uniform codec (symmetric: no zero points stored),
so bits per weight are counted from the bytes written like every other compressor's, and
the decoded weights are placed in the model for the runner's evaluation. `peer_seconds` is
the wall time of llm-compressor's own `oneshot` call; the stage's `seconds` also include
starting the peer's Python, writing and reading the model, and encoding.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import nn

from framework.calibration import BatchSize, CalibrationWindows, Damp
from framework.codecs.uniform import UniformGrid, encode
from framework.errors import ConfigError, SculptError
from framework.models import block_linears
from framework.plugins import Compressor, Context, StageResult
from plugins.compressors.rtn import Bits, GroupSize, Quantized

log = logging.getLogger("sculpt")

# The version the peer venv is built with (Makefile: peers-venv) and the numbers in the
# docs were measured with; another version runs too, and is recorded in the container.
PEERS_PIN = "llmcompressor==0.14.0.1"
INSTALL_HINT = f"run `make peers-venv` (installs {PEERS_PIN} into a venv of its own, <venv>/peers) or set compressor.python to a Python that has it"


class PeersMissing(SculptError):
    """llm-compressor is not installed where the plugin looks for it."""


def default_peer_python() -> Path:
    """`make peers-venv` puts the peer's venv inside ours, so it is found from sys.prefix
    wherever the checkout lives (and stays out of git with the rest of .venv/)."""
    return Path(sys.prefix) / "peers" / "bin" / "python"


def _has_llmcompressor(python: Path) -> bool:
    # find_spec only: importing llmcompressor costs ~10 s, paid again by the real run.
    probe = (
        "import importlib.util, sys; sys.exit(importlib.util.find_spec('llmcompressor') is None)"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", probe], capture_output=True, timeout=60, env=_peer_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    # Our venv's packages on the peer's path would mix two transformers versions.
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


# ----------------------------------------------------------------------------------------
# The peer's side. Its source is written into the job folder and run by the peer's Python,
# so it may import only what that venv has (torch, transformers, safetensors, datasets,
# llmcompressor), nothing from sculpt, and must stay self-contained.
# ----------------------------------------------------------------------------------------


def _peer_worker(job_dir: str) -> None:  # pragma: no cover - runs in the peer's venv
    import json
    import os
    import resource
    import time
    from importlib.metadata import version
    from pathlib import Path

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = Path(job_dir)
    spec = json.loads((job / "job.json").read_text())
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        job / "model", dtype=getattr(torch, spec["dtype"])
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(job / "model")
    windows = load_file(job / "calibration.safetensors")["input_ids"]
    load_seconds = time.perf_counter() - t_load
    with open("/proc/self/statm") as statm:  # resident pages once the model is loaded
        loaded_rss_mb = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    # Already tokenized windows: llm-compressor takes an input_ids column as is. In order
    # and unshuffled, so the peer sees exactly the windows our compressors see.
    dataset = Dataset.from_dict(
        {
            "input_ids": windows.tolist(),
            "attention_mask": torch.ones_like(windows).tolist(),
        }
    )
    weights = {
        "num_bits": spec["bits"],
        "type": "int",
        "symmetric": True,
        "strategy": "group" if spec["group_size"] else "channel",
        "group_size": spec["group_size"],
        "scale_dtype": torch.float16,
    }
    modifier = GPTQModifier(
        config_groups={"block_linears": {"targets": spec["targets"], "weights": weights}},
        block_size=spec["block_size"],
        dampening_frac=spec["damp"],
        **({"actorder": None} if spec["actorder"] is None else {}),
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=int(windows.shape[0]),
        max_seq_length=int(windows.shape[1]),
        shuffle_calibration_samples=False,
        batch_size=spec["batch_size"],
    )
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    half = 1 << (spec["bits"] - 1)
    out: dict[str, torch.Tensor] = {}
    layers = {}
    for name in spec["targets"]:
        module = model.get_submodule(name)
        w = module.weight.detach().float()
        scale = module.weight_scale.detach().float()
        zero = getattr(module, "weight_zero_point", None)
        if zero is not None and bool((zero != 0).any()):
            raise RuntimeError(f"{name}: nonzero zero points on a symmetric grid")
        g_idx = getattr(module, "weight_g_idx", None)
        cols = w.shape[1]
        g = spec["group_size"] or cols
        group = torch.arange(cols) // g
        if g_idx is not None and not torch.equal(g_idx.long().cpu(), group):
            raise RuntimeError(f"{name}: groups are not contiguous column ranges (g_idx)")
        s = scale[:, group]
        signed = torch.round(w / s)
        if int(signed.min()) < -half or int(signed.max()) > half - 1:
            raise RuntimeError(f"{name}: codes outside the {spec['bits']}-bit signed range")
        # The codes must give back the peer's weights exactly, or we would evaluate
        # something else than what it produced.
        layers[name] = {"max_abs_diff": float((signed * s - w).abs().max())}
        out[f"{name}.codes"] = (signed + half).to(torch.uint8).contiguous()
        out[f"{name}.scale"] = scale.contiguous()
    save_file(out, str(job / "result.safetensors"))
    summary = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "load_seconds": load_seconds,
        "loaded_rss_mb": loaded_rss_mb,
        "peak_rss_mb": peak_rss_mb,
        "layers": layers,
        "rtn_fallback": list(getattr(modifier, "_rtn_fallback_module_names", []) or []),
        "versions": {
            pkg: version(pkg)
            for pkg in ("llmcompressor", "compressed-tensors", "transformers", "torch")
        },
    }
    (job / "result.json").write_text(json.dumps(summary))


# Taken once, at import: inspect reads the file again when asked, and a file edited since
# (a checkout, a formatter) would hand the peer lines that no longer match the function.
_WORKER_SOURCE = inspect.getsource(_peer_worker)


# ----------------------------------------------------------------------------------------
# Our side
# ----------------------------------------------------------------------------------------


class PeerGPTQ(Compressor):
    """llm-compressor's GPTQ on the block linears, symmetric int codes, fp16 group scales.

    Args:
        bits: code width, 2-8.
        group_size: input columns sharing one scale; null = per-channel.
        damp: llm-compressor's dampening_frac (its default 0.01).
        block_size: its lazy-batch width (its default 128).
        actorder: "static" (its default: columns by decreasing Hessian diagonal, groups
            kept as contiguous column ranges) or null (columns in order). Its "group" and
            "weight" orders need a g_idx the container cannot store.
        calibration_windows: how many of the run's calibration windows to hand it (null:
            all, PROTOCOL.md's 128).
        batch_size: windows per calibration forward in the peer.
        python: the peer's Python (null: this Python if it has llmcompressor, else
            `<venv>/peers/bin/python` from `make peers-venv`).
        timeout_s: give up on the peer after this many seconds (null: never).
    """

    needs_calibration = True

    def __init__(
        self,
        bits: Bits = 3,
        group_size: GroupSize = 192,
        damp: Damp = 0.01,
        block_size: Annotated[int, Ge(1)] = 128,
        actorder: Literal["static"] | None = "static",
        calibration_windows: CalibrationWindows = None,
        batch_size: BatchSize = 1,
        python: str | None = None,
        timeout_s: Annotated[float, Gt(0)] | None = None,
    ):
        self.grid = UniformGrid(bits=bits, group_size=group_size, symmetric=True)
        self.damp = float(damp)
        self.block_size = block_size
        self.actorder = actorder
        self.calibration_windows = calibration_windows
        self.batch_size = batch_size
        self.python = python
        self.timeout_s = timeout_s

    def peer_python(self) -> Path:
        """The Python that runs llm-compressor; PeersMissing when there is none."""
        if self.python is not None:
            candidates = [Path(self.python)]
        elif importlib.util.find_spec("llmcompressor") is not None:
            candidates = [Path(sys.executable)]
        else:
            candidates = [default_peer_python()]
        for python in candidates:
            if python.exists() and _has_llmcompressor(python):
                return python
        raise PeersMissing(
            f"compressor=peer_gptq needs llm-compressor, which {candidates[0]} does not have: {INSTALL_HINT}"
        )

    def compress(self, model: nn.Module, ctx: Context) -> StageResult:
        return self.quantize(model, ctx).result(ctx)

    @torch.no_grad()
    def quantize(self, model: nn.Module, ctx: Context) -> Quantized:
        linears = block_linears(model, ctx.arch)
        self._check_groups(linears)
        python = self.peer_python()
        windows = ctx.calibration(self.calibration_windows)
        dtype = next(model.parameters()).dtype
        log_path = ctx.output_dir / f"{ctx.stage_name or 'peer_gptq'}_peer.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # Beside the run's outputs (not /tmp): the model copy is as big as the model.
        with tempfile.TemporaryDirectory(dir=ctx.output_dir, prefix=".peer_gptq_job.") as tmp:
            job = Path(tmp)
            self._write_job(job, model, ctx, windows, list(linears), dtype)
            self._run_peer(python, job, log_path)
            summary = json.loads((job / "result.json").read_text())
            from safetensors.torch import load_file

            result = load_file(str(job / "result.safetensors"))
        total_seconds = time.perf_counter() - t0

        encoded = {}
        sq_err = sq_norm = 0.0
        rows_out: list[dict[str, Any]] = []
        zero_code = float(1 << (self.grid.bits - 1))
        for name, layer in linears.items():
            codes, scale = result.pop(f"{name}.codes"), result.pop(f"{name}.scale")
            w = layer.weight.data
            w32 = w.detach().to(torch.float32).cpu()
            if scale.to(torch.float16).float().ne(scale).any():
                raise SculptError(f"peer_gptq: {name}: the peer's scales are not fp16 values")
            zero = torch.full_like(scale, zero_code)
            enc, w_hat = encode(w32, self.grid, codes=codes, scale=scale, zero=zero)
            err = float((w_hat - w32).pow(2).sum())
            norm = float(w32.pow(2).sum())
            sq_err, sq_norm = sq_err + err, sq_norm + norm
            rows_out.append(
                {
                    "layer": name,
                    "weight_rel_mse": err / max(norm, 1e-30),
                    "peer_max_abs_diff": summary["layers"][name]["max_abs_diff"],
                }
            )
            layer.weight.data.copy_(w_hat.to(device=w.device, dtype=w.dtype))
            encoded[f"{name}.weight"] = enc

        versions = summary["versions"]
        log.info(
            "peer_gptq: llmcompressor %s GPTQ on %d layers in %.1f s (%.1f s with the hand-over)",
            versions.get("llmcompressor"),
            len(linears),
            summary["seconds"],
            total_seconds,
        )
        if summary["rtn_fallback"]:
            log.warning(
                "peer_gptq: llm-compressor fell back to round-to-nearest on %d layer(s): %s",
                len(summary["rtn_fallback"]),
                ", ".join(summary["rtn_fallback"][:5]),
            )
        meta = {
            "method": "peer_gptq",
            **self.grid.__dict__,
            "damp": self.damp,
            "block_size": self.block_size,
            "actorder": self.actorder,
            "calibration_windows": int(windows.shape[0]),
            "peer": "llm-compressor GPTQModifier",
            "peer_versions": versions,
        }
        metrics = {
            "layers": len(linears),
            "weight_relative_mse": sq_err / max(sq_norm, 1e-30),
            "nominal_bits": float(self.grid.bits),
            "peer_seconds": float(summary["seconds"]),
            # Its GPTQ's CPU time (oneshot only), comparable with our stages' cpu_seconds
            # when the two ran under different loads.
            "peer_cpu_seconds": float(summary.get("cpu_seconds", float("nan"))),
            "peer_load_seconds": float(summary["load_seconds"]),
            # The peer process's own memory: resident after loading the model, and its
            # lifetime peak (loading and GPTQ), comparable with our stage's
            # peak_rss_mb - start_rss_mb on top of a loaded model.
            "peer_loaded_rss_mb": float(summary.get("loaded_rss_mb", float("nan"))),
            "peer_peak_rss_mb": float(summary.get("peak_rss_mb", float("nan"))),
            "peer_total_seconds": total_seconds,
            "peer_rtn_fallback_layers": float(len(summary["rtn_fallback"])),
            "peer_max_abs_diff": max((r["peer_max_abs_diff"] for r in rows_out), default=0.0),
            "calibration_windows": int(windows.shape[0]),
            "calibration_tokens": int(windows.numel()),
        }
        return Quantized(encoded=encoded, meta=meta, metrics=metrics, tables={"layers": rows_out})

    def _check_groups(self, linears: dict[str, nn.Linear]) -> None:
        """llm-compressor's GPTQ has no short last group (ours has): a group size that does
        not divide a width is refused here, before minutes are spent on the hand-over."""
        g = self.grid.group_size
        if g is None:
            return
        for name, layer in linears.items():
            if layer.in_features % g:
                raise ConfigError(
                    "group_size",
                    f"{g} does not divide the {layer.in_features} input columns of {name}; llm-compressor's GPTQ needs a group size that divides every block linear's width (SmolLM2: 192, 96, 64, ...; or null for per-channel)",
                )

    def _write_job(
        self,
        job: Path,
        model: nn.Module,
        ctx: Context,
        windows: torch.Tensor,
        targets: list[str],
        dtype: torch.dtype,
    ) -> None:
        from safetensors.torch import save_file

        model.save_pretrained(job / "model", safe_serialization=True)
        ctx.tokenizer.save_pretrained(job / "model")  # llm-compressor insists on a processor
        save_file(
            {"input_ids": windows.to(torch.int64).contiguous().cpu()},
            str(job / "calibration.safetensors"),
        )
        spec = {
            "bits": self.grid.bits,
            "group_size": self.grid.group_size,
            "damp": self.damp,
            "block_size": self.block_size,
            "actorder": self.actorder,
            "batch_size": self.batch_size,
            "targets": targets,
            "dtype": str(dtype).removeprefix("torch."),
        }
        (job / "job.json").write_text(json.dumps(spec, indent=1))
        (job / "worker.py").write_text(
            f"{_WORKER_SOURCE}\n\nif __name__ == '__main__':\n    import sys\n\n    _peer_worker(sys.argv[1])\n"
        )

    def _run_peer(self, python: Path, job: Path, log_path: Path) -> None:
        log.info("peer_gptq: running llm-compressor with %s (its output: %s)", python, log_path)
        with open(log_path, "w") as out:
            try:
                done = subprocess.run(
                    [str(python), str(job / "worker.py"), str(job)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=_peer_env(),
                    timeout=self.timeout_s,
                )
            except subprocess.TimeoutExpired as exc:
                raise SculptError(
                    f"peer_gptq: llm-compressor ran past timeout_s={self.timeout_s:g}; its output: {log_path}"
                ) from exc
        if done.returncode != 0 or not (job / "result.json").exists():
            raise SculptError(
                f"peer_gptq: llm-compressor failed (exit {done.returncode}): {_last_line(log_path)}; its output: {log_path}"
            )


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"
