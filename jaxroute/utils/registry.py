"""Registries by name: ``{name: (function, its config class)}`` (attacks, routers, saliency methods)."""
from __future__ import annotations

from typing import Any, Mapping


def registry_config(registry: Mapping[str, tuple[Any, type]], name: str, config=None, what: str = "method"):
    """The config of ``registry[name]``: ``config`` itself (type-checked), or the class defaults.

    ``what`` names the registry in the error for an unknown name (e.g. "routing method").
    """
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; one of {sorted(registry)}")
    cls = registry[name][1]
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"{what} {name!r} takes a {cls.__name__}, got {type(config).__name__}")
    return config
