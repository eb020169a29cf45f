"""How far does a LEACE erasure reach beyond the sentences it was fitted on? (issue #5)

Builds every sentence of experiments/data/make_concept_animals_tools.py (each frame with
each noun of its class, 2,366 sentences about 91 nouns), takes SmolLM2-135M's sentence
states after the chosen blocks (framework.concepts.sentence_states, as editor=leace does),
fits LEACE on part of them (whitened with the token second moment of 8 Shakespeare
calibration windows, as the editor's `whiten_on: text`) and probes the erased held-out part
four ways:

* plain: k-fold probe over held-out sentences (what `probe_after` reports). Sentences about
  the same noun land in both training and test folds, so the probe can memorise nouns.
* unseen nouns: k-fold with whole nouns per fold (`probe_after_unseen_groups`).
* control: the plain probe on a control task (Hewitt & Liang, 2019), a random label per
  noun with the real balance: how much the plain probe gets from memorising nouns alone.
* unseen nouns and frames: two folds in which neither a test sentence's noun nor its
  sentence frame occurs in training (class-specific frames can be memorised too).

Three splits between fitting and held-out: by sentence (every held-out noun also occurs in
the fitted half: the editor's default), by noun (held-out nouns never seen by the eraser),
and by noun and frame (held-out sentences pair a new noun with a new frame). Then, split
by noun, how the unseen-noun probe falls as the eraser is fitted on more nouns per class
(18 held-out nouns per class, --seeds draws); `--more-nouns` adds 170 nouns to the 91 for
that. A diagnosis per block (split by noun): the unseen-noun probe and the class signal left
(class_signal_left) after LEACE, after LEACE whitened on the concept sentences, after a
rank-8 eraser and after an oracle fitted on the held-out sentences. `--shared-frames` keeps
only frames that fit either class, so that the noun alone carries the concept.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/concept_erasure_study.py
    OMP_NUM_THREADS=2 .venv/bin/python experiments/concept_erasure_study.py --more-nouns \
        --layers 29 --curve 4 16 27 48 72 92
    OMP_NUM_THREADS=2 .venv/bin/python experiments/concept_erasure_study.py --shared-frames \
        --more-nouns --layers 8 16 29 --curve 4 16 27 48 72 92 --seeds 6

States are cached in --cache (safetensors) so the tables can be redone in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from framework.concepts import (
    class_signal_left,
    control_labels,
    leace,
    probe_accuracy,
    stratified_split,
    transfer_accuracy,
    whitening,
)

# the word lists and frames of the shipped concept file, from its generator
_spec = importlib.util.spec_from_file_location(
    "make_concept_animals_tools",
    Path(__file__).resolve().parent / "data" / "make_concept_animals_tools.py",
)
assert _spec is not None and _spec.loader is not None
words = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(words)


# More nouns for --more-nouns (not in the shipped file): does the erasure reach unseen nouns
# once it is fitted on many more of them?
MORE_ANIMALS = [
    "ant",
    "antelope",
    "armadillo",
    "baboon",
    "bison",
    "boar",
    "buffalo",
    "bull",
    "butterfly",
    "canary",
    "caribou",
    "cheetah",
    "chicken",
    "chimpanzee",
    "chipmunk",
    "cobra",
    "cockroach",
    "coyote",
    "crab",
    "crocodile",
    "cuckoo",
    "dove",
    "dragonfly",
    "eel",
    "elk",
    "emu",
    "falcon",
    "ferret",
    "finch",
    "flamingo",
    "gazelle",
    "gecko",
    "gerbil",
    "gibbon",
    "gopher",
    "gorilla",
    "grasshopper",
    "gull",
    "hamster",
    "hare",
    "heron",
    "hippo",
    "hornet",
    "hummingbird",
    "hyena",
    "iguana",
    "jackal",
    "jaguar",
    "jellyfish",
    "kangaroo",
    "kingfisher",
    "koala",
    "ladybird",
    "lamb",
    "lark",
    "leopard",
    "llama",
    "lobster",
    "lynx",
    "magpie",
    "mole",
    "mongoose",
    "moth",
    "mule",
    "newt",
    "octopus",
    "ostrich",
    "panda",
    "panther",
    "parrot",
    "peacock",
    "pelican",
    "penguin",
    "pheasant",
    "pigeon",
    "platypus",
    "porcupine",
    "possum",
    "puffin",
    "quail",
    "raccoon",
    "raven",
    "reindeer",
    "rhino",
    "robin",
    "salamander",
    "scorpion",
    "seagull",
    "shark",
    "shrew",
    "skunk",
    "sloth",
    "snail",
    "spider",
    "starling",
    "stork",
    "swallow",
    "tortoise",
    "vulture",
    "walrus",
    "wasp",
    "weasel",
    "woodpecker",
    "worm",
    "yak",
]
MORE_TOOLS = [
    *[
        "adze",
        "auger",
        "bradawl",
        "caliper",
        "chainsaw",
        "drawknife",
        "edger",
        "gimlet",
        "gouge",
        "loppers",
        "machete",
    ],
    *[
        "mattock",
        "micrometer",
        "multimeter",
        "rasp",
        "scraper",
        "sickle",
        "snips",
        "spokeshave",
        "whetstone",
    ],
    *["bolt cutter", "bow saw", "brace and bit", "caulking gun", "chalk line", "circular saw"],
    *["claw hammer", "club hammer", "combination square", "coping saw", "countersink bit"],
    *["crimping tool", "dowel jig", "drill press", "feeler gauge", "fret saw", "glue gun"],
    *["grease gun", "hand drill", "heat gun", "hedge trimmer", "hex key", "impact driver"],
    *["mitre saw", "nail set", "needle-nose pliers", "nut driver", "oscillating tool"],
    *["pipe cutter", "pipe wrench", "plumb bob", "pruning shears", "rivet gun", "rotary tool"],
    *["sanding block", "stud finder", "tenon saw", "tile cutter", "tin snips", "try square"],
    *["voltage tester", "wire stripper", "box cutter", "bench grinder", "belt sander"],
]


# More frames that only the noun decides, for --shared-frames (not in the shipped file): with
# these and the generator's shared frames alone, no frame tells the class.
MORE_SHARED_FRAMES = [
    "The next page shows a {x} in great detail.",
    "Grandma once told me a story about a {x}.",
    "The museum had a painting of a {x}.",
    "On the radio they mentioned a {x}.",
    "The label on the box said {x}.",
    "My friend asked me what a {x} looks like.",
    "The teacher wrote {x} on the board.",
    "In my dream last night there was a {x}.",
]


def every_sentence(
    more: bool = False, shared_only: bool = False
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(texts, labels, noun index, frame index, each frame's kind): each class's frames (its
    own and the shared ones) with each of its nouns, deduplicated as the generator does;
    ``more``: MORE_* nouns too; ``shared_only``: only frames that fit either class (the
    generator's shared ones and MORE_SHARED_FRAMES), every noun in every one of them. A
    frame's kind is animal, tool or shared."""
    texts: list[str] = []
    labels: list[int] = []
    nouns: list[str] = []
    frames: list[str] = []
    animals = words.ANIMALS + (MORE_ANIMALS if more else [])
    tools = words.TOOLS + (MORE_TOOLS if more else [])
    shared = words.SHARED_FRAMES + (MORE_SHARED_FRAMES if shared_only else [])
    for label, names, own in ((0, animals, words.ANIMAL_FRAMES), (1, tools, words.TOOL_FRAMES)):
        own = [] if shared_only else own
        made = {words.fill(f, n): (n, f) for f in own + shared for n in names}
        for text in sorted(made):
            texts.append(text)
            labels.append(label)
            nouns.append(made[text][0])
            frames.append(made[text][1])
    noun_index = {n: i for i, n in enumerate(sorted(set(nouns)))}
    frame_list = sorted(set(frames))
    frame_index = {f: i for i, f in enumerate(frame_list)}
    kinds = [
        "animal" if f in words.ANIMAL_FRAMES else "tool" if f in words.TOOL_FRAMES else "shared"
        for f in frame_list
    ]
    return (
        texts,
        torch.tensor(labels),
        torch.tensor([noun_index[n] for n in nouns]),
        torch.tensor([frame_index[f] for f in frames]),
        kinds,
    )


