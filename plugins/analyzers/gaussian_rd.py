"""Every quantizer of framework.ratedistortion on an i.i.d. N(0,1) source, against Shannon.

A benchmark stage: it ignores the model it is handed (the runner always loads one; use the
tiny random Llama) and measures, per quantizer and target rate, the rate actually spent
(from the bytes written, or log2 of the codebook size for the E8 ball), the MSE, the
Gaussian bound D(R) = 2^(-2R) at that rate, and the gap 0.5 log2(MSE / D(R)) in bits and
in dB. Writes a table and a plot of MSE against rate with the Shannon curve.

Quantizers (names for `quantizers`):
  uniform     fixed-rate uniform scalar, MSE-optimal step for N(0,1)
  lloyd_max   fixed-rate Lloyd-Max scalar
  ecsq        entropy-coded scalar, real ANS bitstream (framework.codecs.entropy)
  ecsq_dz     the same with a deadzone (`ecsq_deadzone`)
  e8          E8-lattice ball codebook, 8-dimensional blocks
  trellis     bitshift trellis (L = `trellis_state_bits`), Viterbi-encoded
  rtn         the framework's uniform codec (min-max, group 128, fp16 scales), as RTN stores it
  rtn_ans     the same with its codes ANS-coded
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import torch
from annotated_types import Ge, Interval
from torch import nn

from framework.errors import ConfigError
from framework.plots import pyplot, save_figure
from framework.plugins import Analyzer, Context, StageResult
from framework.ratedistortion import quantizers as rdq

QUANTIZERS = ("uniform", "lloyd_max", "ecsq", "ecsq_dz", "e8", "trellis", "rtn", "rtn_ans")
# Fixed-rate codes that need a whole number of bits, and the uniform codec's own range.
_MIN_RATE = {"rtn": 2, "rtn_ans": 2}


class GaussianRD(Analyzer):
    """Quantizers on i.i.d. N(0,1) at the given rates: MSE, D(R), gap in bits and dB.

    Args:
        rates: target rates in bits per sample (whole numbers, 1-8).
        samples: source samples per quantizer and rate (a multiple of 1024).
        trellis_samples: samples for the trellis (its Viterbi search dominates the time);
            a prefix of the same draw, a multiple of `trellis_sequence_length`.
        trellis_state_bits: L, the trellis memory (work grows as 2^L).
        trellis_sequence_length: T, samples per (tail-biting) trellis sequence.
        ecsq_deadzone: rounding offset of the `ecsq_dz` row, in [0, 0.5).
        quantizers: which rows to run (default: all of QUANTIZERS).
    """

    def __init__(
        self,
        rates: list[int] | None = None,
        samples: int = 65536,
        trellis_samples: int = 32768,
        trellis_state_bits: Annotated[int, Interval(ge=2, le=20)] = 16,
        trellis_sequence_length: Annotated[int, Ge(2)] = 1024,
        ecsq_deadzone: Annotated[float, Interval(ge=0, lt=0.5)] = 0.2,
        quantizers: list[str] | None = None,
    ):
        self.rates = [1, 2, 3, 4] if rates is None else [int(r) for r in rates]
        if not self.rates or any(not 1 <= r <= 8 for r in self.rates):
            raise ConfigError("rates", f"{self.rates}: each must be a whole number in [1, 8]")
        if samples < 1024 or samples % 1024:
            raise ConfigError("samples", f"{samples} must be a positive multiple of 1024")
        if not (0 < trellis_samples <= samples and trellis_samples % trellis_sequence_length == 0):
            raise ConfigError(
                "trellis_samples",
                f"{trellis_samples} must be <= samples and a multiple of trellis_sequence_length",
            )
        if trellis_state_bits <= max(self.rates):
            raise ConfigError(
                "trellis_state_bits",
                f"{trellis_state_bits} must exceed the largest rate ({max(self.rates)})",
            )
        names = list(QUANTIZERS) if quantizers is None else list(quantizers)
        unknown = [q for q in names if q not in QUANTIZERS]
        if unknown or not names:
            raise ConfigError("quantizers", f"{unknown or names}: choose from {list(QUANTIZERS)}")
        self.samples = samples
        self.trellis_samples = trellis_samples
        self.trellis_state_bits = trellis_state_bits
        self.trellis_sequence_length = trellis_sequence_length
        self.ecsq_deadzone = ecsq_deadzone
        self.quantizers = names

    def _runner(self, name: str) -> Callable[[np.ndarray, float], rdq.Quantized]:
        return {
            "uniform": rdq.uniform_quantize,
            "lloyd_max": rdq.lloyd_max_quantize,
            "ecsq": rdq.ecsq_quantize,
            "ecsq_dz": lambda x, r: rdq.ecsq_quantize(x, r, deadzone=self.ecsq_deadzone),
            "e8": rdq.e8_quantize,
            "trellis": lambda x, r: rdq.trellis_quantize(
                x[: self.trellis_samples],
                r,
                state_bits=self.trellis_state_bits,
                sequence_length=self.trellis_sequence_length,
            ),
            "rtn": rdq.rtn_quantize,
            "rtn_ans": lambda x, r: rdq.rtn_quantize(x, r, ans=True),
        }[name]

    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        source = torch.randn(self.samples, generator=ctx.generator(), dtype=torch.float64).numpy()
        rows: list[dict[str, Any]] = []
        metrics: dict[str, float] = {"samples": float(self.samples)}
        work = [(r, q) for r in self.rates for q in self.quantizers if r >= _MIN_RATE.get(q, 1)]
        for rate, name in ctx.track(work, description="gaussian_rd"):
            start = time.perf_counter()
            out = self._runner(name)(source, float(rate))
            seconds = time.perf_counter() - start
            x = source[: out.x_hat.size]
            mse = float(np.mean((out.x_hat - x) ** 2))
            bound = 2.0 ** (-2.0 * out.rate)
            row = {
                "quantizer": name,
                "target_rate": rate,
                "rate": out.rate,
                "rate_from": out.rate_source,
                "samples": int(x.size),
                "mse": mse,
                "gaussian_dr": bound,
                "gap_bits": rdq.gap_bits(mse, out.rate),
                "gap_db": 10.0 * math.log10(mse / bound),
                "seconds": seconds,
                "detail": out.detail,
            }
            rows.append(row)
            metrics[f"{name}_{rate}bit_gap_bits"] = row["gap_bits"]
            metrics[f"{name}_{rate}bit_rate"] = row["rate"]
        for rate in self.rates:
            at = [r for r in rows if r["target_rate"] == rate]
            if at:
                metrics[f"best_{rate}bit_gap_bits"] = min(r["gap_bits"] for r in at)
        plot = self._plot(rows, ctx.output_dir / "plots" / f"{ctx.stage_name or 'gaussian_rd'}.png")
        return StageResult(
            metrics=metrics, tables={"gaussian_rd": rows}, plots={"gaussian_rd": plot}
        )

    def _plot(self, rows: list[dict[str, Any]], path: Any) -> Any:
        plt = pyplot()
        fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4))
        grid = np.linspace(0.8, max(self.rates) + 0.3, 100)
        ax.semilogy(grid, 2.0 ** (-2.0 * grid), "k-", lw=1.2, label="Shannon D(R) = 2^(-2R)")
        ax_gap.axhline(0.0, color="k", lw=1.2, label="Shannon bound")
        for i, name in enumerate(self.quantizers):
            mine = sorted((r for r in rows if r["quantizer"] == name), key=lambda r: r["rate"])
            if not mine:
                continue
            style = dict(marker="os^vDPx*"[i % 8], ls="--", lw=0.8, label=name)
            ax.semilogy([r["rate"] for r in mine], [r["mse"] for r in mine], **style)
            ax_gap.plot([r["rate"] for r in mine], [r["gap_bits"] for r in mine], **style)
        ax.set_xlabel("rate (bits per sample, as spent)")
        ax.set_ylabel("MSE")
        ax.set_title(f"i.i.d. N(0,1), {self.samples} samples")
        ax.legend(fontsize=7)
        ax_gap.set_xlabel("rate (bits per sample, as spent)")
        ax_gap.set_ylabel("gap to D(R) (bits)")
        ax_gap.set_title("0.5 log2(MSE / D(R))")
        ax_gap.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        return save_figure(fig, path)
