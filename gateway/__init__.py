"""ProxyMQ gateway: HTTP in, RabbitMQ message out, reply in, HTTP out.

Run with ``gunicorn gateway:app`` from the repository root (``gunicorn.conf.py`` there
selects gevent workers and validates the configuration before any worker starts).
"""

from gateway.app import create_app

app = create_app()
