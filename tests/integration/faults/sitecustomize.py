"""Faults for a worker under test (``PYTHONPATH=<this dir>``): by default every observer
raises; with ``TEST_FAULTS=flow`` the flow control's gate does.

Python imports ``sitecustomize`` at start, before Celery imports the worker. This one
patches the worker's modules as they are imported: task events (``workers.events``),
Prometheus metrics (``workers.metrics``) and spans (``workers.tracing``; its
``received`` is left working so the spans' later hooks run), or the flow control's
``Flow.enter`` (``workers.flow.gate``). The answers and acknowledgements must not notice.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


class Fault(RuntimeError):
    pass


def _raise(*_args, **_kwargs):
    raise Fault("an injected observer fault")


class _Broken:
    """A metric whose every use raises."""

    labels = observe = inc = staticmethod(_raise)


def _break_events(module) -> None:
    for name in ("received", "started", "answered", "expired"):
        setattr(module.TaskEvents, name, _raise)


def _break_metrics(module) -> None:
    for name in dir(module):
        if hasattr(getattr(module, name), "labels"):
            setattr(module, name, _Broken())


def _break_tracing(module) -> None:
    module.DeliveryTrace.end = _raise
    module.DeliveryTrace.replying = _raise
    for name in ("single_call", "batch_call", "propagation"):
        setattr(module, name, _raise)


def _break_flow(module) -> None:
    module.Flow.enter = _raise


BREAK = {
    "observers": {
        "workers.events": _break_events,
        "workers.metrics": _break_metrics,
        "workers.tracing": _break_tracing,
    },
    "flow": {"workers.flow.gate": _break_flow},
}[os.environ.get("TEST_FAULTS", "observers")]


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, fault) -> None:
        self._loader, self._fault = loader, fault

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._fault(module)
        print(f"test faults: {module.__name__} raises", file=sys.stderr, flush=True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in BREAK:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader, BREAK[name])
                return spec
        return None


sys.meta_path.insert(0, _Finder())
print(
    f"test faults: {os.environ.get('TEST_FAULTS', 'observers')} raise once imported",
    file=sys.stderr,
    flush=True,
)