def split_nouns_and_frames(
    y: torch.Tensor, nouns: torch.Tensor, frames: torch.Tensor, kinds: list[str], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fitted, held out): half of every class's nouns and half of every kind of frame fit
    the eraser; held out are the sentences whose noun and frame are both in the other half
    (the mixed quarters are not used)."""
    gen = torch.Generator().manual_seed(seed)
    fit_nouns, _ = stratified_split(y, 0.5, seed, nouns)
    noun_fitted = torch.zeros(int(nouns.max()) + 1, dtype=torch.bool)
    noun_fitted[nouns[fit_nouns].unique()] = True
    frame_fitted = torch.zeros(len(kinds), dtype=torch.bool)
    for kind in ("animal", "tool", "shared"):
        ids = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
        ids = ids[torch.randperm(len(ids), generator=gen)]
        frame_fitted[ids[: len(ids) // 2]] = True
    fit = (noun_fitted[nouns] & frame_fitted[frames]).nonzero().flatten()
    held = (~noun_fitted[nouns] & ~frame_fitted[frames]).nonzero().flatten()
    return fit, held


def unseen_both(
    x: torch.Tensor, y: torch.Tensor, nouns: torch.Tensor, frames: torch.Tensor, l2: float
) -> float:
    """Two-fold probe in which every test sentence's noun *and* frame are absent from the
    training fold (nouns and frames each dealt to two folds at random; a sentence is tested
    in the fold both of its own fall in, trained on where neither does)."""
    gen = torch.Generator().manual_seed(0)
    noun_fold = torch.randint(2, (int(nouns.max()) + 1,), generator=gen)[nouns]
    frame_fold = torch.randint(2, (int(frames.max()) + 1,), generator=gen)[frames]
    correct = total = 0
    for k in (0, 1):
        test = (noun_fold == k) & (frame_fold == k)
        train = (noun_fold != k) & (frame_fold != k)
        acc, _ = transfer_accuracy(x[train], y[train], x[test], y[test], l2)
        correct += acc * int(test.sum())
        total += int(test.sum())
    return correct / total


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


def subsets_eraser(
    x: torch.Tensor,
    sigma: torch.Tensor,
    y: torch.Tensor,
    nouns: torch.Tensor,
    fit: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """A rank-k eraser: the fitted nouns of each class dealt into k subsets, each subset's
    class-mean difference erased (does a wider erasure catch what the one direction misses?)."""
    xf, yf, nf = x[fit], y[fit], nouns[fit]
    gen = torch.Generator().manual_seed(0)
    order = {c: nf[yf == c].unique() for c in (0, 1)}
    order = {c: v[torch.randperm(len(v), generator=gen)] for c, v in order.items()}
    columns = []
    for j in range(k):
        a, b = torch.isin(nf, order[0][j::k]), torch.isin(nf, order[1][j::k])
        columns.append(xf[a].mean(0) - xf[b].mean(0))
    whiten, unwhiten = whitening(sigma, 1e-12)
    basis, _ = torch.linalg.qr(whiten @ torch.stack(columns, 1))
    proj = unwhiten @ basis @ basis.T @ whiten
    return torch.eye(x.shape[1], dtype=torch.float64) - proj


def diagnose(
    x: torch.Tensor,
    sigma: torch.Tensor,
    y: torch.Tensor,
    nouns: torch.Tensor,
    folds: int,
    l2: float,
) -> dict[str, float]:
    """Split by noun: the unseen-noun probe after four erasers, and the class signal each
    leaves (class_signal_left): LEACE as the editor fits it; whitened on the concept
    sentences (shrinkage 0.1) instead of on text; rank 8 (subsets_eraser); and an oracle
    fitted on the held-out sentences themselves, which no real eraser could be."""
    fit, held = stratified_split(y, 0.5, 0, nouns)
    concept_whitened, _ = leace(x[fit], y[fit], 2, 0.1)
    erasers = {
        "leace": erase(x, sigma, y, fit),
        "whitened_on_concept": torch.eye(x.shape[1], dtype=torch.float64) - concept_whitened,
        "rank_8": subsets_eraser(x, sigma, y, nouns, fit, 8),
        "oracle": erase(x, sigma, y, held),
    }
    row = {}
    for name, e in erasers.items():
        erased = x[held] @ e.T
        row[name] = probe_accuracy(erased, y[held], folds, l2, 0, nouns[held])[0]
        left = class_signal_left(x[held], erased, y[held], nouns[held], sigma)
        row[f"{name}_signal_left"] = float("nan") if left is None else left
    row["majority"] = float(torch.bincount(y[held]).max()) / len(held)
    return row


def probes(
    x: torch.Tensor,
    y: torch.Tensor,
    nouns: torch.Tensor,
    frames: torch.Tensor,
    folds: int,
    l2: float,
) -> dict[str, float]:
    return {
        "plain": probe_accuracy(x, y, folds, l2)[0],
        "unseen_nouns": probe_accuracy(x, y, folds, l2, 0, nouns)[0],
        "control": probe_accuracy(x, control_labels(y, nouns), folds, l2)[0],
        "unseen_nouns_and_frames": unseen_both(x, y, nouns, frames, l2),
    }


def _cells(row: dict[str, float]) -> str:
    keys = ("plain", "unseen_nouns", "control", "unseen_nouns_and_frames")
    return " / ".join(f"{row[k]:.3f}" for k in keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24, 29])
    parser.add_argument("--curve-layers", type=int, nargs="+", default=[16, 29])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--more-nouns", action="store_true", help="add MORE_ANIMALS/TOOLS")
    parser.add_argument(
        "--shared-frames",
        action="store_true",
        help="only frames that fit either class (with MORE_SHARED_FRAMES): the noun alone says",
    )
    parser.add_argument(
        "--curve", type=int, nargs="+", default=[2, 4, 8, 16, 27], help="nouns per class fitted"
    )
    parser.add_argument("--seeds", type=int, default=3, help="draws of nouns for the curve")
    parser.add_argument("--skip-splits", action="store_true", help="only the diagnosis and curve")
    parser.add_argument("--cache", default="outputs/concept_erasure_study/states.safetensors")
    parser.add_argument("--out", default="outputs/concept_erasure_study/results.json")
    args = parser.parse_args()

    texts, y, nouns, frames, kinds = every_sentence(args.more_nouns, args.shared_frames)
    suffix = "_more" * args.more_nouns + "_shared" * args.shared_frames
    args.cache = args.cache.replace(".safetensors", f"{suffix}.safetensors")
    args.out = args.out.replace(".json", f"{suffix}.json")
    layers = sorted(set(args.layers) | set(args.curve_layers))
    cached = states(layers, texts, Path(args.cache))
    print(f"{len(texts)} sentences, {len(nouns.unique())} nouns, layers {layers}")

    results: dict[str, list[dict]] = {"splits": [], "noun_curve": [], "diagnosis": []}
    readings = "plain / unseen nouns / control / unseen nouns and frames"
    if not args.skip_splits:
        print(f"\n| block | held out | sentences | before: {readings} | after: {readings} |")
        print("|---|---|---|---|---|")
    for layer in [] if args.skip_splits else args.layers:
        x, sigma = cached[f"x{layer}"].double(), cached[f"s{layer}"].double()
        for split in ("sentences", "nouns", "nouns and frames"):
            if split == "nouns and frames":
                fit, held = split_nouns_and_frames(y, nouns, frames, kinds)
            else:
                fit, held = stratified_split(y, 0.5, 0, nouns if split == "nouns" else None)
            e = erase(x, sigma, y, fit)
            where = (y[held], nouns[held], frames[held], args.folds, args.l2)
            before = probes(x[held], *where)
            after = probes(x[held] @ e.T, *where)
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

    names = ("leace", "whitened_on_concept", "rank_8", "oracle")
    print(
        "\n| block | unseen-noun probe after (class signal left): "
        + " / ".join(names)
        + " | majority |\n|---|---|---|"
    )
    for layer in args.layers:
        x, sigma = cached[f"x{layer}"].double(), cached[f"s{layer}"].double()
        row = diagnose(x, sigma, y, nouns, args.folds, args.l2)
        results["diagnosis"].append({"layer": layer, **row})
        cells = " / ".join(f"{row[k]:.3f} ({row[k + '_signal_left']:.2f})" for k in names)
        print(f"| {layer} | {cells} | {row['majority']:.3f} |", flush=True)

    curve = " / ".join(map(str, args.curve))
    print(
        f"\n| block | seed | unseen-noun probe after erasure (class signal left), "
        f"nouns per class fitted: {curve} |"
    )
    print("|---|---|---|")
    for layer in args.curve_layers:
        x, sigma = cached[f"x{layer}"].double(), cached[f"s{layer}"].double()
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            order = {}
            for c in (0, 1):
                names = nouns[y == c].unique()
                order[c] = names[torch.randperm(len(names), generator=gen)]
            held = torch.isin(nouns, torch.cat([order[c][:18] for c in (0, 1)])).nonzero().flatten()
            row = []
            for k in args.curve:
                fitted = torch.cat([order[c][18 : 18 + k] for c in (0, 1)])
                fit = torch.isin(nouns, fitted).nonzero().flatten()
                e = erase(x, sigma, y, fit)
                xe = x[held] @ e.T
                acc = probe_accuracy(xe, y[held], args.folds, args.l2, 0, nouns[held])[0]
                left = class_signal_left(x[held], xe, y[held], nouns[held], sigma) or 0.0
                row.append(f"{acc:.3f} ({left:.2f})")
                results["noun_curve"].append(
                    {
                        "layer": layer,
                        "seed": seed,
                        "nouns_per_class": k,
                        "unseen_nouns": acc,
                        "class_signal_left": left,
                    }
                )
            print(f"| {layer} | {seed} | " + " / ".join(row) + " |", flush=True)

    # If what is left is the fitted nouns' sampling error, its square falls as 1/n: then
    # n x left^2 (averaged over the draws: each draw's estimate is noisy) stays level.
    print(f"\n| block | n x (class signal left)^2, mean over {args.seeds} draws: {curve} |")
    print("|---|---|")
    for layer in args.curve_layers:
        cells = []
        for k in args.curve:
            lefts = [
                r["class_signal_left"] ** 2
                for r in results["noun_curve"]
                if r["layer"] == layer and r["nouns_per_class"] == k
            ]
            cells.append(f"{k * sum(lefts) / len(lefts):.2f}")
        print(f"| {layer} | " + " / ".join(cells) + " |")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
