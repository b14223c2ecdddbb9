"""Observers: what watches a request without answering it (spans, metrics, task events).

An observer must never keep a request from being answered, published again,
dead-lettered or acknowledged: a span that could not be ended or a metric that could
not be counted is a lost observation, a skipped ack is a wedged message (it holds a
prefetch slot until the channel closes) and a skipped reply a client waiting for its
504. So the pipeline does the answering step first and calls each observer after it
through ``observe``, which logs and swallows the observer's failure, one observer at a
time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


def observe(observer: Callable[..., Any], *args: Any) -> Any:
    """``observer(*args)``, or None when it raised (logged, never passed on)."""
    try:
        return observer(*args)
    except Exception:
        name = getattr(observer, "__qualname__", repr(observer))
        log.exception("an observer failed: %s", name)
        return None


def then(step: Callable[[str], None], observer: Callable[[str], None] | None):
    """``step(outcome)``, then the observer of that outcome, guarded."""
    if observer is None:
        return step

    def both(outcome: str) -> None:
        try:
            step(outcome)
        finally:
            observe(observer, outcome)

    return both


@contextlib.contextmanager
def observing(factory: Callable[..., Any], *args: Any) -> Iterator[Callable[..., None]]:
    """An observer's context manager around a step (a call's span): entering or leaving
    it may fail without failing the step. Yields its ``done(result)``, guarded too, or
    one that does nothing when entering failed."""
    try:
        manager = factory(*args)
        done = manager.__enter__()
    except Exception:
        log.exception("an observer failed: %s", getattr(factory, "__qualname__", factory))
        manager, done = None, _ignore
    try:
        yield lambda *result: observe(done, *result)
    except BaseException as exc:
        if manager is not None:
            observe(manager.__exit__, type(exc), exc, exc.__traceback__)
        raise
    else:
        if manager is not None:
            observe(manager.__exit__, None, None, None)


def _ignore(*_: Any) -> None:
    pass
