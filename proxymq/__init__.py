"""Pieces both sides of ProxyMQ share: the envelope, header rules and configuration.

Nothing here imports Flask or Celery, so the gateway's gunicorn master can validate
its configuration without loading the web app, and the workers can decode a request
without loading the gateway.
"""
