"""Check a config against what its ``target`` classes accept, before anything is built.

CompVis configs pass ``params`` straight to constructors, so a misspelt key
(``reg_weigth``), a key at the wrong level or a value of the wrong type (``reg_weight: lots``)
is either ignored or fails after minutes of model building. Here every ``params`` key is
checked against the constructor's signature (and its base classes' where it forwards
``**kwargs``) and every value against the parameter's type hint where that hint is a plain
type, before anything is instantiated. Importing a target is all that happens; nothing is
called.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Union

from ldm.util import get_obj_from_str


class ConfigError(ValueError):
    """A config that cannot be what the user meant; the message is one line naming the key."""


def accepted_parameters(cls: type) -> tuple[dict[str, Any], bool]:
    """Keyword parameters of ``cls(...)`` with their type hints (``Any`` where unknown).

    Follows ``**kwargs`` up the class hierarchy. Returns ``(parameters, open)`` where ``open``
    says that some constructor takes arbitrary keywords, so unknown names cannot be refused.
    """
    parameters: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        if klass is object:
            return parameters, True
        hints = _type_hints(init)
        forwards = False
        for name, parameter in list(inspect.signature(init).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                parameters.setdefault(name, hints.get(name, Any))
        if not forwards:
            return parameters, False
    return parameters, True


def _type_hints(function: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check names only
        return {}


def matches(value: Any, hint: Any) -> bool:
    """Whether a config value fits a type hint; hints this cannot judge accept anything."""
    origin = typing.get_origin(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence):
        return isinstance(value, (list, tuple))
    if container in (dict, Mapping):
        return isinstance(value, Mapping)
    return True


def _describe(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return text or str(hint).replace("typing.", "")


def unknown_key(path: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The one-line error for ``path.name`` not being a valid key, naming the nearest ones."""
    valid = sorted(valid)
    key = f"{path}.{name}" if path else name
    nearest = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    prefix = f"{path}." if path else ""
    if nearest:
        hint = "nearest: " + ", ".join(prefix + n for n in nearest)
    else:
        shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
        hint = f"valid keys there: {shown}"
    return ConfigError(f"unknown config key '{key}'; {hint}")


def check_keys(node: Mapping[str, Any], path: str, valid: Iterable[str]) -> None:
    """Refuse any key of ``node`` outside ``valid``."""
    valid = set(valid)
    for name in node:
        if name not in valid:
            raise unknown_key(path, str(name), valid)


def check_parameters(params: Mapping[str, Any], cls: type, path: str) -> None:
    """Every key of ``params`` must be a parameter of ``cls`` and every value fit its type hint."""
    parameters, open_ = accepted_parameters(cls)
    for name, value in params.items():
        if name not in parameters:
            if open_:
                continue
            raise unknown_key(path, str(name), parameters)
        if not matches(value, parameters[name]):
            raise ConfigError(
                f"{path}.{name} must be {_describe(parameters[name])}, got {value!r} ({type(value).__name__})"
            )


def import_target(node: Mapping[str, Any], path: str) -> type:
    """The class a config node's ``target`` names (imported, not called)."""
    target = node.get("target")
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{path}.target must name a class like 'package.module.Class', got {target!r}")
    try:
        obj = get_obj_from_str(target)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{path}.target: cannot import {target!r} ({err})") from None
    if not callable(obj):
        raise ConfigError(f"{path}.target: {target!r} is not a class")
    return obj


def check_instantiable(node: Any, path: str, extra_keys: Mapping[str, Iterable[str]] | None = None) -> None:
    """Check a ``target``/``params`` node and every such node nested in its params.

    Args:
        node: a plain (resolved) config mapping with a ``target``.
        path: its dotted name, for messages.
        extra_keys: keys allowed beside ``target`` and ``params`` at given paths (for example
            ``model.base_learning_rate``).
    """
    extra_keys = extra_keys or {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{path} must be a mapping with a 'target', got {node!r}")
    if "target" not in node:
        raise ConfigError(f"{path} has no 'target' (the class to build, e.g. ldm.models.diffusion.ddpm.LatentDiffusion)")
    check_keys(node, path, {"target", "params", *extra_keys.get(path, ())})
    cls = import_target(node, path)
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{path}.params must be a mapping, got {params!r}")
    if isinstance(cls, type):
        check_parameters(params, cls, f"{path}.params")
    for name, value in params.items():
        _check_nested(value, f"{path}.params.{name}", extra_keys)


def _check_nested(value: Any, path: str, extra_keys: Mapping[str, Iterable[str]]) -> None:
    if isinstance(value, Mapping):
        if "target" in value:
            check_instantiable(value, path, extra_keys)
            return
        if "params" in value:
            raise ConfigError(f"{path} has 'params' but no 'target'")
        for name, item in value.items():
            _check_nested(item, f"{path}.{name}", extra_keys)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_nested(item, f"{path}.{index}", extra_keys)
