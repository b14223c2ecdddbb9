"""Fetcher: the example downstream microservice behind ProxyMQ (``gunicorn fetcher:app``).

``app`` is created on first access (PEP 562 module ``__getattr__``) rather than at import:
``gunicorn.conf.py`` imports ``fetcher.config`` in the gunicorn master, and importing a
submodule runs this file first. Creating the app here would import Flask, requests and
ssl in the master before gevent patches the workers, and would read the configuration
before the master has had the chance to report a bad value in one line.

The factory lives in ``fetcher.web``, not ``fetcher.app``: a submodule named ``app``
would be bound to the same package attribute as the app itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    app: Flask


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fetcher.web import create_app

    created = create_app()
    # Cache it as a real module attribute: later lookups never come back here.
    globals()["app"] = created
    return created
