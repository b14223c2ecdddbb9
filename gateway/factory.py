"""The gateway's WSGI app: Flask for its own routes, the proxy route in front of it."""

from __future__ import annotations

from flask import Flask

from gateway import server
from gateway.broker import BrokerLink
from gateway.process import Gateway
from gateway.proxy import ProxyRoute
from gateway.views import views
from proxymq import tracing
from proxymq.config import GatewayConfig
from proxymq.idempotency import IdempotencyStore
from proxymq.jobs import JobStore


def create_app(config: GatewayConfig | None = None) -> Flask:
    """Build the app, with the process's settings unless given (``server.settings``:
    parsed once, in gunicorn's master before the fork); the broker link starts in each
    worker process, after the fork (``gunicorn.conf.py``'s ``post_worker_init``, or the
    first request)."""
    config = config or server.settings()
    tls = config.broker_tls
    link = BrokerLink(
        config.broker_url,
        ssl=[tls.ssl_options(node.host) for node in tls.nodes] if tls else None,
        reply_users=config.reply_users,
        stream_buffer_bytes=config.stream_buffer_bytes,
    )
    store = JobStore(config.result_url, config.job_ttl) if config.result_url else None
    keys = IdempotencyStore(config.result_url, config.idempotency_ttl) if store else None
    gateway = Gateway(config, link, store, keys)
    app = Flask(__name__)
    app.url_map.merge_slashes = False
    app.extensions["proxymq"] = gateway
    app.extensions["proxymq.link"] = link
    app.before_request(link.start)
    app.register_blueprint(views)
    tracing.instrument_flask(app)  # the gateway's own routes; the proxy route traces itself
    app.wsgi_app = ProxyRoute(app.wsgi_app, gateway)
    return app
