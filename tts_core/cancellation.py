"""Cancellation inside one model call: a request's cancel event, seen by the model's loops.

The engines check a request's cancel event between LM steps and between streamed chunks, but
one chunk (the flow's ten Euler steps, then the vocoder) takes a large part of a second on a
CPU, and a whole-segment call (``stream=false``, a changed speed) far longer. The model code is
shared by every request and takes no event; instead the engine marks its request's event as the
current one for the duration of a model call (``watching``), and the loops call ``check()``
between their steps: it raises ``Cancelled`` once that event is set, so a hang-up leaves the
engine idle within one step. Outside ``watching`` (tests, registration), ``check()`` does
nothing. A context variable keeps concurrent requests on different threads apart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current: ContextVar[threading.Event | None] = ContextVar("cosyvoice_cancel", default=None)


class Cancelled(Exception):
    """The request whose model call this is was cancelled; its partial state is worthless."""


@contextmanager
def watching(cancel: threading.Event | None) -> Iterator[None]:
    """Make ``cancel`` the event ``check()`` looks at while the block runs (this thread)."""
    token = _current.set(cancel)
    try:
        yield
    finally:
        _current.reset(token)


def check() -> None:
    """Raise ``Cancelled`` if the current request was cancelled (between model steps)."""
    cancel = _current.get()
    if cancel is not None and cancel.is_set():
        raise Cancelled
