"""The Flask app: HTTP routes over ``Fetcher`` and the batch helpers.

Routes stay thin: parsing, fetching and batching live in their own modules so they are
tested without HTTP, and the app only turns their results into responses.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from fetcher.batch import BatchTooLarge, InvalidBatch, answer_batch, parse_batch
from fetcher.config import FetcherConfig
from fetcher.fetching import Fetcher
from fetcher.payloads import answer_fetch, error_body, render_json
from proxymq import tracing
from proxymq.outbound import AddressPolicy, build_session, policy_for

EXTENSION = "fetcher"
USER_AGENT = "proxymq-fetcher/0.1"
# Request bodies are small JSON documents naming URLs; the gateway already caps client
# bodies. This only stops a direct caller from making a worker buffer without bound.
MAX_REQUEST_BYTES = 16 * 1024 * 1024

# Codes shared with the gateway's vocabulary (SPEC); other errors use Werkzeug's name.
ERROR_CODES = {413: "body-too-large"}

routes = Blueprint("fetcher", __name__)


def _json_response(status: int, payload: Any) -> Response:
    return Response(render_json(payload), status=status, mimetype="application/json")


def _fetcher() -> Fetcher:
    return current_app.extensions[EXTENSION]


@routes.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers. It deliberately does not fetch anything."""
    return _json_response(200, {"status": "ok"})


@routes.post("/fetch")
def fetch() -> Response:
    status, payload = answer_fetch(_fetcher(), request.get_data())
    return _json_response(status, payload)


@routes.post("/batch")
def batch() -> Response:
    try:
        payload = json.loads(request.get_data())
    except ValueError:
        return _json_response(400, error_body("bad-request", "body must be JSON"))
    try:
        items = parse_batch(payload, current_app.config["FETCHER_CONFIG"].batch_size)
    except BatchTooLarge as error:
        return _json_response(413, error_body("batch-too-large", str(error)))
    except InvalidBatch as error:
        return _json_response(400, error_body("bad-request", str(error)))
    return _json_response(200, answer_batch(_fetcher(), items))


def _http_error(error: HTTPException) -> Response:
    """Flask's own errors (404, 405, 413 …) as JSON, like everything else here."""
    code = ERROR_CODES.get(error.code or 500) or (error.name or "error").lower().replace(" ", "-")
    response = _json_response(error.code or 500, error_body(code, error.description or ""))
    for name, value in error.get_headers():  # keeps Allow on a 405
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def build_fetcher(config: FetcherConfig, address_policy: AddressPolicy | None = None) -> Fetcher:
    """The process's Fetcher: one pooled session, the limits from ``config``.

    ``pool_size`` is the batch size: enough connections for a full batch against one host.
    """
    policy = address_policy or policy_for(config.allow_private)
    session = build_session(policy, pool_size=config.batch_size, user_agent=USER_AGENT)
    return Fetcher(session, timeout=config.timeout, max_bytes=config.max_bytes)


def create_app(
    config: FetcherConfig | None = None, *, address_policy: AddressPolicy | None = None
) -> Flask:
    """Build the app; ``config`` defaults to the environment, ``address_policy`` to its rule.

    ``address_policy`` exists for tests that need a real local server to be allowed while
    other loopback addresses stay refused.
    """
    config = config or FetcherConfig.from_env(os.environ)
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    app.config["FETCHER_CONFIG"] = config
    app.extensions[EXTENSION] = build_fetcher(config, address_policy)
    app.register_blueprint(routes)
    app.register_error_handler(HTTPException, _http_error)
    tracing.instrument_flask(app, excluded="healthz", outgoing=True)
    return app
