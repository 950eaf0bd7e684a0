"""The one rule for a backend built from a frozen config or from keyword options: one or the
other, never both (a keyword beside a config would be silently ignored or silently win)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from replaysafe.errors import ConfigurationError

C = TypeVar("C")


def config_or_options(owner: str, kind: type[C], config: object, options: Mapping[str, Any]) -> C:
    """``config`` when given (it must be a ``kind``), else ``kind(**options)`` (which validates
    them). ``ConfigurationError`` naming the options when both are given."""
    if config is None:
        return kind(**options)
    if options:
        raise ConfigurationError(
            f"{owner}: got config= and also {', '.join(sorted(options))}; pass one or the other, "
            "not both (dataclasses.replace(config, ...) changes a config)"
        )
    if not isinstance(config, kind):
        raise ConfigurationError(
            f"{owner}: config= must be a {kind.__name__}, got {type(config).__name__}; build one "
            f"with {kind.__name__}(...) or {kind.__name__}.from_url(url)"
        )
    return config
