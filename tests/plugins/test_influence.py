"""TracIn-style influence on the tiny Llama: a passage identical to the query ranks first,
the weights (and their requires_grad flags, and .grad) come back untouched, the reported
ranks of the marked passages are right, the CountSketch projection keeps inner products,
and a bad config names its key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.errors import ConfigError
from plugins.analyzers.influence import CountSketch, Influence, _auc, load_corpus

PROMPT = "The quick brown fox jumps over the"
COMPLETION = " lazy dog"
OTHERS = [
    "Bread rises because yeast feeds on sugar.",
    "The river flows north to the sea.",
    "Seven is a prime number.",
    "She paid for the groceries with cash.",
    "The teacher asked the class to write a poem.",
    "Thunder follows lightning.",
    "A kilometre is a thousand metres.",
]


def _corpus(tmp_path: Path, texts: list[str], relevant: set[int] = frozenset()) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": t, "relevant": i in relevant} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_the_query_itself_ranks_first_and_weights_are_untouched(
    tiny, ctx, tmp_path, similarity
) -> None:
    model = tiny.model.eval()
    texts = [*OTHERS[:3], PROMPT + COMPLETION, *OTHERS[3:]]
    corpus = _corpus(tmp_path, texts, relevant={3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():  # as the runner calls an analyzer (no needs_gradients)
        result = Influence(
            prompt=PROMPT,
            completion=COMPLETION,
            corpus=str(corpus),
            layers=[0, 1],
            modules=["q", "v", "mlp_out"],
            similarity=similarity,
            top_k=3,
        ).analyze(model, ctx)
    table = result.tables["influence"]
    assert table[0]["index"] == 3 and table[0]["relevant"] is True
    assert [r["rank"] for r in table] == [1, 2, 3]
    assert result.metrics["relevant_mean_rank"] == 1.0
    assert result.metrics["recall_at_3"] == 1.0
    assert result.metrics["auc"] == 1.0
    assert result.metrics["lexical_mean_rank"] == 1.0  # word overlap 1 with itself
    assert result.metrics["random_mean_rank"] == (len(texts) + 1) / 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name, param in model.named_parameters():
        assert param.requires_grad == flags[name], name
        assert param.grad is None, name
    saved = json.loads(Path(result.artifacts["influence"]).read_text())
    assert saved["relevant_ranks"] == [1]
    assert len(saved["ranking"]) == len(texts)


def test_scores_are_gradient_cosines(tiny, ctx, tmp_path) -> None:
    """The score of a passage is the cosine between two gradients computed here by hand."""
    model = tiny.model.eval()
    corpus = _corpus(tmp_path, OTHERS[:3])
    result = Influence(
        prompt=PROMPT, completion=COMPLETION, corpus=str(corpus), layers=[1], top_k=3
    ).analyze(model, ctx)
    weight = model.model.layers[1].mlp.down_proj.weight
    tok = tiny.tokenizer

    def grad(text: str, first: int) -> torch.Tensor:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        labels = ids.clone()
        labels[:, :first] = -100
        weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=labels).loss
                return torch.autograd.grad(loss, [weight])[0].flatten().double()
        finally:
            weight.requires_grad_(False)

    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    q = grad(PROMPT + COMPLETION, n_prompt)
    for row in result.tables["influence"]:
        g = grad(OTHERS[row["index"]], 1)
        assert row["score"] == pytest.approx(float(q @ g / (q.norm() * g.norm())), abs=1e-5)


def test_projection_keeps_the_ranking(tiny, ctx, tmp_path) -> None:
    corpus = _corpus(tmp_path, [*OTHERS, PROMPT + COMPLETION])
    kwargs = dict(prompt=PROMPT, completion=COMPLETION, corpus=str(corpus), top_k=8)
    exact = Influence(**kwargs).analyze(tiny.model.eval(), ctx)
    sketched = Influence(projection=4096, **kwargs).analyze(tiny.model.eval(), ctx)
    assert sketched.tables["influence"][0]["index"] == exact.tables["influence"][0]["index"]
    a = torch.tensor([r["score"] for r in sorted(exact.tables["influence"], key=_index)])
    b = torch.tensor([r["score"] for r in sorted(sketched.tables["influence"], key=_index)])
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9


def _index(row: dict) -> int:
    return row["index"]


def test_count_sketch_is_an_unbiased_inner_product() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=gen)
    y = 0.6 * x + 0.8 * torch.randn(20_000, generator=gen)
    estimates = []
    for seed in range(20):
        s = CountSketch(20_000, 512, seed)
        estimates.append(float(s(x) @ s(y)))
    exact = float(x.double() @ y.double())
    assert sum(estimates) / len(estimates) == pytest.approx(exact, rel=0.05)


def test_auc_and_text_corpora(tmp_path) -> None:
    assert _auc([1, 2], 10) == 1.0
    assert _auc([9, 10], 10) == 0.0
    assert _auc([1, 10], 10) == 0.5
    text = tmp_path / "c.txt"
    text.write_text("first passage\nstill first\n\nsecond one\n\n\nthird\n")
    assert [r["text"] for r in load_corpus(text)] == [
        "first passage\nstill first",
        "second one",
        "third",
    ]


def test_bad_configs_name_their_key(tiny, ctx, tmp_path) -> None:
    for kwargs, key in (
        ({"modules": ["mlp"]}, "modules"),
        ({"modules": []}, "modules"),
        ({"similarity": "l2"}, "similarity"),
        ({"projection": 0}, "projection"),
        ({"completion": ""}, "completion"),
        ({"layers": []}, "layers"),
        ({"top_k": 0}, "top_k"),
    ):
        with pytest.raises(ConfigError) as info:
            Influence(**kwargs)
        assert info.value.argument == key
    corpus = _corpus(tmp_path, OTHERS)
    with pytest.raises(ConfigError) as info:
        Influence(corpus=str(corpus), layers=[5]).analyze(tiny.model, ctx)
    assert info.value.argument == "layers"
