"""Typed config fields: a default, a line of documentation and bounds, in one declaration.

Config classes across the project are plain dataclasses whose fields are declared with :func:`param`.
The loader in ``pipeline.config`` reads the metadata to check bounds and to print ``--help-config``;
this module has no I/O so the model library can describe its own hyperparameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

_MISSING: Any = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with documentation and numeric bounds (``ge``/``gt``/``le``/``lt``).

    ``secret`` fields are redacted whenever a config is printed or saved.
    """
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt}
    metadata: dict[str, Any] = {"doc": doc, **{k: v for k, v in bounds.items() if v is not None}}
    if secret:
        metadata["secret"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class ConfigValueError(ValueError):
    """An impossible value found by a config's ``validate()``; ``key`` is relative to that config."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigValueError` for ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigValueError(key, message)
