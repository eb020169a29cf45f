"""framework.topology (diagrams, summaries, distances, neural persistence, TwoNN, storage) and
the Topology analyzer on the tiny Llama over real Shakespeare windows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from framework import topology as topo
from framework.config import CONF_DIR, build
from framework.data import WindowSpec, build_windows
from framework.data.sources import shakespeare
from framework.errors import ConfigError
from framework.models import build_tiny_llama
from framework.plugins import Context
from plugins.analyzers.topology import Topology

RNG_SEED = 1234


def noisy_circle(n: int = 150, noise: float = 0.05, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * np.pi, n)
    return np.c_[np.cos(t), np.sin(t)] + noise * rng.standard_normal((n, 2))


# --- diagrams and summaries -------------------------------------------------------------


def test_noisy_circle_has_one_prominent_loop():
    h0, h1 = topo.diagrams(noisy_circle(), max_dim=1)
    life = np.sort(topo.lifetimes(h1))[::-1]
    assert topo.count_persistent(h1, 0.5) == 1
    assert life[0] > 1.0 and life[1] < 0.2  # one loop of radius 1, the rest is noise
    # H0: one essential component, n - 1 finite merges, all well below the circle's gap.
    assert np.isinf(h0[:, 1]).sum() == 1 and len(topo.finite(h0)) == 149
    assert topo.max_persistence(h0) < 0.5


def test_cosine_metric_is_scale_free_and_a_metric():
    x = np.random.default_rng(0).standard_normal((40, 8))
    d = topo.pairwise_distances(x, "cosine")
    np.testing.assert_allclose(d, topo.pairwise_distances(3.0 * x, "cosine"), atol=1e-12)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        x / np.linalg.norm(x, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(d, np.sqrt(np.clip(2 - 2 * cos, 0, None)), atol=1e-7)
    assert np.all(d[:, :, None] <= d[:, None, :] + d.T[None, :, :] + 1e-9)  # triangle inequality
    with pytest.raises(ValueError, match="metric"):
        topo.pairwise_distances(x, "manhattan")


def test_total_persistence_and_betti_curve_by_hand():
    dgm = np.array([[0.0, 1.0], [0.5, 2.0], [1.0, np.inf]])
    assert topo.total_persistence(dgm) == pytest.approx(2.5)  # inf feature left out
    assert topo.total_persistence(dgm, p=2) == pytest.approx(1 + 2.25)
    assert topo.count_persistent(dgm, 1.2) == 1
    np.testing.assert_array_equal(
        topo.betti_curve(dgm, [0.0, 0.5, 1.0, 1.5, 2.0, 9.0]), [1, 2, 2, 2, 1, 1]
    )
    np.testing.assert_array_equal(topo.betti_curve(np.zeros((0, 2)), [0.0, 1.0]), [0, 0])
    grid = topo.filtration_grid([dgm, np.array([[0.0, 3.0]])], steps=4)
    np.testing.assert_allclose(grid, [0, 1, 2, 3])


# --- sliced Wasserstein ------------------------------------------------------------------


def test_sliced_wasserstein_identity_symmetry_positivity():
    a = topo.diagrams(noisy_circle(seed=1))[1]
    b = topo.diagrams(noisy_circle(seed=2, noise=0.15))[1]
    assert topo.sliced_wasserstein(a, a) == 0.0
    ab, ba = topo.sliced_wasserstein(a, b), topo.sliced_wasserstein(b, a)
    assert ab > 0 and ab == ba
    # Deterministic under the seed, and the seed only moves the quadrature a little.
    assert topo.sliced_wasserstein(a, b, seed=7) == topo.sliced_wasserstein(a, b, seed=7)
    assert topo.sliced_wasserstein(a, b, n_directions=400, seed=3) == pytest.approx(ab, rel=0.02)
    # Essential (infinite) features are ignored.
    with_inf = np.vstack([a, [[0.0, np.inf]]])
    assert topo.sliced_wasserstein(with_inf, a) == 0.0


def test_sliced_wasserstein_of_one_point_against_empty_matches_closed_form():
    # (0, 1) against nothing: its partner is its diagonal projection (0.5, 0.5), so
    # SW = mean over theta of |<(-0.5, 0.5), (cos, sin)>| = 0.5 * sqrt(2) * 2 / pi.
    sw = topo.sliced_wasserstein(np.array([[0.0, 1.0]]), np.zeros((0, 2)), n_directions=2000)
    assert sw == pytest.approx(math.sqrt(2) / math.pi, rel=1e-4)
    assert topo.sliced_wasserstein(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0


def test_sliced_wasserstein_agrees_with_persim():
    persim = pytest.importorskip("persim")
    a = topo.diagrams(noisy_circle(seed=1))[1]
    b = topo.diagrams(noisy_circle(seed=2, noise=0.15))[1]
    # persim integrates over the same half circle of directions with a left Riemann sum.
    ours = topo.sliced_wasserstein(a, b, n_directions=200)
    assert ours == pytest.approx(persim.sliced_wasserstein(a, b, M=200), rel=0.01)


def test_compare_diagrams_per_layer():
    a = {"l0": topo.diagrams(noisy_circle(seed=1)), "l1": topo.diagrams(noisy_circle(seed=2))}
    b = {"l0": a["l0"], "l1": topo.diagrams(noisy_circle(seed=3, noise=0.2))}
    out = topo.compare_diagrams(a, b)
    assert list(out) == ["l0", "l1"] and all(len(v) == 2 for v in out.values())
    assert out["l0"] == [0.0, 0.0]
    assert min(out["l1"]) > 0
    with pytest.raises(ValueError, match="different layers"):
        topo.compare_diagrams(a, {"l0": a["l0"]})


# --- TwoNN -------------------------------------------------------------------------------


def test_twonn_plane_in_ten_dimensions():
    rng = np.random.default_rng(RNG_SEED)
    rotation = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    plane = np.c_[rng.uniform(-1, 1, (1000, 2)), np.zeros((1000, 8))] @ rotation
    assert topo.twonn_dimension(plane) == pytest.approx(2.0, abs=0.3)


def test_twonn_five_dimensional_gaussian():
    x = np.random.default_rng(RNG_SEED).standard_normal((1500, 5))
    assert topo.twonn_dimension(x) == pytest.approx(5.0, abs=0.7)
    d = topo.pairwise_distances(x)
    assert topo.twonn_dimension(distances=d) == topo.twonn_dimension(x)


def test_twonn_ignores_duplicates():
    x = np.random.default_rng(0).standard_normal((500, 3))
    assert topo.twonn_dimension(np.vstack([x, x[:10]])) == pytest.approx(
        topo.twonn_dimension(x), abs=0.2
    )
    assert math.isnan(topo.twonn_dimension(np.zeros((2, 3))))


# --- neural persistence ------------------------------------------------------------------


def _kruskal_max_tree(a: np.ndarray) -> np.ndarray:
    """Reference: Kruskal with a union-find over the bipartite graph, strongest edge first."""
    m, n = a.shape
    parent = list(range(m + n))

    def find(v: int) -> int:
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    kept = []
    for flat in np.argsort(-a, axis=None, kind="stable"):
        i, j = divmod(int(flat), n)
        ri, rj = find(i), find(m + j)
        if ri != rj:
            parent[ri] = rj
            kept.append(a[i, j])
    return np.array(kept)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (7, 3), (12, 20)])
def test_max_spanning_tree_matches_kruskal(shape):
    a = np.abs(np.random.default_rng(sum(shape)).standard_normal(shape))
    got = topo.max_spanning_tree_weights(a)
    assert len(got) == sum(shape) - 1
    np.testing.assert_allclose(np.sort(got), np.sort(_kruskal_max_tree(a)))


def test_neural_persistence_hand_computed():
    # |w| / max|w| = [[1, .5], [.25, 0]]: the tree takes 1, .5, .25 (lifetimes 0, .5, .75)
    # and the component that never dies is paired with 0 (lifetime 1). With p = 2:
    # NP = sqrt(.25 + .5625 + 1), normalised by sqrt(|V| - 1) = sqrt(3).
    w = torch.tensor([[-2.0, 1.0], [0.5, 0.0]])
    dgm = topo.neural_persistence_diagram(w)
    np.testing.assert_allclose(sorted(dgm[:, 1]), [0.0, 0.25, 0.5, 1.0])
    assert topo.neural_persistence(w, normalize=False) == pytest.approx(math.sqrt(1.8125))
    assert topo.neural_persistence(w) == pytest.approx(math.sqrt(1.8125 / 3))
    assert topo.neural_persistence(3 * w) == pytest.approx(topo.neural_persistence(w))  # scale free


def test_neural_persistence_bounds():
    rng = np.random.default_rng(0)
    for shape in [(4, 9), (64, 32), (96, 96)]:
        assert 0.0 <= topo.neural_persistence(rng.standard_normal(shape)) <= 1.0
    spike = np.zeros((5, 7))
    spike[2, 3] = -4.0  # every other edge has weight 0: the bound is reached
    assert topo.neural_persistence(spike) == pytest.approx(1.0)
    flat = np.ones((5, 7))  # every tree edge has lifetime 0; only the essential class counts
    assert topo.neural_persistence(flat) == pytest.approx(1 / math.sqrt(11))
    with pytest.raises(ValueError):
        topo.neural_persistence(np.zeros((3, 3)))


# --- storage -----------------------------------------------------------------------------


def test_diagrams_round_trip(tmp_path: Path):
    dgms = {
        "model.layers.0": [np.array([[0.0, 0.5], [0.0, np.inf]]), np.zeros((0, 2))],
        "model.layers.1": [np.array([[0.0, 1.0]]), np.array([[0.2, 0.3], [0.4, 0.9]])],
    }
    path = topo.save_diagrams(
        tmp_path / "d" / "diagrams.safetensors",
        dgms,
        arrays={"grid": np.linspace(0, 1, 5), "index": np.arange(3)},
        metadata={"metric": "euclidean", "points": 3},
    )
    assert not list(path.parent.glob(".*"))  # no temp file left behind
    back = topo.load_diagrams(path)
    assert list(back.diagrams) == list(dgms)  # layer order kept
    for layer, ds in dgms.items():
        for a, b in zip(ds, back.diagrams[layer]):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.arrays["grid"], np.linspace(0, 1, 5))
    np.testing.assert_array_equal(back.arrays["index"], np.arange(3))
    assert back.metadata["metric"] == "euclidean" and back.metadata["points"] == "3"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle


def test_load_rejects_other_safetensors(tmp_path: Path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a sculpt diagrams file"):
        topo.load_diagrams(tmp_path / "x.safetensors")


# --- the analyzer on the tiny Llama --------------------------------------------------------


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    tokenizer = build_tiny_llama().tokenizer
    text = shakespeare(groups=["roman"])[:60_000]
    spec = WindowSpec(source=text, windows=4, seq_len=64, sampling="random", seed=0)
    return build_windows(tokenizer, spec, "data.calibration", 512)


def make_ctx(loaded, calibration: torch.Tensor, out: Path, seed: int = 0) -> Context:
    return Context(
        tokenizer=loaded.tokenizer,
        arch=loaded.arch,
        output_dir=out,
        seed=seed,
        stage_name="topology",
        calibration_loader=lambda: calibration.clone(),
    )


def run(tmp_path: Path, calibration: torch.Tensor, seed: int = 0, **kwargs):
    loaded = build_tiny_llama()
    model = loaded.model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"points": 150, "workers": 1, **kwargs}
    result = Topology(**args).analyze(model, make_ctx(loaded, calibration, tmp_path, seed))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # read only
    return result


def _stable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if not k.endswith("seconds")}


def test_analyzer_on_tiny_llama(tmp_path: Path, calibration: torch.Tensor):
    result = run(tmp_path, calibration)
    rows = result.tables["layers"]
    assert [r["layer"] for r in rows] == ["model.layers.0", "model.layers.1"]
    for r in rows:
        assert r["points"] == 150 and r["h0_features"] == 149
        assert r["h1_features"] >= r["h1_prominent"] >= 0
        assert 0 < r["neural_persistence"] <= 1 and r["twonn_dimension"] > 0
    np_rows = result.tables["neural_persistence"]
    assert len(np_rows) == 2 * 7 and all(0 < r["neural_persistence"] <= 1 for r in np_rows)
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics["layers"] == 2
    assert result.metrics["mean_h1_total_persistence"] == pytest.approx(
        np.mean([r["h1_total_persistence"] for r in rows])
    )
    for path in [*result.plots.values(), *result.artifacts.values()]:
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert set(result.plots) == {"diagrams", "summary"}

    saved = topo.load_diagrams(result.artifacts["diagrams"])
    assert list(saved.diagrams) == [r["layer"] for r in rows]
    for r in rows:
        h0, h1 = saved.diagrams[r["layer"]]
        assert len(topo.finite(h1)) == r["h1_features"]
        assert topo.total_persistence(h0) == pytest.approx(r["h0_total_persistence"])
    assert saved.arrays["betti_curves"].shape == (2, 2, len(saved.arrays["betti_grid"]))
    assert len(saved.arrays["token_index"]) == 150
    assert saved.metadata["metric"] == "euclidean" and saved.metadata["points"] == "150"


def test_analyzer_is_deterministic_under_the_seed(tmp_path: Path, calibration: torch.Tensor):
    a = run(tmp_path / "a", calibration)
    b = run(tmp_path / "b", calibration, workers=2)  # the process pool gives the same answer
    c = run(tmp_path / "c", calibration, seed=1)
    assert _stable(a.metrics) == _stable(b.metrics)
    assert a.tables == b.tables
    da, db = (
        topo.load_diagrams(a.artifacts["diagrams"]),
        topo.load_diagrams(b.artifacts["diagrams"]),
    )
    for layer in da.diagrams:
        for x, y in zip(da.diagrams[layer], db.diagrams[layer]):
            np.testing.assert_array_equal(x, y)
    assert topo.compare_diagrams(da.diagrams, db.diagrams) == {k: [0.0, 0.0] for k in da.diagrams}
    dc = topo.load_diagrams(c.artifacts["diagrams"])
    assert not np.array_equal(da.arrays["token_index"], dc.arrays["token_index"])


def test_analyzer_options(tmp_path: Path, calibration: torch.Tensor):
    result = run(
        tmp_path,
        calibration,
        layers=[-1],
        max_dim=0,
        metric="cosine",
        neural_persistence=False,
        points=10_000,
        plot_layers=0,
    )
    (row,) = result.tables["layers"]
    assert row["block"] == 1 and row["points"] == 4 * 63  # all tokens but each window's first
    assert "h1_features" not in row and "neural_persistence" not in result.tables
    assert "mean_neural_persistence" not in result.metrics
    assert set(result.plots) == {"summary"}
    assert len(topo.load_diagrams(result.artifacts["diagrams"]).diagrams[row["layer"]]) == 1
    with pytest.raises(ConfigError, match="layers"):
        run(tmp_path, calibration, layers=[2])


def test_block_outputs_are_the_residual_stream(calibration: torch.Tensor):
    from framework.topology.clouds import block_outputs, sample_tokens

    model = build_tiny_llama().model.eval()
    windows = calibration[:2]
    index = sample_tokens(2, windows.shape[1], 50, torch.Generator().manual_seed(0))
    got = block_outputs(model, list(model.model.layers), windows, index)
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    first = hidden[1][:, 1:].reshape(-1, hidden[1].shape[-1])[index].double()
    torch.testing.assert_close(got[0], first)
    # transformers applies the final norm to the last hidden_states entry; the hook does not.
    last = hidden[-1][:, 1:].reshape(-1, hidden[-1].shape[-1])[index].double()
    normed = model.model.norm(got[1].float()).double()
    torch.testing.assert_close(normed, last, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1], last)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_dim": 2},
        {"metric": "manhattan"},
        {"points": 2},
        {"layers": []},
        {"calibration_windows": 0},
        {"workers": 0},
    ],
)
def test_constructor_rejects(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        Topology(**kwargs)


def test_yaml_builds_the_documented_defaults():
    node = OmegaConf.load(CONF_DIR / "analyzer" / "topology.yaml")
    plugin = build(node, "analyzer")
    assert isinstance(plugin, Topology) and plugin.needs_calibration
    assert (plugin.points, plugin.calibration_windows, plugin.max_dim) == (800, 4, 1)
    assert plugin.layers is None and plugin.metric == "euclidean"
