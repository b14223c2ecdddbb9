"""The client's controls without processes: settings, header parsing, fingerprints."""

import pytest

from gateway import errors
from gateway import request as controls
from proxymq.config import GatewayConfig, ServiceConfig, WorkerConfig
from proxymq.envelope import RequestEnvelope, task_message
from proxymq.idempotency import ANONYMOUS, Claim, fingerprint, scope
from proxymq.parsers import ConfigError
from workers.app import service_queue

WORKER_ENV = {"PROXYMQ_SERVICE": "a", "PROXYMQ_DOWNSTREAM_URL": "http://a"}


def test_idempotency_ttl_defaults_to_a_day():
    assert GatewayConfig.from_env({}).idempotency_ttl == 86400
    assert GatewayConfig.from_env({"PROXYMQ_IDEMPOTENCY_TTL": "60"}).idempotency_ttl == 60
    with pytest.raises(ConfigError, match="PROXYMQ_IDEMPOTENCY_TTL"):
        GatewayConfig.from_env({"PROXYMQ_IDEMPOTENCY_TTL": "0"})


def test_max_priority_declares_x_max_priority():
    config = WorkerConfig.from_env({**WORKER_ENV, "PROXYMQ_MAX_PRIORITY": "9"})
    service = config.services["a"]
    assert service.max_priority == 9
    assert service_queue(service).queue_arguments == {"x-max-priority": 9}
    assert service_queue(ServiceConfig("b", "http://b")).queue_arguments == {}


@pytest.mark.parametrize("value", ["0", "256", "-1", "high", "1.5"])
def test_a_bad_max_priority_is_one_line(value):
    with pytest.raises(ConfigError, match="PROXYMQ_MAX_PRIORITY: must be an integer from 1 to 255"):
        WorkerConfig.from_env({**WORKER_ENV, "PROXYMQ_MAX_PRIORITY": value})


def test_quorum_with_priorities_is_refused():
    env = {**WORKER_ENV, "PROXYMQ_MAX_PRIORITY": "5", "PROXYMQ_QUEUE_TYPE": "quorum"}
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env(env)
    assert str(caught.value).startswith("PROXYMQ_MAX_PRIORITY: service 'a' has a quorum queue")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("9", 9), (" 255 ", 255)])
def test_priority_header(value, expected):
    assert controls.priority([("X-ProxyMQ-Priority", value)], 255) == expected
    assert controls.priority([], 255) is None


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("3", 3), ("4", 3), ("255", 3)])
def test_a_priority_header_is_capped_at_the_allowed_maximum(value, expected):
    assert controls.priority([("X-ProxyMQ-Priority", value)], 3) == expected


@pytest.mark.parametrize("value", ["255", "high"])
def test_the_priority_header_is_ignored_when_no_priority_is_allowed(value):
    assert controls.priority([("X-ProxyMQ-Priority", value)], None) is None


@pytest.mark.parametrize("value", ["256", "-1", "+1", "1.0", "", "nine", "٣"])
def test_a_bad_priority_header_is_400(value):
    with pytest.raises(errors.GatewayError) as caught:
        controls.priority([("X-ProxyMQ-Priority", value)], 9)
    assert caught.value.status == 400


@pytest.mark.parametrize("value", ["0", "256", "nine", "-1"])
def test_a_bad_max_client_priority_is_one_line(value):
    with pytest.raises(ConfigError) as caught:
        GatewayConfig.from_env({"PROXYMQ_MAX_CLIENT_PRIORITY": value})
    assert str(caught.value).startswith("PROXYMQ_MAX_CLIENT_PRIORITY: ")
    assert "\n" not in str(caught.value)


def test_max_client_priority_is_read():
    assert GatewayConfig.from_env({}).max_client_priority is None
    assert GatewayConfig.from_env({"PROXYMQ_MAX_CLIENT_PRIORITY": "5"}).max_client_priority == 5


