"""Which training-like texts push the model towards a given completion? TracIn-style data
influence (Pruthi et al., 2020, "Estimating Training Data Influence by Tracing Gradient
Descent") at the one checkpoint we have.

For a query (prompt + completion) and every passage of a corpus, the gradient of the
language-modelling loss with respect to a chosen subset of the weights (the projections
named by ``modules`` in the blocks named by ``layers``) is taken; a passage's influence is
the dot product of its gradient with the query's (TracIn-CP with one checkpoint and a unit
learning rate: how much one SGD step on the passage would lower the query's loss, to first
order), or their cosine (the same, blind to gradient norms, which otherwise favour short or
badly predicted passages). The query's loss covers its completion tokens only; a passage's
covers all its tokens (the mean next-token cross-entropy).

Gradients are taken one passage at a time with ``torch.autograd.grad`` under a local
``torch.enable_grad()``: ``requires_grad`` is switched on for the chosen weights only while
the stage runs and ``.grad`` is never written, so the weights and their flags come back
exactly as they were. Memory holds two gradients at once (the query's and the current
passage's); ``projection`` instead keeps a CountSketch of every gradient (each weight added
with a random sign into one of ``projection`` buckets: an unbiased estimate of every inner
product, Charikar et al., 2002), so the corpus' gradients stay [passages, projection].

Corpus: a JSON-lines file of {"text": ...} (other keys kept; a boolean key named by
``relevant_key`` marks the passages expected to rank high, and the stage then reports their
ranks against a random ranking and against a model-free baseline, the Jaccard overlap of
lower-cased word sets with the query), or a plain text file split into passages at blank
lines.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge
from torch import nn

from framework.concepts import resolve_path
from framework.errors import ConfigError, SculptError
from framework.interventions import check_supported
from framework.io import atomic_write_json, atomic_write_text
from framework.models.arch import blocks
from framework.plugins import Analyzer, Context, StageResult

ROLES = ("q", "k", "v", "o", "mlp_in", "mlp_out")
Similarity = Literal["cosine", "dot"]


def load_corpus(path: str | Path, key: str = "corpus") -> list[dict[str, Any]]:
    """Rows with a "text" key: JSON lines (.jsonl) or a text file split at blank lines."""
    file = resolve_path(path, key)
    text = file.read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = []
    if file.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not str(row["text"]).strip():
                    raise KeyError("text")
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SculptError(f'{key}: {file}:{n}: expected {{"text": "..."}} ({exc})') from exc
            rows.append(row)
    else:
        rows = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not rows:
        raise SculptError(f"{key}: {file} holds no passage")
    return rows


def chosen_weights(
    model: nn.Module, arch: Any, layers: list[int] | None, modules: list[str]
) -> dict[str, nn.Parameter]:
    """name -> weight of the projections named by role in the chosen blocks."""
    all_blocks = blocks(model, arch)
    n = len(all_blocks)
    picked = list(range(n)) if layers is None else list(layers)
    bad = [i for i in picked if not -n <= i < n]
    if bad:
        raise ConfigError("layers", f"{bad} do not exist (model has {n} blocks)")
    names = {
        "q": [arch.q],
        "k": [arch.k],
        "v": [arch.v],
        "o": [arch.o],
        "mlp_in": list(arch.mlp_in),
        "mlp_out": [arch.mlp_out],
    }
    out: dict[str, nn.Parameter] = {}
    for i in sorted({i % n for i in picked}):
        for role in modules:
            for rel in names[role]:
                out[f"{arch.blocks}.{i}.{rel}.weight"] = all_blocks[i].get_submodule(rel).weight
    return out


class CountSketch:
    """A seeded random projection of a flat gradient to ``dim`` numbers: weight j goes,
    times a random sign, into bucket h(j). E[<Sx, Sy>] = <x, y>."""

    def __init__(self, size: int, dim: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.bucket = torch.randint(0, dim, (size,), generator=gen)
        self.sign = torch.randint(0, 2, (size,), generator=gen).to(torch.float32) * 2 - 1

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.dim, dtype=torch.float64)
        return out.index_add_(0, self.bucket, (flat * self.sign).double())


class Influence(Analyzer):
    """Rank a corpus' passages by TracIn-style gradient similarity to a query.

    Args:
        prompt: the query's prompt.
        completion: the query's completion (its loss is taken on these tokens only).
        corpus: JSON-lines of {"text"} or a text file of blank-line separated passages
            (relative paths: to the repository too).
        layers: blocks whose projections are differentiated; null: every block.
        modules: projection roles: q, k, v, o, mlp_in (gate + up), mlp_out (down).
        similarity: cosine or dot (TracIn's plain inner product).
        projection: CountSketch dimension for the gradients; null: exact inner products.
        max_tokens: passages are cut to this many tokens.
        top_k: rows of the ranking table.
        relevant_key: a boolean key of the corpus rows marking the passages expected to rank
            high (their ranks, recall@k and mean rank against chance are reported); null:
            none.
    """

    def __init__(
        self,
        prompt: str = "The Eiffel Tower is located in the city of",
        completion: str = " Paris",
        corpus: str = "experiments/data/influence_corpus.jsonl",
        layers: list[int] | None = None,
        modules: list[str] | None = None,
        similarity: Similarity = "cosine",
        projection: Annotated[int, Ge(1)] | None = None,
        max_tokens: Annotated[int, Ge(2)] = 128,
        top_k: Annotated[int, Ge(1)] = 10,
        relevant_key: str | None = "relevant",
    ):
        if not prompt:
            raise ConfigError("prompt", "must not be empty")
        if not completion:
            raise ConfigError("completion", "must not be empty")
        modules = ["mlp_out"] if modules is None else list(modules)
        bad = [m for m in modules if m not in ROLES]
        if bad or not modules:
            raise ConfigError("modules", f"{bad or modules} not a non-empty subset of {ROLES}")
        if layers is not None and not layers:
            raise ConfigError("layers", "must list at least one block, or be null (all)")
        self.prompt = prompt
        self.completion = completion
        self.corpus = corpus
        self.layers = None if layers is None else list(layers)
        self.modules = modules
        self.similarity = similarity
        self.projection = projection
        self.max_tokens = max_tokens
        self.top_k = top_k
        self.relevant_key = relevant_key

    def _ids(self, tokenizer: Any, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _grad(
        self, model: nn.Module, params: list[nn.Parameter], ids: list[int], first: int
    ) -> torch.Tensor:
        """Flat gradient of the mean next-token loss over the tokens from ``first`` on."""
        x = torch.tensor([ids])
        labels = x.clone()
        labels[:, :first] = -100  # ignored by the loss
        with torch.enable_grad():
            loss = model(input_ids=x, labels=labels, use_cache=False).loss
            grads = torch.autograd.grad(loss, params)
        return torch.cat([g.reshape(-1) for g in grads]).float()

    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "influence")
        started = time.perf_counter()
        rows = load_corpus(self.corpus, "corpus")
        weights = chosen_weights(model, ctx.arch, self.layers, self.modules)
        params = list(weights.values())
        tok = ctx.tokenizer
        prompt_ids = self._ids(tok, self.prompt)
        completion_ids = self._ids(tok, self.completion)
        if not prompt_ids:
            raise ConfigError("prompt", "has no tokens")
        size = sum(p.numel() for p in params)
        sketch = (
            CountSketch(size, self.projection, ctx.seed * 1_000_003 + 17)
            if self.projection
            else None
        )
        flags = [p.requires_grad for p in params]
        was_training = model.training
        model.eval()
        try:
            for p in params:
                p.requires_grad_(True)
            query = self._grad(model, params, prompt_ids + completion_ids, len(prompt_ids))
            q = sketch(query) if sketch else query.double()
            scores: list[float] = []
            for row in ctx.track(rows, "influence"):
                ids = self._ids(tok, str(row["text"]))[: self.max_tokens]
                if len(ids) < 2:
                    scores.append(0.0)
                    continue
                g = self._grad(model, params, ids, 1)
                v = sketch(g) if sketch else g.double()
                dot = float(q @ v)
                if self.similarity == "cosine":
                    dot /= max(float(q.norm() * v.norm()), 1e-30)
                scores.append(dot)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            model.train(was_training)
        return self._result(ctx, rows, scores, size, time.perf_counter() - started)

    def _result(
        self,
        ctx: Context,
        rows: list[dict[str, Any]],
        scores: list[float],
        size: int,
        seconds: float,
    ) -> StageResult:
        order = sorted(range(len(rows)), key=lambda i: (-scores[i], i))
        rank = {i: r + 1 for r, i in enumerate(order)}
        n = len(rows)
        key = self.relevant_key
        table = [
            {
                "rank": r + 1,
                "index": i,
                "score": round(scores[i], 6),
                **({"relevant": bool(rows[i].get(key, False))} if key else {}),
                "passage": _excerpt(str(rows[i]["text"])),
            }
            for r, i in enumerate(order[: self.top_k])
        ]
        metrics: dict[str, float] = {
            "passages": float(n),
            "weights": float(size),
            "top_score": scores[order[0]],
            "gradient_seconds": seconds,
        }
        relevant = [i for i in range(n) if key and bool(rows[i].get(key, False))]
        ranks = sorted(rank[i] for i in relevant)
        lex: list[int] = []
        if relevant:
            m = len(relevant)
            k = self.top_k
            # Under a random ranking a relevant passage's expected rank is (n + 1) / 2 and
            # the expected share of them in the top k is k / n.
            metrics.update(
                {
                    "relevant": float(m),
                    "relevant_mean_rank": sum(ranks) / m,
                    "relevant_best_rank": float(ranks[0]),
                    "relevant_worst_rank": float(ranks[-1]),
                    "random_mean_rank": (n + 1) / 2,
                    f"recall_at_{k}": sum(r <= k for r in ranks) / m,
                    f"random_recall_at_{k}": min(k, n) / n,
                }
            )
            if len(relevant) < n:
                # AUC: the chance a relevant passage outranks an irrelevant one (0.5: chance).
                metrics["auc"] = _auc(ranks, n)
            # A model-free baseline on the same corpus: word overlap with the query.
            query = _words(self.prompt + self.completion)
            overlap = [_jaccard(query, _words(str(r["text"]))) for r in rows]
            lex_order = sorted(range(n), key=lambda i: (-overlap[i], i))
            lex_rank = {i: r + 1 for r, i in enumerate(lex_order)}
            lex = sorted(lex_rank[i] for i in relevant)
            metrics["lexical_mean_rank"] = sum(lex) / m
            metrics[f"lexical_recall_at_{k}"] = sum(r <= k for r in lex) / m
        folder = ctx.stage_dir(ctx.stage_name or "influence")
        ranking = [{"rank": rank[i], "index": i, "score": scores[i], **rows[i]} for i in order]
        json_path = atomic_write_json(
            folder / "influence.json",
            {
                "prompt": self.prompt,
                "completion": self.completion,
                "corpus": str(self.corpus),
                "similarity": self.similarity,
                "modules": self.modules,
                "layers": self.layers,
                "projection": self.projection,
                "relevant_ranks": ranks,
                "lexical_relevant_ranks": lex,
                "ranking": ranking,
            },
        )
        md = [
            f"# Influence on {self.prompt!r} -> {self.completion!r}",
            "",
            f"relevant ranks: {ranks} of {n}" if relevant else f"{n} passages",
            "",
            "| rank | score | passage |",
            "|---:|---:|---|",
            *(
                f"| {r['rank']} | {r['score']:.4g} | {r['passage'].replace('|', '/')} |"
                for r in table
            ),
        ]
        md_path = atomic_write_text(folder / "influence.md", "\n".join(md) + "\n")
        return StageResult(
            metrics=metrics,
            artifacts={"influence": json_path, "influence_md": md_path},
            tables={"influence": table},
        )


def _auc(ranks: list[int], n: int) -> float:
    m = len(ranks)
    if m == 0 or m == n:
        return float("nan")
    # Irrelevant passages ranked below each relevant one, over all (relevant, irrelevant) pairs.
    below = sum((n - r) - (m - 1 - j) for j, r in enumerate(ranks))
    return below / (m * (n - m))


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(len(a | b), 1)


def _excerpt(text: str, width: int = 120) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
