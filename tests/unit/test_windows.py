"""Token windows exactly as PROTOCOL.md fixes them."""

from __future__ import annotations

import pytest
import torch

from framework.data import WindowSpec, build_windows, make_windows, tokenize
from framework.errors import SculptError


def test_random_offsets_follow_protocol() -> None:
    """128 windows of 512 tokens; starts = randint(0, N-512+1, (128,)) under
    Generator().manual_seed(0). ids = arange(N) makes each window reveal its start."""
    n = 50_000
    ids = torch.arange(n)
    spec = WindowSpec(source="", windows=128, seq_len=512, sampling="random", seed=0)
    windows = make_windows(ids, spec, "data.calibration")
    expected = torch.randint(0, n - 512 + 1, (128,), generator=torch.Generator().manual_seed(0))
    assert windows.shape == (128, 512)
    assert torch.equal(windows[:, 0], expected)
    assert torch.equal(windows, expected[:, None] + torch.arange(512)[None, :])


def test_random_offsets_depend_on_seed() -> None:
    ids = torch.arange(10_000)
    a = make_windows(ids, WindowSpec("", 16, 64, "random", seed=0), "k")
    b = make_windows(ids, WindowSpec("", 16, 64, "random", seed=1), "k")
    assert not torch.equal(a, b)
    assert torch.equal(a, make_windows(ids, WindowSpec("", 16, 64, "random", seed=0), "k"))


def test_random_window_may_end_exactly_at_the_text_end() -> None:
    ids = torch.arange(100)
    windows = make_windows(ids, WindowSpec("", 4, 100, "random"), "k")
    assert torch.equal(windows, ids.expand(4, 100))  # only offset 0 exists


def test_sequential_windows_are_the_first_non_overlapping() -> None:
    ids = torch.arange(10_000)
    windows = make_windows(ids, WindowSpec("", 40, 128, "sequential"), "data.evaluation")
    assert windows.shape == (40, 128)
    assert torch.equal(windows.reshape(-1), ids[: 40 * 128])
    starts = windows[:, 0]
    assert torch.equal(starts, torch.arange(40) * 128)
    assert torch.unique(windows).numel() == windows.numel()  # no token used twice


def test_sequential_too_short_names_the_key() -> None:
    ids = torch.arange(1000)
    with pytest.raises(SculptError, match=r"^data\.evaluation: the text has 1,000 tokens"):
        make_windows(ids, WindowSpec("", 8, 128, "sequential"), "data.evaluation")
    assert make_windows(ids, WindowSpec("", 7, 128, "sequential"), "k").shape == (7, 128)


def test_random_too_short_names_the_key() -> None:
    with pytest.raises(SculptError, match=r"^data\.calibration: .*fewer than seq_len=512"):
        make_windows(torch.arange(511), WindowSpec("", 1, 512, "random"), "data.calibration")


def test_bad_sampling_and_sizes_name_the_key() -> None:
    ids = torch.arange(1000)
    with pytest.raises(SculptError, match=r"^data\.calibration\.sampling: 'shuffled'"):
        make_windows(ids, WindowSpec("", 2, 8, "shuffled"), "data.calibration")
    with pytest.raises(SculptError, match=r"^data\.calibration: windows must be >= 1"):
        make_windows(ids, WindowSpec("", 0, 8, "random"), "data.calibration")


def test_seq_len_over_max_positions_names_the_key(tiny) -> None:
    spec = WindowSpec(source="x" * 5000, windows=1, seq_len=1024, sampling="sequential")
    with pytest.raises(SculptError, match=r"^data\.evaluation\.seq_len: 1024 exceeds .* 512"):
        build_windows(tiny.tokenizer, spec, "data.evaluation", max_positions=512)
    ok = WindowSpec(source="x" * 5000, windows=1, seq_len=512, sampling="sequential")
    assert build_windows(tiny.tokenizer, ok, "data.evaluation", max_positions=512).shape == (1, 512)


def test_build_windows_tokenizes_without_special_tokens(tiny, kjv_text: str) -> None:
    text = kjv_text[:3000]
    calls = []

    def source() -> str:
        calls.append(1)
        return text

    spec = WindowSpec(source=source, windows=2, seq_len=100, sampling="sequential")
    windows = build_windows(tiny.tokenizer, spec, "data.evaluation", max_positions=512)
    ids = tokenize(tiny.tokenizer, text)
    assert calls == [1]
    assert ids.dtype == torch.long
    assert ids.numel() == len(text.encode("utf-8"))  # byte tokenizer: no </s> appended
    assert torch.equal(windows.reshape(-1), ids[:200])
    assert tiny.tokenizer.decode(windows[0]) == text[:100]
