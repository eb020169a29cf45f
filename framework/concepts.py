"""Labelled text for concepts, sentence representations per layer, linear probes and the
LEACE eraser: the shared math of plugins/analyzers/probes.py and plugins/editors/leace.py.

A concept file is JSON lines, ``{"text": "...", "label": "..."}`` per line (see
experiments/data/concept_animals_tools.jsonl), optionally with ``"group"``: what makes
examples near-copies of each other (the noun a sentence is built around). With groups, a
probe can be scored on groups it never saw, and against a control task that gives every
group a random label (Hewitt & Liang, 2019): how much a probe finds by memorising groups
rather than reading the concept. A sentence is represented at a layer by the
mean of its residual-stream states over its tokens after the first (the first position of
a Llama carries the attention sink's huge channels whatever the text). The mean is linear,
so an eraser applied to every token's state is applied to the mean too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from framework.errors import ConfigError, SculptError
from framework.interventions import capture
from framework.models.arch import blocks

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Labelled:
    texts: list[str]
    labels: torch.Tensor  # [n] class indices
    classes: list[str]
    groups: torch.Tensor | None = None  # [n] group indices (the file's "group"), if given


def resolve_path(path: str | Path, key: str) -> Path:
    """A path as given, else relative to the repository (configs name shipped files)."""
    p = Path(path).expanduser()
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        p = REPO_ROOT / p
    if not p.is_file():
        raise SculptError(f"{key}: {path} does not exist")
    return p


def load_labelled(path: str | Path, key: str = "data") -> Labelled:
    file = resolve_path(path, key)
    texts: list[str] = []
    names: list[str] = []
    group_names: list[str | None] = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = str(row["text"]), str(row["label"])
            group = None if row.get("group") is None else str(row["group"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise SculptError(
                f'{key}: {file}:{n}: expected {{"text": ..., "label": ...}} ({exc})'
            ) from exc
        if not text.strip():
            raise SculptError(f"{key}: {file}:{n}: empty text")
        if group_names and (group is None) != (group_names[0] is None):
            raise SculptError(f'{key}: {file}:{n}: "group" must be given on every line or none')
        texts.append(text)
        names.append(label)
        group_names.append(group)
    classes = sorted(set(names))
    if len(classes) < 2:
        raise SculptError(f"{key}: {file} needs at least two labels, found {classes}")
    labels = torch.tensor([classes.index(c) for c in names])
    if int(torch.bincount(labels).min()) < 5:
        raise SculptError(f"{key}: {file}: every label needs at least 5 examples")
    groups = None
    if group_names and group_names[0] is not None:
        index = {g: i for i, g in enumerate(sorted(set(group_names)))}  # type: ignore[arg-type]
        groups = torch.tensor([index[g] for g in group_names])
    return Labelled(texts=texts, labels=labels, classes=classes, groups=groups)


def groups_to_split_by(labelled: Labelled, split_by: str, data: str) -> torch.Tensor | None:
    """The groups a ``split_by`` setting splits by: None for ``examples``, the file's groups
    for ``groups`` (a file without them is refused, naming it)."""
    if split_by != "groups":
        return None
    if labelled.groups is None:
        raise ConfigError("split_by", f'groups: {data} names no "group" per line')
    return labelled.groups


def _first_of_each(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the distinct groups, sorted; the index of each one's first example)."""
    names = groups.unique()
    return names, torch.stack([(groups == g).nonzero()[0, 0] for g in names])


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, rest): ``fraction`` of every class in ``first``, seeded. With
    ``groups``, whole groups go to one side (``fraction`` of every class's groups, a group's
    class being its first example's), so ``rest`` holds only groups ``first`` never had."""
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        units, unit_class = torch.arange(len(labels)), labels
    else:
        units, first = _first_of_each(groups)
        unit_class = labels[first]
    first, rest = [], []
    for c in unit_class.unique():
        idx = units[unit_class == c]
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(fraction * len(idx))
        first.append(idx[:k])
        rest.append(idx[k:])
    a, b = torch.cat(first), torch.cat(rest)
    if groups is not None:
        a, b = torch.isin(groups, a).nonzero().flatten(), torch.isin(groups, b).nonzero().flatten()
    return a.sort().values, b.sort().values


@torch.no_grad()
def sentence_states(
    model: nn.Module,
    arch,
    tokenizer,
    texts: list[str],
    layers: list[int],
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """layer -> [n, hidden]: each text's residual stream after that block, averaged over
    its tokens after the first (float64)."""
    encoded = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if any(len(e) < 2 for e in encoded):
        raise SculptError("data: every text needs at least two tokens")
    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e) for e in chunk)
        # right padding: causal attention keeps real tokens blind to the pads after them
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, e in enumerate(chunk):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        with capture(model, arch, [("residual", i) for i in layers]) as store:
            _forward_until(model, arch, max(layers), ids, mask)
        weights = mask.double()
        weights[:, 0] = 0
        weights = weights / weights.sum(1, keepdim=True)
        for i in layers:
            out[i].append(torch.einsum("bs,bsd->bd", weights, store[("residual", i)].double()))
    return {i: torch.cat(v) for i, v in out.items()}


