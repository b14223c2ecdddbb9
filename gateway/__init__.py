"""ProxyMQ gateway: HTTP in, RabbitMQ message out, reply in, HTTP out.

Run with ``gunicorn gateway:app`` from the repository root (``gunicorn.conf.py`` there
selects the gateway's gevent worker, ``gateway.server``, and checks the settings in
gunicorn's master before any worker starts).

Importing the package does nothing: ``app`` is made on first access (PEP 562 module
``__getattr__``, as ``fetcher`` does), in the gunicorn worker that loads it, by the
factory ``gateway.factory.create_app`` (also ``gunicorn 'gateway:create_app()'``). The
master imports ``gateway.server`` and so this file: an app made here would make its
broker link and metrics before the fork. (The factory's module is not ``gateway.app``:
a submodule would be bound to the same package attribute as the app.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    app: Flask


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from gateway.factory import create_app

        return create_app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from gateway.factory import create_app

    created = create_app()
    # Cache it as a real module attribute: later lookups never come back here.
    globals()["app"] = created
    return created
