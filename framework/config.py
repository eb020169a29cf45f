"""Config checking and instantiation. A node with `_target_` is bound to its target's
signature before anything is built, so a misspelled or mistyped argument fails at once
with the config key named (torchtune's habit), never deep inside a run."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from framework.errors import ConfigError, SculptError
from framework.schema import constraint_problem, strip_annotated, type_hints

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def locate(target: str, key: str) -> Any:
    try:
        return get_object(target)
    except Exception as exc:  # hydra raises ImportError/ValueError variants
        raise SculptError(f"{key}._target_: cannot import '{target}' ({exc})") from exc


def signature_of(obj: Any) -> inspect.Signature:
    return inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)


def check_node(node: DictConfig, key: str) -> None:
    """Bind the node's arguments to its target's signature and check literal types."""
    target = node.get("_target_")
    if target is None:
        raise SculptError(f"{key}: no _target_")
    obj = locate(str(target), key)
    sig = signature_of(obj)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    # Names only: reading values here would resolve them (and crash on a ??? value).
    args = [k for k in node if k not in _HYDRA_KEYS]
    for name in args:
        if name not in params and not accepts_any:
            accepted = ", ".join(n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL)
            raise SculptError(f"{key}.{name}: not an argument of {target} (accepted: {accepted})")
    partial = bool(node.get("_partial_", False))
    hints = type_hints(obj)
    for name, param in params.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name not in args:
            if param.default is param.empty and not partial:
                raise SculptError(f"{key}.{name}: required by {target} but not set")
            continue
        if OmegaConf.is_missing(node, name):
            raise SculptError(f"{key}.{name}: must be set (it is ???)")
        if OmegaConf.is_interpolation(node, name):
            try:
                node[name]
            except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
                raw = node._get_node(name)._value()
                raise SculptError(f"{key}.{name}: must be set ({raw} is ???)") from exc
            except Exception:  # e.g. ${hydra:...} outside a Hydra app: checked when built
                pass
        child = node._get_node(name)
        value = None if OmegaConf.is_interpolation(node, name) else child._value()
        if value is None or name not in hints:
            continue
        if isinstance(child, DictConfig) and "_target_" in child:
            continue  # a nested plugin: checked as a node of its own
        # a container's _value() holds its element nodes: convert the node itself
        plain = (
            OmegaConf.to_container(child) if isinstance(child, DictConfig | ListConfig) else value
        )
        hint = strip_annotated(hints[name])
        if not _matches(plain, hint):
            raise SculptError(
                f"{key}.{name}: {plain!r} is not a valid {_type_name(hint)} for {target}"
            )
        if why := constraint_problem(plain, hints[name]):
            raise SculptError(f"{key}.{name}: {why}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # anything richer is left to the constructor


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "choice (one of " + ", ".join(map(str, typing.get_args(hint))) + ")"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def target_nodes(cfg: Any, key: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every node with a _target_, depth first, with its dotted key."""
    if isinstance(cfg, DictConfig):
        if "_target_" in cfg:
            yield key, cfg
        for k in cfg:
            if k == "hydra":
                continue
            try:
                child = cfg._get_node(k)
            except Exception:
                continue
            if isinstance(child, DictConfig | ListConfig):
                yield from target_nodes(child, f"{key}.{k}" if key else str(k))
    elif isinstance(cfg, ListConfig):
        for i, child in enumerate(cfg._iter_ex(resolve=False)):
            if isinstance(child, DictConfig | ListConfig):
                yield from target_nodes(child, f"{key}[{i}]")


def check_config(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Check every _target_ node, except those under the top-level keys in `skip`."""
    for key, node in target_nodes(cfg):
        if key.split(".")[0].split("[")[0] not in skip:
            check_node(node, key)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """Instantiate a checked node; a ConfigError from the constructor gets the key prefixed."""
    check_node(node, key)
    try:
        return instantiate(node, **kwargs)
    except ConfigError as exc:
        raise SculptError(f"{key}.{exc.argument}: {exc.detail}") from exc
    except SculptError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ConfigError):
            raise SculptError(f"{key}.{cause.argument}: {cause.detail}") from exc
        if isinstance(cause, SculptError):
            raise cause from exc
        raise
