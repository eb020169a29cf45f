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


# ----------------------------------------------------------------------------------------
# Tokenizing in pieces gives the ids of one encoding of the whole text
# ----------------------------------------------------------------------------------------


def _whole(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from framework.models import load_packaged

    return load_packaged("smollm2-135m-instruct").tokenizer


@pytest.mark.parametrize("source", ["shakespeare", "kjv"])
def test_pieces_encode_like_the_whole_text(smollm2_tokenizer, monkeypatch, source) -> None:
    """Small pieces (many cuts) over 200 K characters of each packaged text: the ids are
    those of the whole text encoded at once, with SmolLM2's byte-level BPE and with the
    tiny model's byte tokenizer."""
    from framework.data import sources
    from framework.data import windows as windows_module
    from framework.models import build_tiny_llama

    text = getattr(sources, source)()[:200_000]
    monkeypatch.setattr(windows_module, "PIECE_CHARS", 4096)
    for tokenizer in (smollm2_tokenizer, build_tiny_llama().tokenizer):
        assert len(windows_module._cuts(tokenizer, text)) > 20  # it really was cut
        assert tokenize(tokenizer, text).tolist() == _whole(tokenizer, text)


def test_a_tokenizer_that_marks_every_text_start_is_not_cut(monkeypatch) -> None:
    """A SentencePiece-style tokenizer prefixes the first word of every text it encodes, so
    no cut passes the check and the text is encoded whole (a real `tokenizers` BPE trained
    here on the text, with a Metaspace pre-tokenizer that always prepends)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from framework.data import sources
    from framework.data import windows as windows_module

    text = sources.shakespeare()[:60_000]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    raw.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    monkeypatch.setattr(windows_module, "PIECE_CHARS", 4096)
    assert windows_module._cuts(tokenizer, text) == []
    assert tokenize(tokenizer, text).tolist() == _whole(tokenizer, text)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shakespeare", "kjv"])
def test_the_whole_packaged_texts_encode_as_one_piece_would(smollm2_tokenizer, source) -> None:
    """The protocol's texts in full, default pieces, SmolLM2's tokenizer."""
    from framework.data import sources

    text = getattr(sources, source)()
    assert tokenize(smollm2_tokenizer, text).tolist() == _whole(smollm2_tokenizer, text)


def test_skip_tokens_draws_past_the_skipped_span() -> None:
    """Windows with skip_tokens are those of the text without its first skip_tokens tokens:
    a token id used only in the skipped head never shows up, and the seed draws the same
    offsets as on the cut text."""
    ids = torch.cat([torch.full((1000,), 7), torch.arange(100, 2100)])
    spec = WindowSpec(source="", windows=64, seq_len=32, sampling="random", seed=3)
    skipped = make_windows(ids, WindowSpec("", 64, 32, "random", 3, skip_tokens=1000), "k")
    assert not (skipped == 7).any()
    assert torch.equal(skipped, make_windows(ids[1000:], spec, "k"))
    assert (make_windows(ids, spec, "k") == 7).any()  # without the skip the head is drawn
    first = make_windows(ids, WindowSpec("", 2, 32, "sequential", skip_tokens=1000), "k")
    assert torch.equal(first.flatten(), torch.arange(100, 164))


def test_skip_tokens_errors_name_the_key() -> None:
    ids = torch.arange(100)
    with pytest.raises(SculptError, match=r"data\.training\.skip_tokens: 100 skips the whole"):
        make_windows(ids, WindowSpec("", 1, 8, "random", skip_tokens=100), "data.training")
    with pytest.raises(SculptError, match=r"data\.training\.skip_tokens: -1 is negative"):
        make_windows(ids, WindowSpec("", 1, 8, "random", skip_tokens=-1), "data.training")
    with pytest.raises(SculptError, match=r"data\.training: the text has 20 tokens"):
        make_windows(ids, WindowSpec("", 1, 32, "random", skip_tokens=80), "data.training")
