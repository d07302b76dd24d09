"""Tracing hooks of the scoring path: no-ops until a tracing backend is installed.

The library marks its stages with :func:`span` (search, gather, score in
:meth:`bliss.scorer.Scorer.score`); ``bliss serve --tracing`` installs an OpenTelemetry
backend (:mod:`bliss.server.tracing`). Until then nothing imports opentelemetry and a
hook costs one global read and a shared do-nothing context manager.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, TypeVar

AttributeValue = str | bool | int | float | Sequence[str]
Attributes = Mapping[str, AttributeValue]

_Result = TypeVar("_Result")
_NO_SPAN: AbstractContextManager[object] = nullcontext()


class TracingBackend(Protocol):
    def span(self, name: str, attributes: Attributes) -> AbstractContextManager[object]:
        """A child span of the current one, current inside the block; ERROR on an exception."""
        ...

    def annotate(self, attributes: Attributes) -> None:
        """Set attributes on the current span."""
        ...


_backend: TracingBackend | None = None


def install(backend: TracingBackend | None) -> None:
    """Send spans to ``backend`` from now on (None: back to no-ops)."""
    global _backend
    _backend = backend


def installed() -> TracingBackend | None:
    return _backend


def span(name: str, attributes: Attributes | None = None) -> AbstractContextManager[object]:
    """A span around a block when tracing is on, else nothing."""
    if _backend is None:
        return _NO_SPAN
    return _backend.span(name, attributes or {})


def annotate(attributes: Attributes) -> None:
    """Attributes of the current span when tracing is on (known only part-way through it)."""
    if _backend is not None:
        _backend.annotate(attributes)


def carried(function: Callable[..., _Result]) -> Callable[..., _Result]:
    """``function`` running in the caller's context, current span included, wherever it
    is called: an executor thread does not inherit context variables by itself.

    Each call copies the context once: wrap once per task, since a copy cannot be entered
    by two threads at once.
    """
    if _backend is None:
        return function
    return functools.partial(contextvars.copy_context().run, function)