def test_the_priority_is_the_message_property():
    envelope = RequestEnvelope("s", "GET", "/", None, [], b"", 2**41, priority=7)
    assert task_message(envelope, "c", "r")[2]["priority"] == 7
    envelope.priority = None
    assert "priority" not in task_message(envelope, "c", "r")[2]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("Prefer", "respond-async, wait=5")], 5.0),
        ([("Prefer", "respond-async"), ("Prefer", "wait=2.5")], 2.5),
        ([("Prefer", "respond-async, wait=999")], 120.0),
        ([("Prefer", "respond-async, wait=soon")], None),
        ([("Prefer", "respond-async")], None),
    ],
)
def test_preferred_wait(headers, expected):
    assert controls.preferred_wait(headers, 120.0) == expected


def test_idempotency_key_header():
    assert controls.idempotency_key([("Idempotency-Key", '"abc"')]) == "abc"
    assert controls.idempotency_key([("Idempotency-Key", "a b")]) == "a b"
    for bad in ("", "x" * 256, "é"):
        with pytest.raises(errors.GatewayError):
            controls.idempotency_key([("Idempotency-Key", bad)])


def test_the_fingerprint_covers_method_path_query_and_body_but_not_headers():
    def envelope(method="POST", path="/p", query=None, body=b"b", headers=()):
        return RequestEnvelope("s", method, path, query, list(headers), body, 0)

    base = fingerprint(envelope())
    assert fingerprint(envelope(headers=[("traceparent", "x")])) == base
    others = [
        envelope(method="PUT"),
        envelope(path="/q"),
        envelope(query=""),
        envelope(query="a=1"),
        envelope(body=b"c"),
    ]
    assert len({base, *map(fingerprint, others)}) == 6


def test_a_claim_is_per_submitter_and_masks_the_job_id():
    alice, bob = Claim.of("alice", "k", "fp"), Claim.of("bob", "k", "fp")
    assert alice.key != bob.key
    masked = alice.mask("job-id-secret")
    assert "job-id-secret" not in masked and alice.unmask(masked) == "job-id-secret"
    assert bob.unmask(masked) != "job-id-secret"


def test_cancel_users_are_read_and_a_blank_list_is_one_line():
    assert WorkerConfig.from_env(WORKER_ENV).cancel_users is None
    env = {**WORKER_ENV, "PROXYMQ_CANCEL_USERS": "gateway, gw2"}
    assert WorkerConfig.from_env(env).cancel_users == {"gateway", "gw2"}
    with pytest.raises(ConfigError) as caught:
        WorkerConfig.from_env({**WORKER_ENV, "PROXYMQ_CANCEL_USERS": " , "})
    assert str(caught.value).startswith("PROXYMQ_CANCEL_USERS: ")


def test_the_scope_is_the_credential_and_the_cookie_and_anonymous_only_without_both():
    scopes = [
        scope("Bearer a", None),
        scope(None, "sid=a"),
        scope("Bearer a", "sid=a"),
        scope("sid=a", None),
        scope("Bearer a", ""),
        scope("Bearer b", None),
    ]
    assert len(set(scopes)) == len(scopes) - 1  # an empty cookie is no cookie
    assert scope("Bearer a", "") == scope("Bearer a", None)
    assert ANONYMOUS not in scopes and scope(None, None) == ANONYMOUS
    assert scope("Bearer a", "sid=a") == scope("Bearer a", "sid=a")


def test_an_empty_or_blank_credential_or_cookie_is_anonymous():
    for credential, cookie in [("", None), (None, ""), ("", ""), (" ", None), (None, "\t")]:
        assert scope(credential, cookie) == ANONYMOUS, (credential, cookie)


def test_a_stream_takes_unnumbered_parts_only_when_its_head_was_unnumbered():
    from gateway.streams import ENDED, OUT_OF_ORDER, Stream
    from proxymq.envelope import CHUNK, END

    older = Stream("s", "", 1024, numbered=False)  # a worker older than the numbers
    older.feed(CHUNK, "s", None, b"a")
    older.feed(END, "s", None, b"")
    assert older.state == ENDED and list(older.chunks(1)) == [b"a"]
    numbered = Stream("s", "", 1024, numbered=True)
    numbered.feed(CHUNK, "s", 1, b"a")
    numbered.feed(CHUNK, "s", None, b"b")
    assert numbered.state == OUT_OF_ORDER and list(numbered.chunks(1)) == [b"a"]