class _Enough(Exception):
    """Raised by a hook once the last block whose output is wanted has run."""


def _forward_until(
    model: nn.Module, arch, last: int, ids: torch.Tensor, mask: torch.Tensor
) -> None:
    # The blocks after `last` would only cost time: stop the forward pass there.
    def stop(*_: object) -> None:
        raise _Enough

    handle = blocks(model, arch)[last].register_forward_hook(stop)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    except _Enough:
        pass
    finally:
        handle.remove()


@torch.no_grad()
def token_covariance(
    model: nn.Module,
    arch,
    windows: torch.Tensor,
    layer: int,
    skip_first: bool = True,
    centered: bool = True,
) -> torch.Tensor:
    """Covariance [d, d] (float64) of the residual stream after block ``layer`` over every
    token of ``windows`` (the first position of each left out: the attention sink);
    ``centered=False``: the second moment E[h h^T]."""
    feats = []
    for window in windows:
        with capture(model, arch, [("residual", layer)]) as store:
            _forward_until(model, arch, layer, window.unsqueeze(0), torch.ones_like(window)[None])
        h = store[("residual", layer)][0].double()
        feats.append(h[1:] if skip_first else h)
    x = torch.cat(feats)
    if centered:
        x = x - x.mean(0)
    return x.T @ x / len(x)


def _logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _folds(n: int, folds: int, seed: int, groups: torch.Tensor | None) -> list[torch.Tensor]:
    """Test indices of each fold: examples dealt round-robin in a seeded order, or with
    ``groups`` whole groups dealt so (every fold then holds groups no other fold has)."""
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        order = torch.randperm(n, generator=gen)
        return [order[k::folds] for k in range(folds)]
    names = groups.unique()
    if len(names) < folds:
        raise SculptError(f"data: {len(names)} groups cannot fill {folds} grouped folds")
    fold_of = torch.empty(int(names.max()) + 1, dtype=torch.long)
    fold_of[names[torch.randperm(len(names), generator=gen)]] = torch.arange(len(names)) % folds
    return [(fold_of[groups] == k).nonzero().flatten() for k in range(folds)]


