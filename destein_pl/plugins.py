"""Building the pluggable parts (scorers, rewriters) from what a config names: an instance, a short name, a class
name or an import path, so that YAML can say `perspective` as well as `class_path: PerspectiveScorer`."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, ClassVar, TypeVar

import yaml

T = TypeVar("T")


class Plugin:
    """What scorers and rewriters share: a registry `name`, and a constructor that only stores and checks its
    options (configs are parsed for every command), with loading (models, keys) deferred to `setup`."""

    name: ClassVar[str]
    _ready: bool = False

    def setup(self) -> None:
        """Load models, weights or API keys, once (later calls do nothing), so that such errors can come early."""
        if not self._ready:
            self._setup()
            self._ready = True

    def _setup(self) -> None:
        """What `setup` does the first time; nothing by default."""


def plugin_class(spec: str, base: type[T], registry: dict[str, type[T]], kind: str) -> type[T]:
    """The `base` subclass that `spec` names: a short name of `registry`, a class name of one of its classes, or an
    import path (`package.module.Class`) of any subclass."""
    if spec in registry:
        return registry[spec]
    by_class_name = {cls.__name__: cls for cls in registry.values()}
    if spec in by_class_name:
        return by_class_name[spec]
    if "." in spec:
        module, _, name = spec.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import {kind} {spec!r}: {err}") from err
        if isinstance(cls, type) and issubclass(cls, base) and not inspect.isabstract(cls):
            return cls
        raise ValueError(f"{spec!r} is not a {kind} (a subclass of {base.__name__})")
    raise ValueError(f"unknown {kind} {spec!r}; accepted: {', '.join(registry)} "
                     f"(or a class name: {', '.join(by_class_name)})")


def construct(cls: type[T], options: dict[str, Any], kind: str) -> T:
    """`cls(**options)`, with an error naming the accepted options when one is unknown or a required one missing."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        accepted = ", ".join(inspect.signature(cls).parameters) or "none"
        raise ValueError(f"{kind} {cls.__name__}: {err}; accepted options: {accepted}") from None
    return cls(**options)


def build_plugin(spec: T | str, base: type[T], registry: dict[str, type[T]], kind: str) -> T:
    """The `base` instance `spec` names: an instance (returned as is), a name or import path constructed with its
    defaults, or a `{class_path: ..., init_args: ...}` mapping written as a string (what a command line gives when
    the parser did not accept it as a class: constructing it here names the problem)."""
    if isinstance(spec, base):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a {kind} is a name or class_path/init_args, got {type(spec).__name__}")
    if spec.lstrip().startswith("{"):
        mapping = _mapping(spec, kind)
        cls = plugin_class(str(mapping["class_path"]), base, registry, kind)
        return construct(cls, mapping.get("init_args") or {}, kind)
    return construct(plugin_class(spec, base, registry, kind), {}, kind)


def _mapping(spec: str, kind: str) -> dict[str, Any]:
    try:
        mapping = yaml.safe_load(spec)
    except yaml.YAMLError as err:
        raise ValueError(f"{kind} {spec!r} is neither a name nor a class_path/init_args mapping ({err})") from None
    if not isinstance(mapping, dict) or "class_path" not in mapping or set(mapping) - {"class_path", "init_args"}:
        raise ValueError(f"{kind} {spec!r}: a mapping needs `class_path` and may have `init_args`, nothing else")
    if not isinstance(mapping.get("init_args") or {}, dict):
        raise ValueError(f"{kind} {spec!r}: `init_args` must be a mapping of option names to values")
    return mapping


def describe_plugins(registry: dict[str, type], option: str) -> str:
    """A help text listing each plugin of `registry` with its options (name: type = default), for `--help`."""
    lines = [f"{option}: a short name, or class_path (the class name) with init_args; options per class:"]
    for short, cls in registry.items():
        params = [p for p in inspect.signature(cls).parameters.values() if p.name != "self"]
        options = ", ".join(
            f"{p.name}: {p.annotation}" + ("" if p.default is inspect.Parameter.empty else f" = {p.default!r}")
            for p in params) or "no options"
        lines.append(f"  {short} ({cls.__name__}): {options}")
    return "\n".join(lines)
