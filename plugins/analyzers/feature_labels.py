"""Feature labels written by a language model and scored by simulation, after OpenAI's
automated interpretability (Bills et al., 2023, "Language models can explain neurons in
language models").

Features are either the units of a sparse-autoencoder dictionary (a safetensors file with
``encoder.weight`` [F, d], ``encoder.bias`` [F], ``decoder.weight`` [d, F],
``decoder.bias`` [d] and metadata ``layer``, ``site``, ``k``; activations
``topk(relu(W_enc (x - b_dec) + b_enc), k)``) or, without a dictionary, the MLP neurons of
one block: the inputs of its down projection (for Llama ``act(gate(x)) * up(x)``). A
SwiGLU unit is signed, so each neuron is read in the direction of its largest-magnitude
activation on the calibration text (the table reports that sign).

For each selected feature (the top ``features`` by max / mean activation or firing
frequency over the calibration windows, the first position of every window left out: it
is the attention sink):

1. top-activating snippets: token windows around the feature's largest activations, no two
   overlapping, alternately handed to the explanation and to the held-out scoring set
   (the strongest to the explanation); random snippets of the same length join scoring;
2. explanation: the explainer reads the explanation snippets, the max token of each marked
   ``[[like this]]`` and the marked tokens listed once more, and answers a short label
   (greedy decoding; the first line of the answer is kept);
3. simulation: the explainer sees only the label and a held-out snippet and rates every
   token. Local explainer: one forward pass per snippet over a list ``"token": unknown``
   (Bills et al.'s all-at-once layout) whose answer slots read the explainer's
   probability of " yes" against " no" (normalised over the two); the simulated activation
   is P(yes). HTTP explainer: the endpoint writes ``token<TAB>0-10`` lines, parsed in order
   (a missing or unreadable line is 0);
4. score: Pearson correlation between simulated and true activations over every token of
   the held-out snippets pooled (top and random); 0 when either side is constant.

The explainer is the packaged SmolLM2-135M-Instruct by default (the model under analysis is
reused when it is that model with unchanged weights), ``self``, a local HF folder, or any
OpenAI-compatible chat endpoint (``api``). A 135M explainer writes short, often generic
labels and simulates weakly; the scores say how much of each label holds up.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import nn

from framework.dictionary import Dictionary, collect_activations, encode, load_dictionary
from framework.errors import ConfigError, SculptError
from framework.interventions import check_supported, num_layers
from framework.io import atomic_write_json, atomic_write_text
from framework.models.arch import blocks
from framework.plugins import Analyzer, Context, StageResult

RankBy = Literal["max", "mean", "frequency"]
API_KEYS = {"base_url", "model", "api_key_env", "timeout_s"}
MARK = ("[[", "]]")


# ----------------------------------------------------------------------------- features
def read_dictionary(path: str | Path) -> Dictionary:
    """framework.dictionary's reader, its errors pinned on this stage's ``dictionary`` key."""
    try:
        return load_dictionary(Path(path).expanduser())
    except SculptError as exc:
        detail = str(exc).removeprefix("dictionary: ")
        raise ConfigError("dictionary", detail) from exc


class _Stop(Exception):
    """Raised by a hook once the block holding the wanted units has run."""


def _raise_stop(*_: object) -> None:
    raise _Stop


@torch.no_grad()
def neuron_values(model: nn.Module, arch: Any, windows: torch.Tensor, layer: int) -> torch.Tensor:
    """[n, seq, intermediate]: the input of block ``layer``'s down projection (the MLP
    neurons) for every window. The forward pass stops after the block."""
    block = blocks(model, arch)[layer]
    got: list[torch.Tensor] = []
    pre = block.get_submodule(arch.mlp_out).register_forward_pre_hook(
        lambda _m, args: got.append(args[0].detach().float())
    )
    stop = block.register_forward_hook(_raise_stop)
    try:
        for window in windows:
            with contextlib.suppress(_Stop):
                model(input_ids=window[None], use_cache=False, logits_to_keep=1)
    finally:
        pre.remove()
        stop.remove()
    return torch.cat(got)


@dataclass
class Snippet:
    """A token window of one calibration row and the feature's true activations on it."""

    row: int
    start: int  # position of the first token in the row
    tokens: list[str]
    activations: list[float]

    @property
    def peak(self) -> int:
        return max(range(len(self.activations)), key=self.activations.__getitem__)

    def marked(self) -> str:
        """The text with its max-activating token marked."""
        p = self.peak
        parts = [*self.tokens[:p], f"{MARK[0]}{self.tokens[p]}{MARK[1]}", *self.tokens[p + 1 :]]
        return "".join(parts).replace("\n", " ").strip()

    def text(self) -> str:
        return "".join(self.tokens).replace("\n", " ").strip()