def probe_accuracy(
    x: torch.Tensor,
    y: torch.Tensor,
    folds: int = 5,
    l2: float = 1e-2,
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> tuple[float, float]:
    """(probe accuracy, majority baseline), both held-out: k-fold cross-validation of an
    L2-regularised multinomial logistic regression on standardised features, every example
    scored once by a probe that never saw it (with ``groups``: that never saw its group, so
    it cannot key on the group's identity). The baseline is the most frequent class's
    share, what a constant predictor scores (a per-fold majority would sit below it on
    balanced data, since each test fold's class is the training folds' minority)."""
    n_classes = int(y.max()) + 1
    tests = _folds(len(y), folds, seed, groups)
    correct = 0
    for k, test in enumerate(tests):
        train = torch.cat([t for j, t in enumerate(tests) if j != k])
        mu = x[train].mean(0)
        sd = x[train].std(0).clamp(min=1e-8)
        xs = (x - mu) / sd
        w, b = _logistic(xs[train], y[train], n_classes, l2)
        correct += int(((xs[test] @ w + b).argmax(1) == y[test]).sum())
    return correct / len(y), float(torch.bincount(y).max()) / len(y)


def control_labels(y: torch.Tensor, groups: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A control task (Hewitt & Liang, 2019, "Designing and interpreting probes with control
    tasks"): every group gets one label drawn from the real labels' distribution over
    groups, with no relation to the concept. A probe that scores well on it is memorising
    groups; the real task's accuracy minus the control's is the probe's selectivity."""
    gen = torch.Generator().manual_seed(seed)
    names, first = _first_of_each(groups)
    shuffled = y[first][torch.randperm(len(names), generator=gen)]
    label_of = torch.empty(int(names.max()) + 1, dtype=y.dtype)
    label_of[names] = shuffled
    return label_of[groups]


def class_signal_left(
    before: torch.Tensor,
    after: torch.Tensor,
    y: torch.Tensor,
    groups: torch.Tensor,
    metric: torch.Tensor | None = None,
    seed: int = 0,
) -> float | None:
    """How much of the concept's class signal an edit leaves in held-out states, as a
    fraction of its amplitude (0: none; 1: untouched), reading only what generalises across
    groups: the signal a probe trained on some groups and scored on others can use.

    The groups are dealt into two halves A and B (stratified by class); with M_A a half's
    class-mean deviations (one row per class, whitened by ``metric``, default the
    covariance of ``before``), the fraction is sqrt(<M_A, M_B> after / <M_A, M_B> before).
    A group's own offset from its class is independent between the halves, so it averages
    out of both inner products, and only the shared class signal remains (a plain
    comparison of one set's class means would count that noise as signal left).
    None when a half lacks a class."""
    half_a, half_b = stratified_split(y, 0.5, seed, groups)
    classes = y.unique()
    if any(not bool((y[h] == c).any()) for h in (half_a, half_b) for c in classes):
        return None
    cov = metric if metric is not None else torch.cov(before.double().T)
    whiten, _ = whitening(cov.double(), 1e-12)

    def deviations(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z = x[rows].double() @ whiten
        labels = y[rows]
        return torch.stack([z[labels == c].mean(0) for c in classes]) - z.mean(0)

    shared_before = float((deviations(before, half_a) * deviations(before, half_b)).sum())
    shared_after = float((deviations(after, half_a) * deviations(after, half_b)).sum())
    if shared_before <= 0:  # no class signal shared across groups to begin with
        return None
    return max(shared_after / shared_before, 0.0) ** 0.5


def transfer_accuracy(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    l2: float = 1e-2,
) -> tuple[float, float]:
    """(accuracy, baseline) of a probe trained on one set and scored on another: the
    protocol under which LEACE's guarantee speaks (a linear classifier *learned from the
    erased data* does no better than a constant one). The baseline is the test-set share of
    the training set's majority class, what the best constant predictor scores there."""
    n_classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    mu = x_train.mean(0)
    sd = x_train.std(0).clamp(min=1e-8)
    w, b = _logistic((x_train - mu) / sd, y_train, n_classes, l2)
    predicted = (((x_test - mu) / sd) @ w + b).argmax(1)
    majority = int(torch.bincount(y_train, minlength=n_classes).argmax())
    return float((predicted == y_test).double().mean()), float((y_test == majority).double().mean())


def whitening(sigma: torch.Tensor, rtol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(Sigma^{-1/2}, Sigma^{1/2}) on Sigma's range: eigenvalues below ``rtol`` times the
    largest count as zero, so the first is the pseudo-inverse of the second."""
    evals, evecs = torch.linalg.eigh(sigma)
    keep = evals > evals.max() * rtol
    v, e = evecs[:, keep], evals[keep]
    return v @ torch.diag(e.rsqrt()) @ v.T, v @ torch.diag(e.sqrt()) @ v.T


def leace(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    shrinkage: float = 0.0,
    sigma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LEACE (Belrose et al., 2023, "LEACE: Perfect linear concept erasure in closed
    form", Theorem 4.3): r(x) = x - P (x - mu) with the oblique projection
    P = W^+ Proj(W Sigma_xz) W, W = Sigma^{-1/2} the whitening map and Sigma_xz the
    cross-covariance of x with the one-hot label. Returns (P, mu).

    After erasure the cross-covariance with z is zero, so the class-conditional means are
    equal and no linear classifier beats a constant one (their Theorem 3.1). Any invertible
    W gives that guarantee; W = Sigma^{-1/2} makes the edit the least-squares one. With
    fewer examples than dimensions Sigma is singular: ``shrinkage`` mixes in a multiple of
    the identity, Sigma + s * tr(Sigma)/d * I, trading least-squares optimality for a
    better conditioned eraser (s -> inf gives the orthogonal projection off the class-mean
    differences). ``sigma``: whiten with this covariance instead of x's (e.g. of token
    states on generic text: the eraser is then the least-squares one on that text, the
    text whose predictions the edit must preserve); the guarantee is unchanged.
    """
    x = x.double()
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    z = nn.functional.one_hot(y, n_classes).double()
    zc = z - z.mean(0)
    sigma = xc.T @ xc / n if sigma is None else sigma.double()
    sigma_xz = xc.T @ zc / n  # [d, k]
    if shrinkage > 0:
        sigma = sigma + shrinkage * sigma.trace() / d * torch.eye(d, dtype=sigma.dtype)
    w, w_pinv = whitening(sigma, 1e-10)
    a = w @ sigma_xz
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    u = u[:, s > s.max() * 1e-10] if float(s.max()) > 0 else u[:, :0]
    proj = u @ u.T
    return w_pinv @ proj @ w, mu
