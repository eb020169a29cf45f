"""Rate-distortion bounds, computed per tensor.

For a memoryless Gaussian source of variance s2 under squared error, Shannon's
distortion-rate function is D(R) = s2 * 2^(-2R) (Cover & Thomas, Elements of Information
Theory, Thm. 10.3.2). Among all sources of a given variance the Gaussian is the hardest
to compress (its D(R) is the largest), so for real weights D(R) is an *upper* bound on
their true distortion-rate function: a quantizer whose MSE sits below the Gaussian curve
(negative gap) is exploiting non-Gaussian structure (e.g. weights that already lie on a
grid), not beating Shannon.

gap_bits = R - R_G(D): how many bits per weight more than an ideal code for a Gaussian of
the same variance would need to reach the same MSE.
"""

from __future__ import annotations

import math

import torch


def gaussian_distortion(variance: float, rate: float) -> float:
    """D(R) = variance * 2^(-2R), in the weight's squared units."""
    return variance * 2.0 ** (-2.0 * rate)


def gaussian_rate(variance: float, distortion: float) -> float:
    """R(D) = max(0, 0.5 log2(variance / D)) bits per sample."""
    if distortion <= 0:
        return math.inf
    return max(0.0, 0.5 * math.log2(variance / distortion))


def tensor_bound(
    original: torch.Tensor, reconstructed: torch.Tensor, rate: float
) -> dict[str, float]:
    """Variance, achieved MSE, D(R) at the given rate (bits per weight, all side
    information counted), the gap in bits and in dB (10 log10 MSE / D(R))."""
    w = original.detach().double()
    variance = float(w.var(unbiased=False))
    mse = float((reconstructed.detach().double() - w).pow(2).mean())
    bound = gaussian_distortion(variance, rate)
    gap_bits = rate - gaussian_rate(variance, mse) if mse > 0 else -math.inf
    gap_db = 10.0 * math.log10(mse / bound) if mse > 0 and bound > 0 else -math.inf
    return {
        "rate": rate,
        "variance": variance,
        "mse": mse,
        "gaussian_dr": bound,
        "gap_bits": gap_bits,
        "gap_db": gap_db,
    }


def summarize_bounds(rows: list[dict[str, float]], weights: list[int]) -> dict[str, float]:
    """Weight-count-weighted means of the per-tensor gaps, plus the extremes."""
    total = float(sum(weights))
    finite = [(r, n) for r, n in zip(rows, weights, strict=True) if math.isfinite(r["gap_bits"])]
    if not finite:
        return {}
    return {
        "mean_gap_bits": sum(r["gap_bits"] * n for r, n in finite) / total,
        "max_gap_bits": max(r["gap_bits"] for r, _ in finite),
        "min_gap_bits": min(r["gap_bits"] for r, _ in finite),
        "mean_mse_over_gaussian_dr": sum(r["mse"] / r["gaussian_dr"] * n for r, n in finite)
        / total,
    }


def plot_bounds(rows: list[dict], path, title: str):
    """Per-tensor achieved MSE beside the Gaussian D(R) at the same rate."""
    from framework.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    x = range(len(rows))
    ax.semilogy(x, [r["mse"] for r in rows], ".", label="achieved MSE")
    ax.semilogy(x, [r["gaussian_dr"] for r in rows], "_", label="Gaussian D(R) at the same rate")
    ax.set_xlabel("coded tensor (block order)")
    ax.set_ylabel("squared error per weight")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def output_error_bound(
    original: torch.Tensor, reconstructed: torch.Tensor, hessian: torch.Tensor
) -> dict[str, float]:
    """The layer's squared output error on its calibration inputs, measured and bounded.

    With H = c X^T X (any c > 0; GPTQ's 2/tokens) and E = W - W_hat, the measured error is
    tr(E H E^T) = c sum_k ||E x_k||^2. Two upper bounds follow from the weight error and the
    activations alone, without the cross terms: lambda_max(H) ||E||_F^2 (the worst input
    direction for every row) and ||E||_2^2 tr(H) (the worst weight direction for every
    input). Both are certified for these inputs: exact inequalities, computed in float64,
    not estimates. They say nothing about inputs outside the calibration set. `ratio` is
    bound / measured (>= 1: how loose the tighter bound is)."""
    h = hessian.detach().to(torch.float64).cpu()
    e = (original.detach().to(torch.float64) - reconstructed.detach().to(torch.float64)).cpu()
    measured = float(((e @ h) * e).sum())
    lam_max = float(torch.linalg.eigvalsh(h)[-1])
    frob_bound = lam_max * float(e.pow(2).sum())
    spectral_bound = float(torch.linalg.matrix_norm(e, ord=2)) ** 2 * float(torch.diag(h).sum())
    bound = min(frob_bound, spectral_bound)
    return {
        "output_error": measured,
        "output_bound_frobenius": frob_bound,
        "output_bound_spectral": spectral_bound,
        "output_bound": bound,
        "bound_ratio": bound / measured if measured > 0 else math.inf,
    }


def summarize_output_bounds(rows: list[dict[str, float]]) -> dict[str, float]:
    """Spread over layers of bound / measured (output_error_bound's `bound_ratio`): min,
    median and max; layers with no measured error (infinite ratio) are left out."""
    ratios = sorted(r["bound_ratio"] for r in rows if math.isfinite(r.get("bound_ratio", math.inf)))
    if not ratios:
        return {}
    return {
        "bound_ratio_min": ratios[0],
        "bound_ratio_median": ratios[len(ratios) // 2],
        "bound_ratio_max": ratios[-1],
    }
