"""How far does a LEACE erasure reach beyond the sentences it was fitted on? (issue #5)

Builds every sentence of experiments/data/make_concept_animals_tools.py (each frame with
each noun of its class, 2,366 sentences about 91 nouns), takes SmolLM2-135M's sentence
states after the chosen blocks (framework.concepts.sentence_states, as editor=leace does),
fits LEACE on part of them (whitened with the token second moment of 8 Shakespeare
calibration windows, as the editor's `whiten_on: text`) and probes the erased held-out part
three ways:

* plain: k-fold probe over held-out sentences (what `probe_after` reports). Sentences about
  the same noun land in both training and test folds, so the probe can memorise nouns.
* unseen nouns: k-fold with whole nouns per fold (`probe_after_unseen_groups`).
* control: the plain probe on a control task (Hewitt & Liang, 2019), a random label per
  noun with the real balance: how much the plain probe gets from memorising nouns alone.

Two splits between fitting and held-out: by sentence (every held-out noun also occurs in
the fitted half: the editor's default) and by noun (held-out nouns never seen by the
eraser). Then, split by noun, how the unseen-noun probe falls as the eraser is fitted on
more nouns per class (18 held-out nouns per class, 3 seeds).

    OMP_NUM_THREADS=2 .venv/bin/python experiments/concept_erasure_study.py

States are cached in --cache (safetensors) so the tables can be redone in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from framework.concepts import control_labels, leace, probe_accuracy, stratified_split

# the word lists and frames of the shipped concept file, from its generator
_spec = importlib.util.spec_from_file_location(
    "make_concept_animals_tools",
    Path(__file__).resolve().parent / "data" / "make_concept_animals_tools.py",
)
assert _spec is not None and _spec.loader is not None
words = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(words)


def every_sentence() -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(texts, labels, noun index): each class's frames (its own and the shared ones) with
    each of its nouns, deduplicated as the generator does."""
    texts: list[str] = []
    labels: list[int] = []
    nouns: list[str] = []
    for label, names, frames in (
        (0, words.ANIMALS, words.ANIMAL_FRAMES),
        (1, words.TOOLS, words.TOOL_FRAMES),
    ):
        noun_of = {words.fill(f, n): n for f in frames + words.SHARED_FRAMES for n in names}
        for text in sorted(noun_of):
            texts.append(text)
            labels.append(label)
            nouns.append(noun_of[text])
    index = {n: i for i, n in enumerate(sorted(set(nouns)))}
    return texts, torch.tensor(labels), torch.tensor([index[n] for n in nouns])


def states(layers: list[int], texts: list[str], cache: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    if cache.exists():
        cached = load_file(str(cache))
        if all(f"x{i}" in cached for i in layers) and len(cached[f"x{layers[0]}"]) == len(texts):
            return cached
    from framework.concepts import sentence_states, token_covariance
    from framework.data import WindowSpec, build_windows
    from framework.data.sources import shakespeare
    from framework.models import load_packaged
    from framework.models.arch import arch_for

    loaded = load_packaged("smollm2-135m-instruct")
    model = loaded.model.eval()
    arch = arch_for(model)
    x = sentence_states(model, arch, loaded.tokenizer, texts, layers)
    # the runner's calibration windows (PROTOCOL.md), the first 8 as editor=leace takes them
    spec = WindowSpec(shakespeare, 128, 512, "random", 0)
    windows = build_windows(loaded.tokenizer, spec, "calibration", None)[:8]
    out = {f"x{i}": x[i].contiguous() for i in layers}
    for i in layers:
        out[f"s{i}"] = token_covariance(model, arch, windows, i, centered=False).contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    save_file(out, str(tmp))
    tmp.replace(cache)
    return out


def erase(x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """The bias-free LEACE eraser E = I - P fitted on x[fit] (editor=leace, readers)."""
    proj, _ = leace(x[fit], y[fit], 2, 0.0, sigma)
    return torch.eye(x.shape[1], dtype=torch.float64) - proj


def three_probes(
    x: torch.Tensor, y: torch.Tensor, nouns: torch.Tensor, folds: int, l2: float
) -> dict[str, float]:
    return {
        "plain": probe_accuracy(x, y, folds, l2)[0],
        "unseen_nouns": probe_accuracy(x, y, folds, l2, 0, nouns)[0],
        "control": probe_accuracy(x, control_labels(y, nouns), folds, l2)[0],
    }


def _cells(row: dict[str, float]) -> str:
    return " / ".join(f"{row[k]:.3f}" for k in ("plain", "unseen_nouns", "control"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24, 29])
    parser.add_argument("--curve-layers", type=int, nargs="+", default=[16, 29])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--cache", default="outputs/concept_erasure_study/states.safetensors")
    parser.add_argument("--out", default="outputs/concept_erasure_study/results.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    texts, y, nouns = every_sentence()
    layers = sorted(set(args.layers) | set(args.curve_layers))
    cached = states(layers, texts, Path(args.cache))
    print(f"{len(texts)} sentences, {len(nouns.unique())} nouns, layers {layers}")

    results: dict[str, list[dict]] = {"splits": [], "noun_curve": []}
    print(
        "\n| block | split | held-out | before: plain / unseen nouns / control "
        "| after: plain / unseen nouns / control |"
    )
    print("|---|---|---|---|---|")
    for layer in args.layers:
        x, sigma = cached[f"x{layer}"].double(), cached[f"s{layer}"].double()
        for split in ("sentences", "nouns"):
            fit, held = stratified_split(y, 0.5, 0, nouns if split == "nouns" else None)
            e = erase(x, sigma, y, fit)
            before = three_probes(x[held], y[held], nouns[held], args.folds, args.l2)
            after = three_probes(x[held] @ e.T, y[held], nouns[held], args.folds, args.l2)
            results["splits"].append(
                {
                    "layer": layer,
                    "split": split,
                    "held_out": len(held),
                    "before": before,
                    "after": after,
                }
            )
            print(
                f"| {layer} | {split} | {len(held)} | {_cells(before)} | {_cells(after)} |",
                flush=True,
            )

    print(
        "\n| block | seed | unseen-noun probe after erasure, by nouns per class fitted: 2 / 4 / "
        "8 / 16 / 27 |"
    )
    print("|---|---|---|")
    for layer in args.curve_layers:
        x, sigma = cached[f"x{layer}"].double(), cached[f"s{layer}"].double()
        for seed in (0, 1, 2):
            gen = torch.Generator().manual_seed(seed)
            order = {}
            for c in (0, 1):
                names = nouns[y == c].unique()
                order[c] = names[torch.randperm(len(names), generator=gen)]
            held = torch.isin(nouns, torch.cat([order[c][:18] for c in (0, 1)])).nonzero().flatten()
            row = []
            for k in (2, 4, 8, 16, 27):
                fitted = torch.cat([order[c][18 : 18 + k] for c in (0, 1)])
                fit = torch.isin(nouns, fitted).nonzero().flatten()
                xe = x[held] @ erase(x, sigma, y, fit).T
                acc = probe_accuracy(xe, y[held], args.folds, args.l2, 0, nouns[held])[0]
                row.append(acc)
                results["noun_curve"].append(
                    {"layer": layer, "seed": seed, "nouns_per_class": k, "unseen_nouns": acc}
                )
            print(f"| {layer} | {seed} | " + " / ".join(f"{a:.3f}" for a in row) + " |", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
