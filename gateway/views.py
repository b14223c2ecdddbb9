"""The gateway's own routes, as a Flask Blueprint: health, readiness, metrics, jobs.

Every other path is a service's, served by ``gateway.proxy`` before Flask routes it.
"""

from __future__ import annotations

from flask import Blueprint, current_app, request
from werkzeug.exceptions import HTTPException

from gateway import errors, jobs, metrics
from gateway.answers import Answer, error_answer, json_answer

views = Blueprint("proxymq", __name__)


def _gateway():
    return current_app.extensions["proxymq"]


@views.get("/healthz")
def healthz() -> Answer:
    return json_answer(200, {"status": "ok"})


@views.get("/readyz")
def readyz() -> Answer:
    if _gateway().link.ready:
        return json_answer(200, {"status": "ready"})
    return json_answer(503, {"status": "broker-unavailable"})


@views.get("/metrics")
def metrics_endpoint() -> Answer:
    body, content_type = metrics.exposition()
    return Answer(200, [("Content-Type", content_type)], body)


@views.route("/jobs/<job_id>", methods=["GET", "DELETE"])
def job(job_id: str) -> Answer:
    gateway = _gateway()
    credential = request.headers.get(gateway.config.job_auth_header)
    try:
        if request.method == "DELETE":
            return jobs.delete(gateway.store, job_id, credential)
        return jobs.poll(gateway.store, job_id, credential, gateway.link.status)
    except errors.GatewayError as error:
        return error_answer(error, job_id)


@views.app_errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Answer:
    entry = {404: errors.UNKNOWN_SERVICE, 405: errors.METHOD_NOT_ALLOWED}.get(
        exc.code, errors.BAD_REQUEST
    )
    return error_answer(entry(exc.description or exc.name, exc.code), None)
