"""`sculpt describe editor=leace`: what a composed config's plugin accepts, read from the
plugin itself (its signature with bounds and choices, the config's value, the docstring's
line for each argument), so the listing cannot drift from the code.

    sculpt describe compressor=slice            # the node the override chose
    sculpt describe experiment=erase_concept editor probes.before
"""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
import types
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from framework.config import CONF_DIR, locate, signature_of
from framework.errors import SculptError
from framework.schema import bound_text, type_hints


def render_hint(hint: Any) -> str:
    """A type as a user reads it: `int >= 1 | None`, `float in (0, 1)`, `one of a, b`."""
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        base, *markers = typing.get_args(hint)
        text = render_hint(base)
        for marker in markers:
            if bound := bound_text(marker):
                text += f" {bound}"
        return text
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(render_hint(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if origin is not None and typing.get_args(hint) and origin not in (dict,):
        inner = typing.get_args(hint)[0]
        return f"list of ({render_hint(inner)})"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def argument_notes(obj: Any) -> dict[str, str]:
    """Each argument's line from the Google-style "Args:" section of the class (or its
    constructor's) docstring, continuation lines joined."""
    notes: dict[str, str] = {}
    for doc in (inspect.getdoc(obj), inspect.getdoc(getattr(obj, "__init__", None))):
        if not doc or "Args:" not in doc:
            continue
        name = None
        for line in doc.split("Args:", 1)[1].splitlines()[1:]:
            if line and not line.startswith(" "):
                break  # the next section
            entry = re.match(r"^ {2,8}(\w+)(?: \([^)]*\))?: (.*)$", line)
            if entry and (name is None or len(line) - len(line.lstrip()) <= 4):
                name = entry.group(1)
                notes[name] = entry.group(2).strip()
            elif name and line.strip():
                notes[name] += " " + line.strip()
    return notes


def describe_node(node: DictConfig, key: str) -> str:
    target = str(node.get("_target_"))
    obj = locate(target, key)
    hints = type_hints(obj)
    notes = argument_notes(obj)
    rows = []
    for name, param in signature_of(obj).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name in node:
            raw = node._get_node(name)._value()  # interpolations shown as written
            value = OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else raw
        else:
            value = "(required)" if param.default is param.empty else param.default
        hint = render_hint(hints[name]) if name in hints else ""
        rows.append((name, hint, repr(value) if isinstance(value, str) else str(value)))
    width = [max([len(r[i]) for r in rows] + [8]) for i in range(3)]
    lines = [f"{key}: {target}"]
    lines.append(f"  {'argument':<{width[0]}}  {'type':<{width[1]}}  value")
    for name, hint, value in rows:
        lines.append(f"  {name:<{width[0]}}  {hint:<{width[1]}}  {value}")
        if note := notes.get(name):
            indent = " " * (width[0] + 4)
            lines += textwrap.wrap(note, 100, initial_indent=indent, subsequent_indent=indent)
    return "\n".join(lines)


def describe(argv: list[str]) -> str:
    """The listing for `sculpt describe ARGS`: overrides (with '=') compose the config, bare
    keys name the nodes to describe (default: the groups the overrides chose)."""
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if "=" in a]
    keys = [a for a in argv if "=" not in a]
    if not keys:
        keys = [a.split("=", 1)[0].lstrip("+~") for a in overrides]
        keys = [k for k in keys if k not in ("experiment", "model")]
    if not keys:
        raise SculptError("describe: name a plugin, e.g. `sculpt describe editor=leace`")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception as exc:
            reason = " ".join(str(exc).split("Config search path")[0].split())
            raise SculptError(f"describe: {' '.join(overrides)}: {reason}") from exc
    parts = []
    for key in keys:
        node = OmegaConf.select(cfg, key, default=None)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise SculptError(f"{key}: not a plugin node in this config (no _target_)")
        parts.append(describe_node(node, key))
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    try:
        print(describe(argv))
    except SculptError as exc:
        print(f"sculpt: error: {exc}", file=sys.stderr)
        return 2
    return 0
