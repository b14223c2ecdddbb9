"""Importing the gateway builds nothing; its app is made once, from settings parsed once."""

import subprocess
import sys

BUILT = ("flask", "prometheus_client", "kombu", "redis", "gateway.factory", "gateway.broker")


def test_importing_the_gateway_and_its_server_module_builds_no_app():
    """What gunicorn's master imports (``gunicorn.conf.py``): no Flask, no metrics client
    (it reads PROMETHEUS_MULTIPROC_DIR when imported), no broker link, no redis (imported
    before gevent patches the worker, its asyncio client would keep the real ssl)."""
    code = (
        "import sys, gateway, gateway.server;"
        f"print(sorted(m for m in sys.modules if m.startswith({BUILT!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_app_is_made_on_first_access_with_the_settings_parsed_once():
    code = (
        "import gateway, gateway.server as s;"
        "app = gateway.app;"
        "print(app is gateway.app, app.extensions['proxymq'].config is s.settings(),"
        " type(app).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "Flask"]