def top_positions(
    acts: torch.Tensor, count: int, radius: int, excluded: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """(row, position) of the largest entries of acts [n, seq], position 0 and the
    ``excluded`` ones [n, seq] left out, no two within ``radius`` of each other in one row,
    largest first."""
    masked = acts.clone()
    masked[:, 0] = -math.inf
    if excluded is not None:
        masked[excluded] = -math.inf
    order = masked.flatten().argsort(descending=True)
    seq = acts.shape[1]
    picked: list[tuple[int, int]] = []
    for flat in order.tolist():
        row, pos = divmod(flat, seq)
        if not math.isfinite(float(masked[row, pos])):
            break
        if all(r != row or abs(p - pos) > radius for r, p in picked):
            picked.append((row, pos))
            if len(picked) == count:
                break
    return picked


def pearson(simulated: list[float], true: list[float]) -> float:
    """Correlation of two equally long sequences; 0 when either is constant (the
    simulation carries no ranking then)."""
    if len(simulated) != len(true):
        raise ValueError(f"{len(simulated)} simulated values for {len(true)} tokens")
    a = torch.tensor(simulated, dtype=torch.float64)
    b = torch.tensor(true, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 1e-12 else 0.0


# ---------------------------------------------------------------------------- prompts
def label_messages(snippets: list[Snippet], unit: str) -> list[dict[str, str]]:
    # Listing the marked tokens again helps a small explainer: asked only about the
    # excerpts, SmolLM2-135M tended to echo the instructions back as its "label".
    lines = "\n".join(f"- {s.marked()}" for s in snippets)
    words = ", ".join(_token_text(s.tokens[s.peak].strip()) for s in snippets)
    return [
        {
            "role": "user",
            "content": (
                f"A {unit} inside a language model fires on the words marked with "
                f"{MARK[0]} {MARK[1]} in these excerpts:\n{lines}\n\nThe marked words: "
                f"{words}.\nIn a few words, what kind of words are they, or what do they "
                "have in common?"
            ),
        }
    ]


def simulation_messages(label: str, snippet: Snippet, unit: str, scale: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": (
                f"A {unit} inside a language model fires on: {label}.\n"
                f"Text: {snippet.text()}\n"
                f"For each token of the text, in order, one per line, write the token, then "
                f"{scale}."
            ),
        }
    ]


