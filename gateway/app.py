"""The gateway's Flask app: routes only; the request path itself lives in ``gateway.proxy``."""

from __future__ import annotations

import logging
import os
import time
import uuid

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from gateway import errors, jobs, metrics, proxy
from gateway.broker import BrokerLink
from proxymq.config import GatewayConfig, queue_name
from proxymq.jobs import JobStore

log = logging.getLogger(__name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_app(config: GatewayConfig | None = None) -> Flask:
    """Build the app; the broker link starts in each worker process, after the fork."""
    config = config or GatewayConfig.from_env(os.environ)
    link = BrokerLink(config.broker_url)
    store = JobStore(config.result_url, config.job_ttl) if config.result_url else None
    app = Flask(__name__)
    app.url_map.merge_slashes = False
    app.config["PROXYMQ"] = config
    app.extensions["proxymq.link"] = link

    app.before_request(link.start)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        if link.ready:
            return jsonify(status="ready"), 200
        return jsonify(status="broker-unavailable"), 503

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, content_type=content_type)

    @app.route("/jobs/<job_id>", methods=["GET", "DELETE"])
    def job(job_id: str) -> Response:
        credential = request.headers.get(config.job_auth_header)
        try:
            if request.method == "DELETE":
                return jobs.delete(store, job_id, credential)
            return jobs.poll(store, job_id, credential)
        except errors.GatewayError as error:
            return errors.error_response(error, job_id)

    def forward(service: str, rest: str = "") -> Response:
        started = time.perf_counter()
        correlation_id = str(uuid.uuid4())
        try:
            proxy.check_service(service, config)
            proxy.check_header_size(request, config)
            if jobs.wants_async(request):
                callback = jobs.callback_url(request)
                envelope = proxy.build_request(
                    service, request, config, config.job_timeout, job=True, callback=callback
                )
                response = jobs.submit(store, link, envelope, correlation_id, request, config)
                _count(service, response, started, None)
                return response
            wait = proxy.wait_seconds(request, config)
            envelope = proxy.build_request(service, request, config, wait)
            with metrics.inflight.labels(_label(service)).track_inprogress():
                reply = proxy.forward(link, envelope, correlation_id, wait)
        except errors.GatewayError as error:
            response = errors.error_response(error, correlation_id)
            _count(service, response, started, error.code)
            return response
        response = proxy.reply_response(reply, correlation_id)
        _count(service, response, started, reply.error)
        return response

    def _label(service: str) -> str:
        """The service as a metric label, only once it is known to be real."""
        if config.services is not None and service in config.services:
            return service
        if queue_name(service) in link.known_queues:
            return service
        return metrics.UNKNOWN_SERVICE

    def _count(service: str, response: Response, started: float, code: str | None) -> None:
        service = _label(service)
        if code == "timeout":
            metrics.timeouts_total.labels(service).inc()
        elif code in ("queue-full", "broker-unavailable"):
            metrics.shed_total.labels(service, code).inc()
        metrics.requests_total.labels(service, str(response.status_code)).inc()
        metrics.request_duration.labels(service).observe(time.perf_counter() - started)

    for rule in ("/<service>", "/<service>/", "/<service>/<path:rest>"):
        app.add_url_rule(
            rule,
            "forward",
            forward,
            methods=METHODS,
            strict_slashes=False,
            provide_automatic_options=False,
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = {404: "unknown-service", 413: "body-too-large"}.get(exc.code, "bad-request")
        if exc.code == 405:
            code = "method-not-allowed"
        error = errors.GatewayError(exc.code or 400, code, exc.description or exc.name)
        return errors.error_response(error, None)

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        error = errors.GatewayError(500, "internal-error", "the gateway failed; see its log")
        return errors.error_response(error, None)

    return app
