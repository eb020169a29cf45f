"""Linear probes, linear CKA and LEACE: the properties they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.concepts import (
    class_signal_left,
    control_labels,
    leace,
    load_labelled,
    probe_accuracy,
    stratified_split,
)
from framework.errors import SculptError
from plugins.analyzers.cka import linear_cka


def _blobs(n: int = 300, d: int = 12, shift: float = 4.0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
    x[:, 3] += shift * y  # the concept along a direction the mixing correlates with others
    return x, y


def test_cka_self_is_one_and_invariant_to_orthogonal_maps_and_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    assert linear_cka(x, y) < 0.2  # independent noise is far from 1
    # not invariant to an arbitrary invertible map (what separates CKA from CCA)
    skew = torch.diag(torch.logspace(0, 3, 16, dtype=torch.float64))
    assert linear_cka(x, x @ skew) < 0.9


def test_probe_finds_a_concept_and_not_noise() -> None:
    x, y = _blobs()
    acc, base = probe_accuracy(x, y)
    assert base == pytest.approx(0.5, abs=0.02)
    assert acc > 0.75
    gen = torch.Generator().manual_seed(1)
    acc_noise, _ = probe_accuracy(torch.randn(300, 12, generator=gen, dtype=torch.float64), y)
    assert abs(acc_noise - 0.5) < 0.1


def test_leace_equalises_class_means_and_kills_the_probe() -> None:
    x, y = _blobs()
    proj, mu = leace(x, y, 2)
    erased = x - (x - mu) @ proj.T
    m0, m1 = erased[y == 0].mean(0), erased[y == 1].mean(0)
    assert float((m0 - m1).norm()) < 1e-9 * float(x.norm())
    acc, base = probe_accuracy(erased, y)
    assert acc - base <= 0.05
    # rank-one for a binary concept, and a projection: P @ P == P
    assert int(torch.linalg.matrix_rank(proj)) == 1
    torch.testing.assert_close(proj @ proj, proj)
    # the bias-free linear part alone keeps the means equal too (what the editor folds)
    lin = x @ (torch.eye(12, dtype=torch.float64) - proj).T
    assert float((lin[y == 0].mean(0) - lin[y == 1].mean(0)).norm()) < 1e-9 * float(x.norm())


def test_leace_is_the_least_change_among_erasers() -> None:
    # LEACE minimises E||r(x) - x||^2 among erasers; the orthogonal projection off the
    # mean difference (the shrinkage -> inf limit) also erases but moves x more.
    x, y = _blobs()
    proj, mu = leace(x, y, 2)
    ortho, _ = leace(x, y, 2, shrinkage=1e9)
    cost = float(((x - mu) @ proj.T).pow(2).sum())
    cost_ortho = float(((x - mu) @ ortho.T).pow(2).sum())
    assert cost < cost_ortho
    e2 = x - (x - mu) @ ortho.T
    assert float((e2[y == 0].mean(0) - e2[y == 1].mean(0)).norm()) < 1e-6 * float(x.norm())


def test_stratified_split_is_disjoint_and_balanced() -> None:
    y = torch.tensor([0] * 50 + [1] * 30)
    a, b = stratified_split(y, 0.5, seed=0)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(a) + len(b) == 80
    assert int((y[a] == 0).sum()) == 25 and int((y[a] == 1).sum()) == 15
    assert torch.equal(a, stratified_split(y, 0.5, seed=0)[0])


def test_labelled_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(SculptError, match=r"data: nope\.jsonl does not exist"):
        load_labelled("nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b", "label": "x"}\n{"txt": "oops"}\n')
    with pytest.raises(SculptError, match=r"bad\.jsonl:2"):
        load_labelled(bad)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"text": f"t {i}", "label": "x"}) + "\n" for i in range(9)))
    with pytest.raises(SculptError, match="two labels"):
        load_labelled(one)


@pytest.mark.parametrize(
    ("name", "classes", "groups"),
    [
        ("concept_animals_tools", ["animal", "tool"], 91),  # 46 animals, 45 tools
        ("concept_gender", ["female", "male"], 159),  # 79 female, 80 male words
    ],
)
def test_shipped_concept_file(name: str, classes: list[str], groups: int) -> None:
    data = load_labelled(f"experiments/data/{name}.jsonl")
    assert data.classes == classes
    assert torch.bincount(data.labels).tolist() == [400, 400]
    assert len(set(data.texts)) == 800
    assert data.groups is not None and len(data.groups.unique()) == groups
    for g in data.groups.unique():  # a word is one class
        assert len(data.labels[data.groups == g].unique()) == 1


def test_gender_file_is_what_its_script_writes(tmp_path: Path) -> None:
    """The shipped file is reproducible from experiments/data/make_concept_gender.py."""
    script = Path("experiments/data/make_concept_gender.py")
    copy = tmp_path / script.name
    copy.write_text(script.read_text())
    subprocess.run([sys.executable, str(copy)], check=True, capture_output=True)
    shipped = Path("experiments/data/concept_gender.jsonl").read_text()
    assert (tmp_path / "concept_gender.jsonl").read_text() == shipped


def _clusters(groups: int = 40, per: int = 10, d: int = 64, concept: float = 0.0, seed: int = 0):
    """Tight clusters (one per group) at random centres; ``concept`` > 0 also shifts one
    class's clusters along a shared direction, so the label is readable from a new group."""
    gen = torch.Generator().manual_seed(seed)
    group = torch.arange(groups).repeat_interleave(per)
    label_of = torch.arange(groups) % 2
    centres = torch.randn(groups, d, generator=gen, dtype=torch.float64)
    centres[:, 0] += concept * label_of
    x = centres[group] + 0.2 * torch.randn(groups * per, d, generator=gen, dtype=torch.float64)
    return x, label_of[group], group


