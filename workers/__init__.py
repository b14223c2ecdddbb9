"""ProxyMQ workers: take requests off ``<service>_requests``, call the service, reply.

Run with ``celery -A workers worker -Q <service>_requests``.
"""

from workers import tasks  # noqa: F401  -- registers proxymq.forward with the app
from workers.app import app

__all__ = ["app"]