def clean_label(text: str) -> str:
    """First non-empty line, without quotes, list markers or a trailing full stop."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(label|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip(" \"'`*-.").strip()
    return line[:80] or "(no label)"


def _token_text(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)


# --------------------------------------------------------------------------- explainers
class LocalExplainer:
    """A causal LM run in this process: greedy labels, yes/no simulation."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_label_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_label_tokens = max_label_tokens
        yes, no = self._ids(" yes"), self._ids(" no")
        common = 0
        while common < min(len(yes), len(no)) and yes[common] == no[common]:
            common += 1
        if common == min(len(yes), len(no)):
            raise SculptError("explainer: its tokenizer cannot tell ' yes' from ' no'")
        # Byte-level tokenizers share a leading space: it becomes part of each slot's prompt.
        self.answer_prefix, self.yes, self.no = yes[:common], yes[common], no[common]

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            got = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True
            )
            ids = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
            return [int(i) for i in ids]
        # No chat template (the tiny test model): a plain transcript.
        return self._ids(f"User: {messages[-1]['content']}\nAssistant:")

    @torch.no_grad()
    def explain(self, messages: list[dict[str, str]]) -> str:
        ids = torch.tensor([self._prompt(messages)])
        stops = {self.tokenizer.eos_token_id, *(self._ids("\n")[:1])} - {None}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        new: list[int] = []
        for _ in range(self.max_label_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt in stops and new:
                break
            if nxt not in stops:
                new.append(nxt)
            step = torch.tensor([[nxt]])
            out = self.model(input_ids=step, cache=out.cache, use_cache=True)
        return self.tokenizer.decode(new, skip_special_tokens=True)

    @torch.no_grad()
    def simulate(self, label: str, snippet: Snippet, unit: str) -> list[float]:
        messages = simulation_messages(label, snippet, unit, "yes if it fires on it, else no")
        ids = self._prompt(messages)
        slots: list[int] = []
        for token in snippet.tokens:
            ids += self._ids(f"{_token_text(token)}:") + self.answer_prefix
            slots.append(len(ids) - 1)  # the next token here is the answer
            ids += self._ids(" unknown\n")[len(self.answer_prefix) :]
        out = self.model(
            input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=torch.tensor(slots)
        )
        logits = out.logits[0].float()
        pair = torch.stack([logits[:, self.yes], logits[:, self.no]], dim=-1)
        return pair.softmax(-1)[:, 0].tolist()


class HTTPExplainer:
    """Any OpenAI-compatible chat-completions endpoint, through urllib (temperature 0)."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"] or "")
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise SculptError(f"api.base_url: {self.url} failed: {exc}") from exc
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise SculptError(f"api.base_url: {self.url} sent no chat completion ({exc})") from exc

    def explain(self, messages: list[dict[str, str]]) -> str:
        return self._chat(messages, 32)

    def simulate(self, label: str, snippet: Snippet, unit: str) -> list[float]:
        scale = "a tab, then how strongly it fires on that token from 0 to 10"
        messages = simulation_messages(label, snippet, unit, scale)
        reply = self._chat(messages, 8 * len(snippet.tokens) + 16)
        values = [0.0] * len(snippet.tokens)
        lines = [ln for ln in reply.splitlines() if ln.strip()]
        for i, line in enumerate(lines[: len(values)]):
            found = re.search(r"(\d+(?:\.\d+)?)\s*$", line)
            if found:
                values[i] = min(max(float(found.group(1)), 0.0), 10.0) / 10.0
        return values


@functools.lru_cache(maxsize=1)
def _packaged_explainer(name: str) -> Any:
    # One frozen copy per process: a sweep or a test session labelling twice loads it once.
    from framework.models import load_packaged

    return load_packaged(name)


def _same_packaged_model(model: nn.Module, name: str) -> bool:
    """Is the model under analysis the packaged ``name`` with its weights untouched?"""
    from safetensors import safe_open

    from framework.models.loading import PACKAGED, cache_root, packaged_path

    if name not in PACKAGED:
        return False
    try:
        path = packaged_path(name)
    except SculptError:
        return False
    folder = cache_root() / "gguf" / f"{path.stem}-{path.stat().st_size}"
    if Path(str(getattr(model.config, "_name_or_path", ""))).resolve() != folder.resolve():
        return False
    state = model.state_dict()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - not a dict
                if key not in state or not torch.equal(f.get_tensor(key), state[key]):
                    return False
    return True


# ----------------------------------------------------------------------------- plugin
@dataclass
class FeatureRecord:
    feature: int
    sign: int
    label: str
    score: float
    score_top: float
    score_random: float
    max_activation: float
    mean_activation: float
    frequency: float
    explanation: list[dict[str, Any]] = field(default_factory=list)
    held_out: list[dict[str, Any]] = field(default_factory=list)


class FeatureLabels(Analyzer):
    """Label the top features of a layer with an explainer LLM and score each label by
    simulation (Bills et al., 2023).

    Args:
        dictionary: SAE dictionary (safetensors, see the module docstring); a relative
            path is looked up in the run's output folder first (e.g. ``sae/dictionary.
            safetensors``, written by an earlier ``sae`` stage), then as given; null: the
            MLP neurons of block ``layer``.
        layer: block whose MLP neurons are labelled (ignored with a dictionary, which names
            its own layer and site).
        features: how many features to label (the top ones by ``rank_by``).
        feature_ids: label exactly these features instead.
        rank_by: max, mean (activation) or frequency (share of tokens > 0).
        outlier_factor: positions whose site vector (the residual / MLP-output state an SAE
            reads, or the neuron vector) has a norm above this many times the median are
            left out like the first position: no snippet crosses them (a Llama's residual
            stream has a few "massive activation" tokens whose codes would otherwise top
            every feature); null: only the first position.
        windows: calibration windows read (first ones; position 0 of each is left out).
        context_before: tokens shown before a snippet's centre token.
        context_after: tokens shown after it.
        explain_examples: top snippets shown to the explainer.
        score_top_examples: held-out top snippets simulated.
        score_random_examples: random snippets simulated.
        explainer: local explainer: "self" (the model under analysis), a packaged model
            name, or a local HF folder.
        api: an OpenAI-compatible endpoint used instead of the local explainer:
            {base_url, model, api_key_env (name of the env var holding the key; optional),
            timeout_s}.
        max_label_tokens: tokens a local explainer may write for a label.
    """

    needs_calibration = True

    def __init__(
        self,
        dictionary: str | None = None,
        layer: int = 1,
        features: Annotated[int, Ge(1)] = 8,
        feature_ids: list[int] | None = None,
        rank_by: RankBy = "max",
        outlier_factor: Annotated[float, Gt(1)] | None = 20.0,
        windows: Annotated[int, Ge(1)] = 16,
        context_before: Annotated[int, Ge(0)] = 10,
        context_after: Annotated[int, Ge(0)] = 3,
        explain_examples: Annotated[int, Ge(1)] = 5,
        score_top_examples: Annotated[int, Ge(1)] = 4,
        score_random_examples: Annotated[int, Ge(0)] = 4,
        explainer: str = "smollm2-135m-instruct",
        api: dict[str, Any] | None = None,
        max_label_tokens: Annotated[int, Ge(1)] = 16,
    ):
        if feature_ids is not None and (
            not feature_ids or any(not isinstance(i, int) or i < 0 for i in feature_ids)
        ):
            raise ConfigError("feature_ids", f"{feature_ids} must be non-negative integers")
        if not explainer:
            raise ConfigError("explainer", "must name a model ('self', a packaged name, a folder)")
        if api is not None:
            api = dict(api)
            unknown = sorted(set(api) - API_KEYS)
            if unknown:
                raise ConfigError("api", f"unknown key(s) {unknown}; accepted: {sorted(API_KEYS)}")
            for key in ("base_url", "model"):
                if not isinstance(api.get(key), str) or not api[key]:
                    raise ConfigError(f"api.{key}", "must be set")
            if not str(api["base_url"]).startswith(("http://", "https://")):
                raise ConfigError("api.base_url", f"'{api['base_url']}' is not an http(s) URL")
            timeout = api.get("timeout_s", 60)
            if not isinstance(timeout, int | float) or timeout <= 0:
                raise ConfigError("api.timeout_s", f"{timeout} must be a positive number")
        self.dictionary = dictionary
        self.layer = layer
        self.features = features
        self.feature_ids = list(feature_ids) if feature_ids is not None else None
        self.rank_by = rank_by
        self.outlier_factor = outlier_factor
        self.windows = windows
        self.context_before = context_before
        self.context_after = context_after
        self.explain_examples = explain_examples
        self.score_top_examples = score_top_examples
        self.score_random_examples = score_random_examples
        self.explainer = explainer
        self.api = api
        self.max_label_tokens = max_label_tokens

    # -- explainer ----------------------------------------------------------------
    def make_explainer(self, model: nn.Module, ctx: Context) -> LocalExplainer | HTTPExplainer:
        if self.api is not None:
            env = self.api.get("api_key_env")
            key = None
            if env:
                key = os.environ.get(str(env))
                if not key:
                    raise SculptError(f"api.api_key_env: environment variable {env} is not set")
            return HTTPExplainer(
                self.api["base_url"], self.api["model"], key, float(self.api.get("timeout_s", 60))
            )
        if self.explainer == "self" or _same_packaged_model(model, self.explainer):
            return LocalExplainer(model, ctx.tokenizer, self.max_label_tokens)
        from framework.models.loading import PACKAGED, load_hf

        if self.explainer in PACKAGED:
            loaded = _packaged_explainer(self.explainer)
        else:
            loaded = load_hf(self.explainer)
        return LocalExplainer(loaded.model, loaded.tokenizer, self.max_label_tokens)

    # -- activations --------------------------------------------------------------
    def _activations(
        self, model: nn.Module, ctx: Context
    ) -> tuple[torch.Tensor, torch.Tensor, str, int]:
        """Feature activations [n, seq, F] over the calibration windows, the norm of the
        vector they were read from [n, seq], the unit's name, the layer."""
        windows = ctx.calibration(self.windows)
        n_layers = num_layers(model, ctx.arch)
        if self.dictionary is not None:
            path = Path(self.dictionary).expanduser()
            if not path.is_absolute() and (ctx.output_dir / path).is_file():
                path = ctx.output_dir / path  # written by an earlier stage of this run
            sae = read_dictionary(path)
            if not -n_layers <= sae.layer < n_layers:
                raise ConfigError(
                    "dictionary", f"layer {sae.layer} not in a {n_layers}-block model"
                )
            # Every position kept (the sink is left out later), so rows stay token-aligned.
            x = collect_activations(model, ctx.arch, windows, sae.layer, sae.site, skip_first=False)
            if x.shape[-1] != sae.width:
                raise ConfigError(
                    "dictionary", f"width {sae.width} != the {sae.site} width {x.shape[-1]}"
                )
            acts = torch.cat([encode(sae, chunk) for chunk in x.split(4096)])
            shape = (len(windows), windows.shape[1])
            norms = x.norm(dim=-1).reshape(shape)
            return acts.reshape(*shape, -1), norms, "feature", sae.layer % n_layers
        if not -n_layers <= self.layer < n_layers:
            raise ConfigError("layer", f"{self.layer} does not exist (model has {n_layers} blocks)")
        layer = self.layer % n_layers
        acts = neuron_values(model, ctx.arch, windows, layer)
        return acts, acts.norm(dim=-1), "neuron", layer

    def _select(self, acts: torch.Tensor, signs: torch.Tensor, keep: torch.Tensor) -> list[int]:
        width = acts.shape[-1]
        if self.feature_ids is not None:
            bad = [i for i in self.feature_ids if i >= width]
            if bad:
                raise ConfigError("feature_ids", f"{bad} out of range (there are {width})")
            return list(self.feature_ids)
        flat = acts[keep] * signs  # [kept tokens, F]
        key = {
            "max": flat.max(0).values,
            "mean": flat.mean(0),
            "frequency": (flat > 0).double().mean(0),
        }[self.rank_by]
        alive = flat.max(0).values > 0
        key = torch.where(alive, key.double(), torch.tensor(-math.inf, dtype=torch.float64))
        order = key.argsort(descending=True)[: self.features]
        return [int(i) for i in order if bool(alive[i])]

    def _snippet(
        self,
        tokens: list[list[str]],
        acts: torch.Tensor,
        excluded: torch.Tensor,
        row: int,
        pos: int,
    ) -> Snippet:
        """The window around ``pos``, cut short so that it holds no excluded position."""
        start = max(0, pos - self.context_before)
        end = min(acts.shape[1], pos + self.context_after + 1)
        blocked = excluded[row].nonzero().flatten().tolist()
        start = max([start, *(b + 1 for b in blocked if b < pos)])
        end = min([end, *(b for b in blocked if b > pos)])
        return Snippet(
            row=row,
            start=start,
            tokens=tokens[row][start:end],
            activations=[round(float(v), 6) for v in acts[row, start:end]],
        )

    # -- the stage ----------------------------------------------------------------
    @torch.no_grad()
    def analyze(self, model: nn.Module, ctx: Context) -> StageResult:
        check_supported(ctx.arch, "feature labels")
        t0 = time.perf_counter()
        acts, norms, unit, layer = self._activations(model, ctx)
        windows = ctx.calibration(self.windows)
        n, seq = acts.shape[:2]
        if seq < 2:
            raise SculptError(
                "data.calibration.seq_len: feature labels need windows of >= 2 tokens"
            )
        # The first position (the attention sink) and massive-activation tokens are left
        # out: their codes are huge whatever the feature.
        excluded = torch.zeros(n, seq, dtype=torch.bool)
        excluded[:, 0] = True
        if self.outlier_factor is not None:
            median = float(norms[:, 1:].median())
            excluded |= norms > self.outlier_factor * median
        keep = ~excluded
        n_outliers = int(excluded[:, 1:].sum())
        # A SwiGLU neuron is signed: read it in the direction of its largest magnitude.
        body = acts[keep]
        signs = torch.where(body.max(0).values >= -body.min(0).values, 1.0, -1.0)
        chosen = self._select(acts, signs, keep)
        if not chosen:
            raise SculptError("feature labels: no feature is active on the calibration text")
        tokens = [[ctx.tokenizer.decode([int(t)]) for t in row] for row in windows]
        explainer = self.make_explainer(model, ctx)
        t_collect = time.perf_counter() - t0
        gen = ctx.generator()
        radius = self.context_before + self.context_after
        n_top = self.explain_examples + self.score_top_examples
        records: list[FeatureRecord] = []
        allowed = keep.nonzero()  # [positions, 2]: centres of random snippets
        t_explain = t_simulate = 0.0
        for j in ctx.track(chosen, f"labels ({unit}s of block {layer})"):
            a = acts[..., j] * signs[j]
            peaks = top_positions(a, n_top, radius, excluded)
            top = [self._snippet(tokens, a, excluded, r, p) for r, p in peaks]
            explain, held = _split(top, self.explain_examples, self.score_top_examples)
            picks = torch.randint(0, len(allowed), (self.score_random_examples,), generator=gen)
            random = [
                self._snippet(tokens, a, excluded, int(allowed[i, 0]), int(allowed[i, 1]))
                for i in picks
            ]
            t = time.perf_counter()
            label = clean_label(explainer.explain(label_messages(explain, unit)))
            t_explain += time.perf_counter() - t
            t = time.perf_counter()
            simulated = [explainer.simulate(label, s, unit) for s in held + random]
            t_simulate += time.perf_counter() - t
            true = [s.activations for s in held + random]
            flat_sim = [v for sim in simulated for v in sim]
            flat_true = [v for tr in true for v in tr]
            k = sum(len(s.tokens) for s in held)
            flat_a = a[keep]
            records.append(
                FeatureRecord(
                    feature=j,
                    sign=int(signs[j]),
                    label=label,
                    score=round(pearson(flat_sim, flat_true), 4),
                    score_top=round(pearson(flat_sim[:k], flat_true[:k]), 4),
                    score_random=round(pearson(flat_sim[k:], flat_true[k:]), 4) if random else 0.0,
                    max_activation=round(float(flat_a.max()), 4),
                    mean_activation=round(float(flat_a.mean()), 4),
                    frequency=round(float((flat_a > 0).double().mean()), 4),
                    explanation=[_snippet_dict(s) for s in explain],
                    held_out=[
                        {**_snippet_dict(s), "simulated": [round(v, 4) for v in sim]}
                        for s, sim in zip(held + random, simulated)
                    ],
                )
            )
        result = self._result(ctx, records, unit, layer, t_collect, t_explain, t_simulate)
        result.metrics["outlier_positions"] = float(n_outliers)
        return result

    def _result(
        self,
        ctx: Context,
        records: list[FeatureRecord],
        unit: str,
        layer: int,
        t_collect: float,
        t_explain: float,
        t_simulate: float,
    ) -> StageResult:
        table = [
            {
                "feature": r.feature,
                "sign": r.sign,
                "label": r.label,
                "score": r.score,
                "score_top": r.score_top,
                "score_random": r.score_random,
                "max_activation": r.max_activation,
                "frequency": r.frequency,
                "top_examples": " | ".join(e["marked"] for e in r.explanation[:3]),
            }
            for r in records
        ]
        scores = [r.score for r in records]
        folder = ctx.stage_dir(ctx.stage_name or "feature_labels")
        source = self.dictionary or f"MLP neurons of block {layer}"
        json_path = atomic_write_json(
            folder / "feature_labels.json",
            {
                "source": source,
                "unit": unit,
                "layer": layer,
                "explainer": self.api["model"] if self.api else self.explainer,
                "features": [asdict(r) for r in records],
            },
        )
        md_path = atomic_write_text(folder / "feature_labels.md", _markdown(table, source))
        metrics = {
            "features": float(len(records)),
            "layer": float(layer),
            "mean_score": sum(scores) / len(scores),
            "median_score": float(torch.tensor(scores).median()),
            "positive_scores": float(sum(s > 0 for s in scores)),
            "mean_score_top": sum(r.score_top for r in records) / len(records),
            "collect_seconds": t_collect,
            "explain_seconds": t_explain,
            "simulate_seconds": t_simulate,
        }
        return StageResult(
            metrics=metrics,
            artifacts={"feature_labels": json_path, "feature_labels_md": md_path},
            tables={"feature_labels": table},
        )