def test_grouped_folds_stop_a_probe_from_memorising_groups() -> None:
    # No shared concept: each group's label is arbitrary. A plain probe still scores high
    # (it memorises 40 clusters in 64 dimensions); on unseen groups it is at chance.
    x, y, g = _clusters()
    plain, base = probe_accuracy(x, y)
    unseen, _ = probe_accuracy(x, y, groups=g)
    assert base == 0.5
    assert plain > 0.9
    assert abs(unseen - 0.5) < 0.15
    # A concept shared by the groups is read from unseen groups too (given more groups than
    # dimensions, so that memorising them is no longer the easier fit).
    x, y, g = _clusters(groups=200, per=4, concept=6.0)
    unseen, _ = probe_accuracy(x, y, groups=g)
    assert unseen > 0.9


def test_control_task_labels_groups_at_random_with_the_real_balance() -> None:
    x, y, g = _clusters(concept=6.0)
    control = control_labels(y, g, seed=3)
    for group in g.unique():
        assert len(control[g == group].unique()) == 1  # one label per group
    assert torch.bincount(control).tolist() == torch.bincount(y).tolist()
    assert not torch.equal(control, y)
    assert torch.equal(control, control_labels(y, g, seed=3))  # seeded
    # 40 groups in 64 dimensions: the control is memorised as well as the concept is read
    # (selectivity about 0); with 200 groups memorising costs more and the gap opens.
    plain, _ = probe_accuracy(x, y)
    ctrl, _ = probe_accuracy(x, control)
    assert plain > 0.95 and ctrl > 0.95
    x, y, g = _clusters(groups=200, per=4, concept=6.0)
    plain, _ = probe_accuracy(x, y)
    ctrl, _ = probe_accuracy(x, control_labels(y, g, seed=3))
    assert plain - ctrl > 0.2


def test_class_signal_left_reads_the_shared_signal_an_edit_leaves() -> None:
    x, y, g = _clusters(groups=400, per=4, d=16, concept=4.0)

    def scaled(axis: int, by: float) -> torch.Tensor:
        return torch.diag(torch.tensor([by if i == axis else 1.0 for i in range(16)]).double())

    assert class_signal_left(x, x, y, g) == pytest.approx(1.0)  # nothing erased
    # Removing the concept's own direction leaves only the groups' own offsets, which the
    # two halves do not share: little is left (the square root magnifies what noise stays).
    assert class_signal_left(x, x @ scaled(0, 0.0), y, g) < 0.3
    # Halving it leaves half; removing a direction the concept does not use leaves it all.
    assert class_signal_left(x, x @ scaled(0, 0.5), y, g) == pytest.approx(0.5, abs=0.1)
    assert class_signal_left(x, x @ scaled(5, 0.0), y, g) == pytest.approx(1.0, abs=0.05)
    # The same in a given metric (here the states' covariance, the default, passed in).
    assert class_signal_left(x, x @ scaled(0, 0.5), y, g, metric=torch.cov(x.T)) == pytest.approx(
        class_signal_left(x, x @ scaled(0, 0.5), y, g)
    )
    # A class missing from one half: not measurable.
    assert class_signal_left(x[:8], x[:8], torch.tensor([0] * 4 + [1] * 4), g[:8]) is None


def test_split_by_groups_keeps_every_group_on_one_side() -> None:
    _, y, g = _clusters(groups=40, per=5)
    fit, held = stratified_split(y, 0.75, seed=1, groups=g)
    assert len(fit) + len(held) == len(y)
    assert not set(g[fit].tolist()) & set(g[held].tolist())
    for c in (0, 1):  # 3/4 of each class's 20 groups
        assert len(g[fit][y[fit] == c].unique()) == 15
    assert torch.equal(fit, stratified_split(y, 0.75, seed=1, groups=g)[0])
    assert not torch.equal(fit, stratified_split(y, 0.75, seed=2, groups=g)[0])


def test_groups_must_be_on_every_line_or_none(tmp_path) -> None:
    rows = [{"text": f"t {i}", "label": "ab"[i % 2], "group": f"g{i % 4}"} for i in range(12)]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_labelled(good)
    assert data.groups is not None and data.groups.tolist()[:4] == [0, 1, 2, 3]
    del rows[5]["group"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SculptError, match=r'bad\.jsonl:6: "group" must be given on every line'):
        load_labelled(bad)
    with pytest.raises(SculptError, match="4 groups cannot fill 5 grouped folds"):
        probe_accuracy(torch.randn(12, 3, dtype=torch.float64), data.labels, groups=data.groups)
