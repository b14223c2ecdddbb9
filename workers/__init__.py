"""ProxyMQ workers: take requests off ``<service>_requests``, call the service, reply.

Run with ``celery -A workers worker -Q <service>_requests``.
"""

# Imported for what they register: proxymq.forward with the app, and the remote-control
# command that counts purged dead letters.
from workers import purge_count, tasks  # noqa: F401
from workers.app import app

__all__ = ["app"]