def _split(top: list[Snippet], n_explain: int, n_score: int) -> tuple[list, list]:
    """Alternate the top snippets (largest first) between explanation and scoring, so both
    see the same range of activations; the largest goes to the explanation."""
    explain: list[Snippet] = []
    held: list[Snippet] = []
    for i, snippet in enumerate(top):
        wants_explain = len(explain) < n_explain
        wants_held = len(held) < n_score
        if wants_explain and (i % 2 == 0 or not wants_held):
            explain.append(snippet)
        elif wants_held:
            held.append(snippet)
    return explain, held


def _snippet_dict(s: Snippet) -> dict[str, Any]:
    return {
        "row": s.row,
        "start": s.start,
        "marked": s.marked(),
        "tokens": s.tokens,
        "activations": s.activations,
    }


def _markdown(table: list[dict[str, Any]], source: str) -> str:
    lines = [
        f"# Feature labels: {source}",
        "",
        "| feature | sign | label | score | top-held-out | random | max act | top examples |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in table:
        examples = r["top_examples"].replace("|", "\\|")
        lines.append(
            f"| {r['feature']} | {r['sign']:+d} | {r['label'].replace('|', '/')} | "
            f"{r['score']:.3f} | {r['score_top']:.3f} | {r['score_random']:.3f} | "
            f"{r['max_activation']:.3g} | {examples} |"
        )
    return "\n".join(lines) + "\n"
