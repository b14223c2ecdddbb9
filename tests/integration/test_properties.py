"""Property-based tests (Hypothesis) against a running gateway, worker and downstream.

Thousands of generated requests (targets, header sets, bodies, methods) go over raw
keep-alive sockets to one real ``gunicorn gateway:app``, through RabbitMQ and one real
Celery worker, to a raw-socket downstream that records the exact bytes it received.
Each answer is checked against a model of the contract:

* never a 500, and no 5xx but the contract's own codes; never a traceback in an answer;
* every gateway error carries ``X-ProxyMQ-Error`` and the JSON ``{error, message,
  correlation_id}``, with the status and code the rules give for that request;
* a request that is served reaches the downstream with the request line, headers and
  body the rules say, and nothing reaches it for a request that is refused.

The model (``expect`` and ``downstream_view``) is the contract written out: the service
is the first path segment as sent; the rest of the target reaches the downstream byte
for byte; dot-segments may not climb above the service's root (``check_path``);
headers over ``PROXYMQ_MAX_HEADER_BYTES`` are 431, bodies over ``PROXYMQ_MAX_BODY_BYTES``
413; hop-by-hop headers, those ``Connection`` names, ``Host``, the client's
``X-Forwarded-Proto``/``-Host`` and every ``X-ProxyMQ-*`` stay behind, ``X-Forwarded-For``
gets the client's address appended. What gunicorn's parser does before the gateway sees
a request (repeated fields joined with ``,``, names with ``_`` dropped, the scheme taken
from a trusted peer's ``X-Forwarded-Proto``) is modelled as it is documented.

The run is derandomized (a fixed seed per test), so CI sees the same examples every
time; ``PROXYMQ_PROPERTY_EXAMPLES`` changes how many, ``PROXYMQ_PROPERTY_SEED`` switches
to random exploration from that seed (for local fuzzing).

What these tests found (each fixed) is kept as explicit reproducers at the end of the
module.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from support import RawServer, delete_queues, unique_service

MAX_HEADER_BYTES = 3000
MAX_BODY_BYTES = 4096
BASE_PATH = "/down/base"
CLIENT_ADDRESS = "127.0.0.1"
EXAMPLES = int(os.environ.get("PROXYMQ_PROPERTY_EXAMPLES", "3000"))
SEED = os.environ.get("PROXYMQ_PROPERTY_SEED")
SERVICE = unique_service("prop")

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
OTHER_METHODS = ("TRACE", "PROPFIND", "PURGE", "MKCOL")
RESERVED = ("healthz", "readyz", "metrics", "jobs")
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
)
# gunicorn's secure_scheme_headers: a trusted peer (127.0.0.1 is one by default) sets
# wsgi.url_scheme with them, which the gateway sends on as X-Forwarded-Proto.
SECURE_SCHEME = {
    "x-forwarded-proto": "https",
    "x-forwarded-protocol": "ssl",
    "x-forwarded-ssl": "on",
}
# Statuses above 499 the contract names (docs/reference.md), with their codes.
CONTRACT_5XX = {
    501: {"async-unavailable"},
    502: {"downstream-unavailable", "bad-reply"},
    503: {"broker-unavailable", "queue-full", "result-store-unavailable"},
    504: {"timeout"},
}


# -- the recording downstream ------------------------------------------------------------


@dataclass
class Record:
    number: int
    request_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RecordingDownstream(RawServer):
    """A raw-socket HTTP/1.1 server: records each request's exact request line, header
    lines and body, and answers 200 with ``X-Record: <n>`` to match it to the request."""

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}
        self._lock = threading.Lock()
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_PATH}/"

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def answer(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                line, *lines = head.split(b"\r\n")
                headers = [tuple(h.split(b":", 1)) for h in lines]
                headers = [(n, v.strip(b" \t")) for n, v in headers]
                lengths = [int(v) for n, v in headers if n.lower() == b"content-length"]
                length = lengths[0] if lengths else 0
                while len(buffer) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                with self._lock:
                    number = len(self.records) + 1
                    self.records[number] = Record(number, line, headers, body)
                answer = b"record %d" % number
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nX-Record: %d\r\nContent-Length: %d\r\n\r\n"
                    % (number, len(answer))
                    + (b"" if line.startswith(b"HEAD ") else answer)
                )


# -- a raw HTTP/1.1 client over keep-alive connections -----------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


class Client:
    """One keep-alive connection to the gateway, opened again when the gateway closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def exchange(self, data: bytes, method: str) -> Answer:
        for attempt in (1, 2):
            fresh = self.sock is None
            if fresh:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            try:
                self.sock.sendall(data)
                answer = self._read(method)
            except (ConnectionError, EOFError):
                self.close()
                if fresh or attempt == 2:  # not an idle keep-alive the gateway dropped
                    raise
                continue
            connection = (answer.header("Connection") or "").lower()
            if "close" in connection:
                self.close()
            return answer
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("the gateway closed the connection")
        self.buffer += chunk

    def _read(self, method: str) -> Answer:
        while True:
            while b"\r\n\r\n" not in self.buffer:
                self._fill()
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ")[1])
            headers = [tuple(part.strip() for part in h.split(":", 1)) for h in lines]
            if status >= 200:
                break  # 1xx (100 Continue): the final answer follows
        answer = Answer(status, headers, b"")
        if method == "HEAD" or status in (204, 304):
            return answer
        if "chunked" in (answer.header("Transfer-Encoding") or "").lower():
            answer.body = self._read_chunked()
        elif answer.header("Content-Length") is not None:
            answer.body = self._read_exactly(int(answer.header("Content-Length")))
        else:  # framed by the end of the connection
            try:
                while True:
                    self._fill()
            except EOFError:
                pass
            answer.body, self.buffer = self.buffer, b""
            self.close()
        return answer

    def _read_exactly(self, length: int) -> bytes:
        while len(self.buffer) < length:
            self._fill()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return data

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                self._fill()
            size_line, self.buffer = self.buffer.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while b"\r\n" not in self.buffer:
                    self._fill()
                _, self.buffer = self.buffer.split(b"\r\n", 1)  # no trailers sent to us
                return body
            body += self._read_exactly(size + 2)[:-2]


# -- the generated requests --------------------------------------------------------------


@dataclass
class Request:
    method: str
    target: str  # exactly as it goes on the request line
    headers: list[tuple[str, str]]  # name, value as written after "name:" (OWS included)
    body: bytes
    chunks: list[int] | None = None  # chunk sizes when sent chunked
    service: str = ""

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1"]
        lines += [f"{name}:{value}" for name, value in self.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.chunks is None:
            return head + self.body
        out, at = [head], 0
        for size in self.chunks:
            out.append(b"%x\r\n" % size + self.body[at : at + size] + b"\r\n")
            at += size
        out.append(b"0\r\n\r\n")
        return b"".join(out)


SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
HEX = "0123456789abcdefABCDEF"

valid_escape = st.builds(lambda a, b: f"%{a}{b}", st.sampled_from(HEX), st.sampled_from(HEX))
invalid_escape = st.sampled_from(["%", "%z", "%zz", "%g1", "%1", "%%", "%-1", "%+f"])
unicode_escaped = st.text(st.characters(codec="utf-8"), min_size=1, max_size=4).map(
    lambda s: quote(s, safe="")
)
dot_like = st.sampled_from(
    [".", "..", "%2e", "%2E", "%2e%2e", "%2E%2e", ".%2e", "%2e.", "..%2f", "..%2F", "..%5c",
     "..\\", "\\", "%5c", "%2f", "%2F", "...", ".a", "a."]
)  # fmt: skip
piece = st.one_of(
    st.text(SAFE, min_size=1, max_size=6),
    valid_escape,
    invalid_escape,
    unicode_escaped,
    dot_like,
    st.sampled_from(["\\", '"', "<", ">", "{", "}", "|", "^", "`", "[", "]"]),
)
segment = st.lists(piece, max_size=3).map("".join)
# The rest of the path after the service: "" or "/seg/seg..." (empty segments are "//").
rest_path = st.lists(segment, max_size=6).map(lambda segs: "".join("/" + s for s in segs))
query_piece = st.one_of(
    st.text(SAFE + "/?", min_size=1, max_size=6), valid_escape, invalid_escape, unicode_escaped
)
query_value = st.lists(query_piece, max_size=3).map("".join)
pair = st.tuples(st.sampled_from(["a", "b", "key", "%61", "a[]", ""]), query_value).map(
    lambda kv: f"{kv[0]}={kv[1]}" if kv[1] or kv[0] else kv[0] + "="
)
# A query, never empty: "/x?" loses its "?" (see test_an_empty_query_is_kept below).
query = st.lists(pair, min_size=1, max_size=5).map("&".join).filter(bool)


def service_names(service: str):
    others = st.one_of(
        st.sampled_from(RESERVED).map(lambda name: ("reserved", name)),
        st.from_regex(r"nq_[a-z0-9]{8}", fullmatch=True),  # valid, but no queue
        st.sampled_from(
            [
                "",
                "a" * 65,
                f"%{ord(service[0]):02x}{service[1:]}",
                service.upper() if service.upper() != service else service + "X",
                service + "%2Fx",
                service + ".",
                "..",
                "%2e%2e",
                ".",
                service + "~",
                service + "%20",
                "a:b",
                "a@b",
            ]
        ),
        st.text(SAFE + "%", min_size=1, max_size=70),
    )
    return st.integers(0, 9).flatmap(lambda i: st.just(service) if i < 7 else others)


TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VCHAR = "".join(chr(c) for c in range(0x21, 0x7F))
OBS_TEXT = "".join(chr(c) for c in range(0x80, 0x100))


def random_case(name: str):
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(
            c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True)
        )
    )


header_value = st.one_of(
    st.text(VCHAR + " \t", max_size=40),
    st.text(VCHAR + " \t" + OBS_TEXT, max_size=20),
    st.sampled_from(["", " ", "a, b", "x,y", "1.2.3.4"]),
).map(lambda v: v.strip(" \t") if v.strip(" \t") else "")
ows = st.sampled_from(["", " ", "  ", "\t", " \t"])
# Names the strategy adds itself, at most once (gunicorn refuses a repeated Host or
# Content-Type), or not at random: framing, Expect, the scheme headers, and the two
# underscored names gunicorn lets a trusted peer set (see test_script_name_...).
_NOT_RANDOM = {
    "host", "content-type", "content-length", "transfer-encoding", "expect", "connection",
    "x-proxymq-timeout", "prefer", "script_name", "path_info", *SECURE_SCHEME,
}  # fmt: skip
header_name = st.one_of(
    st.text(TOKEN, min_size=1, max_size=20),
    st.text(TOKEN, min_size=1, max_size=10).map(lambda s: "X-" + s),
    st.text(TOKEN, min_size=1, max_size=10).flatmap(lambda s: random_case("X-ProxyMQ-" + s)),
    st.sampled_from(
        ["X-ProxyMQ-Signature", "X-ProxyMQ-Deadline", "X-ProxyMQ-Delivery-Count",
         "X-Correlation-ID", "X-Forwarded-For", "X-Forwarded-Host", "Forwarded",
         "Keep-Alive", "Proxy-Authorization", "Proxy-Authenticate", "TE", "Trailer",
         "Upgrade", "Authorization", "Accept", "Accept-Encoding", "User-Agent", "Cookie",
         "X_Underscored", "x_forwarded_for"]
    ).flatmap(random_case),
).filter(lambda name: name.lower() not in _NOT_RANDOM)  # fmt: skip
TIMEOUT_VALUES = ["30", "5.5", "0", "-1", "abc", "nan", "inf", "1e9", "", "1_0", "30,30"]
PREFER_VALUES = ["respond-async", "wait=5", "Respond-Async; foo", "handling=lenient"]


@st.composite
def header_sets(draw, method: str, body: bytes, chunked: bool):
    """Header lines: random ones, the special ones, Host and framing at most once each
    (gunicorn refuses a repeated Host or Content-Type, see test_a_repeated_host_...)."""
    headers: list[tuple[str, str]] = []
    for name in draw(st.lists(header_name, max_size=12)):
        headers.append((name, draw(ows) + draw(header_value) + draw(ows)))
    names = [n for n, _ in headers]
    if draw(st.booleans()):  # a Connection header naming some of the others
        tokens = draw(
            st.lists(
                st.one_of(
                    st.sampled_from(names or ["x-foo"]).flatmap(random_case),
                    st.sampled_from(["keep-alive", "close", "X-Forwarded-For", "upgrade", "te"]),
                ),
                max_size=3,
            )
        )
        headers.append((draw(random_case("Connection")), " " + ", ".join(tokens)))
    if draw(st.integers(0, 4)) == 0:
        headers.append(
            (draw(random_case("X-ProxyMQ-Timeout")), draw(st.sampled_from(TIMEOUT_VALUES)))
        )
    if draw(st.integers(0, 19)) == 0:
        headers.append(("Prefer", draw(st.sampled_from(PREFER_VALUES))))
    if draw(st.integers(0, 5)) == 0:
        headers.append(("Expect", "100-continue"))
    # The secure-scheme headers, all saying the same scheme (a conflict is gunicorn's 400).
    https = draw(st.booleans())
    for name in draw(st.lists(st.sampled_from(sorted(SECURE_SCHEME)), max_size=2, unique=True)):
        value = SECURE_SCHEME[name] if https else draw(st.sampled_from(["http", "off", "no", ""]))
        headers.append((draw(random_case(name)), " " + value))
    if draw(st.booleans()):  # big values, to cross the header limits now and then
        size = draw(st.integers(500, 3200))
        headers.append((draw(header_name), " " + "v" * size))
    if draw(st.integers(0, 9)):
        headers.append(
            (
                draw(random_case("Host")),
                " " + draw(st.sampled_from(["gw.example", "a:1", "[::1]:80", ""])),
            )
        )
    if draw(st.integers(0, 3)) == 0:
        headers.append(
            (
                "Content-Type",
                " "
                + draw(st.sampled_from(["application/json", "text/plain; charset=utf-8", "x/y"])),
            )
        )
    if chunked:
        headers.append(("Transfer-Encoding", " chunked"))
    elif body or (method in ("POST", "PUT", "PATCH") and draw(st.booleans())):
        headers.append(("Content-Length", f" {len(body)}"))
    return draw(st.permutations(headers))


@st.composite
def requests(draw, service: str):
    method = draw(st.sampled_from(METHODS + METHODS + OTHER_METHODS))
    name = draw(service_names(service))
    reserved = isinstance(name, tuple)
    if reserved:  # "/healthz/x/y...": never one of the gateway's own routes
        name = name[1]
    rest = ("/x/y" if reserved else "") + draw(rest_path)
    target = "/" + name + rest
    if draw(st.booleans()):
        target += "?" + draw(query)
    if draw(st.integers(0, 19)) == 0:  # absolute-form
        target = "http://gw.example" + target
    elif draw(st.integers(0, 9)) == 0:  # a fragment: passed on as sent, like the rest
        target += "#" + draw(query_value)
    body = draw(
        st.one_of(
            st.just(b""),
            st.binary(max_size=200),
            st.binary(min_size=MAX_BODY_BYTES - 2, max_size=MAX_BODY_BYTES + 2),
        )
    )
    chunked = bool(body) and draw(st.booleans())
    chunks = None
    if chunked:
        cuts = (
            sorted(draw(st.lists(st.integers(1, len(body) - 1), max_size=3, unique=True)))
            if len(body) > 1
            else []
        )
        bounds = [0, *cuts, len(body)]
        chunks = [b - a for a, b in itertools.pairwise(bounds)]
    headers = draw(header_sets(method, body, chunked))
    return Request(method, target, headers, body, chunks, service)


# -- the model -----------------------------------------------------------------------------


@dataclass
class Expected:
    status: int  # 200: served by the downstream
    code: str | None = None
    scheme: str = "http"
    environ_headers: list[tuple[str, str]] = field(default_factory=list)


def parsed_headers(request: Request) -> tuple[list[tuple[str, str]], str, dict]:
    """The headers as the gateway reads them from the WSGI environment, the scheme, and
    the limits of gunicorn's parser: the header lines' bytes in all (CRLFs included; one
    line may use the whole limit), and the number of fields."""
    environ: dict[str, str] = {}
    scheme = "http"
    block = 0
    for name, raw in request.headers:
        block += len(name) + 1 + len(raw) + 2
        value = raw.strip(" \t")
        upper = name.upper()
        if upper.lower() in SECURE_SCHEME:
            scheme = "https" if value == SECURE_SCHEME[upper.lower()] else "http"
        if "_" in upper:
            continue  # gunicorn's header_map = "drop"
        if upper in ("CONTENT-TYPE", "CONTENT-LENGTH"):
            environ[upper.replace("-", "_")] = value
            continue
        key = "HTTP_" + upper.replace("-", "_")
        environ[key] = environ[key] + "," + value if key in environ else value
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        else:
            headers.append(({"CONTENT_TYPE": "Content-Type"}.get(key, "Content-Length"), value))
    limits = {"block": block, "fields": len(environ)}
    return headers, scheme, limits


def first(headers, name):
    values = [v for n, v in headers if n.lower() == name]
    return values[0] if values else None


def rest_of(target: str) -> tuple[str, str, str]:
    """service, rest of the path, and query of a target, as the contract reads them."""
    if not target.startswith("/"):
        target = target[target.index("/", len("http://")) :]
    path, _, query_string = target.partition("?")
    cut = path.find("/", 1)
    if cut < 0:
        return path[1:], "/", query_string
    return path[1:cut], path[cut:], query_string


def climbs(path: str) -> bool:
    depth = 0
    for part in unquote(path).replace("\\", "/").split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def expect(request: Request, service: str) -> Expected:
    headers, scheme, limits = parsed_headers(request)
    if limits["block"] > MAX_HEADER_BYTES or limits["fields"] > 100:
        return Expected(431, "headers-too-large")  # at gunicorn's parser
    name, rest, _ = rest_of(request.target)
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) or name in RESERVED:
        return Expected(404, "unknown-service")
    if climbs(rest):
        return Expected(400, "bad-request")
    if request.method not in METHODS:
        return Expected(405, "method-not-allowed")
    if sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEADER_BYTES:
        return Expected(431, "headers-too-large")
    prefer = ",".join(v for n, v in headers if n.lower() == "prefer").lower()
    if "respond-async" in {p.split(";")[0].strip() for p in prefer.split(",")}:
        return Expected(501, "async-unavailable")  # no PROXYMQ_RESULT_URL
    timeout = first(headers, "x-proxymq-timeout")
    if timeout is not None:
        try:
            seconds = float(timeout)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:
            return Expected(400, "bad-request")
    if len(request.body) > MAX_BODY_BYTES:
        return Expected(413, "body-too-large")
    if name != service:  # a valid name without a queue: the broker returns the message
        return Expected(404, "unknown-service")
    return Expected(200, None, scheme, headers)


def downstream_view(request: Request, expected: Expected, correlation_id: str, port: int):
    """The request line and headers (lower-case name -> value) the downstream must see."""
    _, rest, query_string = rest_of(request.target)
    target = BASE_PATH + rest + ("?" + query_string if query_string else "")
    line = f"{request.method} {target} HTTP/1.1"
    headers = expected.environ_headers
    drop = set(HOP_BY_HOP) | {"host", "x-forwarded-proto", "x-forwarded-host"}
    for n, v in headers:
        if n.lower() == "connection":
            drop.update(t.strip().lower() for t in v.split(","))
    kept = [
        (n.lower(), v)
        for n, v in headers
        if n.lower() not in drop and not n.lower().startswith("x-proxymq-")
    ]
    chain = [v for n, v in kept if n == "x-forwarded-for"] + [CLIENT_ADDRESS]
    kept = [
        (n, v)
        for n, v in kept
        if n not in ("x-forwarded-for", "x-correlation-id", "content-length")
    ]
    kept += [("x-forwarded-for", ", ".join(chain)), ("x-forwarded-proto", expected.scheme)]
    host = first(headers, "host")
    if host:
        kept.append(("x-forwarded-host", host))
    kept += [("x-correlation-id", correlation_id), ("x-proxymq-delivery-count", "1")]
    if request.body or request.method in ("POST", "PUT", "PATCH"):
        kept.append(("content-length", str(len(request.body))))
    kept.append(("host", f"127.0.0.1:{port}"))
    return line, kept


# -- the checks ------------------------------------------------------------------------------


def check(client: Client, downstream: RecordingDownstream, request: Request) -> None:
    expected = expect(request, request.service)
    event(f"{expected.status} {expected.code or ''}".strip())
    before = downstream.count()
    answer = client.exchange(request.wire(), request.method)
    code = answer.header("X-ProxyMQ-Error")
    context = f"request {request.wire()[:3000]!r}\nanswer {answer}"

    assert answer.status != 500, context
    if answer.status >= 500:
        assert code in CONTRACT_5XX.get(answer.status, ()), context
    assert b"Traceback" not in answer.body, context
    if answer.status >= 400:
        assert code, context
        if request.method != "HEAD":
            error = json.loads(answer.body)
            assert set(error) == {"error", "message", "correlation_id"}, context
            assert error["error"] == code, context
    assert (answer.status, code) == (expected.status, expected.code), context

    if expected.status != 200:
        assert downstream.count() == before, context  # nothing reached it
        return
    record = downstream.records[int(answer.header("X-Record"))]
    assert downstream.count() == before + 1, context
    correlation_id = answer.header("X-Correlation-ID")
    line, headers = downstream_view(request, expected, correlation_id, downstream.port)
    assert record.request_line == line.encode("latin-1"), context
    seen = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in record.headers]
    deadline = [v for n, v in seen if n == "x-proxymq-deadline"]
    assert len(deadline) == 1 and deadline[0].isdigit(), context
    seen = [(n, v) for n, v in seen if n != "x-proxymq-deadline"]
    assert sorted(seen) == sorted(headers), context
    assert record.body == request.body, context
    if request.method != "HEAD":
        assert answer.body == b"record %d" % record.number, context


# -- the stack -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording():
    server = RecordingDownstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(stack, recording):
    stack.worker(SERVICE, recording.url)
    gateway = stack.gateway(
        PROXYMQ_MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        PROXYMQ_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        PROXYMQ_REPLY_TIMEOUT="30",
    )
    client = Client(int(gateway.url.rsplit(":", 1)[1]))
    yield client
    client.close()
    delete_queues(f"{SERVICE}_requests")


def _settings(test, examples=EXAMPLES):
    test = settings(
        max_examples=examples,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )(test)
    return seed(int(SEED))(test) if SEED is not None else test


@pytest.mark.timeout(600)
@_settings
@given(batch=st.lists(requests(SERVICE), min_size=1, max_size=3))
def test_every_request_is_answered_by_the_rules(client, recording, batch):
    """One to three requests an example, one after the other on a keep-alive connection."""
    for request in batch:
        check(client, recording, request)


# -- requests gunicorn's parser refuses, and other hostile bytes -----------------------------

hostile_header = st.one_of(
    st.tuples(st.sampled_from(["Host", "Content-Type", "X-Forwarded-Proto"]), header_value),
    st.tuples(st.just("Content-Length"), st.sampled_from(
        ["1", "-1", "0x10", "1, 1", "99999999999999999999", "", "+1"]
    )),
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from(
        ["chunked", "gzip", "chunked, gzip", "gzip, chunked", "identity", "chunked, chunked",
         "1", "x-unknown"]
    )),
    st.tuples(st.sampled_from(["Expect", "X-Forwarded-Ssl"]), st.sampled_from(
        ["100-continue", "foo", "on", "off", ""]
    )),
    st.tuples(st.text(TOKEN + " ()<>@,;\\\"/[]?={}", min_size=1, max_size=12), header_value),
    st.tuples(header_name, st.text(st.characters(max_codepoint=0xFF), max_size=12)),
)  # fmt: skip
hostile_target = st.one_of(
    st.builds(lambda r: "/" + SERVICE + r, rest_path),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30).map(
        lambda t: "/" + SERVICE + "/" + t
    ),
    st.sampled_from(["*", "http:", "x/y", "//", "http://[::1/x", "/" + SERVICE + "/" + "a" * 5000]),
)  # fmt: skip


@st.composite
def hostile_requests(draw):
    method = draw(st.sampled_from([*METHODS, "get", "CONNECT", "G\x00T", "X" * 30]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.12"]))
    lines = [f"{method} {draw(hostile_target)} {version}"]
    lines += [f"{n}:{v}" for n, v in draw(st.lists(hostile_header, max_size=6))]
    body = draw(st.binary(max_size=50))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def raw_answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.mark.timeout(300)
@functools.partial(_settings, examples=max(1, EXAMPLES // 10))
@given(data=hostile_requests())
def test_hostile_bytes_never_get_a_500_or_a_traceback(client, data):
    """Malformed requests, most of which gunicorn's parser refuses: whoever answers, the
    answer is never a 500 and never a traceback (no X-ProxyMQ-Error is asked of the
    parser's own answers here: see test_the_parsers_refusals_are_gateway_errors)."""
    answer = raw_answer(client.port, data)
    for status in re.findall(rb"^HTTP/1\.[01] (\d{3})", answer, re.MULTILINE):
        assert int(status) != 500, (data, answer)
        if int(status) >= 500:
            assert re.search(rb"X-ProxyMQ-Error: (\S+)", answer), (data, answer)
    assert b"Traceback" not in answer, (data, answer)


# -- findings: reproducers of rules these tests found broken -------------------------------


def served_target(client: Client, recording: RecordingDownstream, target: str) -> bytes:
    answer = client.exchange(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode(), "GET")
    assert answer.status == 200, answer
    return recording.records[int(answer.header("X-Record"))].request_line


@pytest.mark.parametrize("form", ["origin", "absolute"])
def test_an_empty_query_is_kept(client, recording, form):
    target = ("http://gw.example" if form == "absolute" else "") + f"/{SERVICE}/x?"
    assert served_target(client, recording, target) == f"GET {BASE_PATH}/x? HTTP/1.1".encode()


def test_a_fragment_in_origin_form_reaches_the_downstream_as_sent(client, recording):
    target = f"/{SERVICE}/x?a=1#frag"
    assert served_target(client, recording, target) == b"GET /down/base/x?a=1#frag HTTP/1.1"


def test_a_fragment_in_absolute_form_reaches_the_downstream_as_sent(client, recording):
    target = f"http://gw.example/{SERVICE}/x?a=1#frag"
    assert served_target(client, recording, target) == b"GET /down/base/x?a=1#frag HTTP/1.1"


@pytest.mark.parametrize("name", ["SCRIPT_NAME", "PATH_INFO"])
def test_a_script_name_or_path_info_header_is_an_ordinary_dropped_header(client, recording, name):
    # gunicorn would take these from a "trusted" peer (127.0.0.1) as the WSGI values:
    # a SCRIPT_NAME not fitting the path was a 500, one that fit reached the downstream.
    answer = client.exchange(
        f"GET /{SERVICE}/x HTTP/1.1\r\nHost: a\r\n{name}: /zzz\r\n\r\n".encode(), "GET"
    )
    assert answer.status == 200, answer
    record = recording.records[int(answer.header("X-Record"))]
    assert record.request_line == f"GET {BASE_PATH}/x HTTP/1.1".encode()
    assert not any(b"zzz" in value for _, value in record.headers)


@pytest.mark.parametrize(
    "line, fields, status",
    [
        ("GET /{}/" + "a" * 5000, "", b"414"),
        ("GET /{}/x", "Host: b\r\n", b"400"),
        ("GET /{}/x", "Content-Type: a\r\nContent-Type: b\r\n", b"400"),
        ("GET /{}/x", "X-Forwarded-Proto: https\r\nX-Forwarded-Ssl: off\r\n", b"400"),
        ("GET /{}/x", "Expect: foo\r\n", b"417"),
        ("POST /{}/x", "Content-Length: 1\r\nContent-Length: 1\r\n", b"400"),
        ("POST /{}/x", "Transfer-Encoding: gzip\r\n", b"400"),
        ("POST /{}/x", "Transfer-Encoding: 1\r\n", b"400"),
        ("GET /{}/x", "Bad Name: x\r\n", b"400"),
        ("GET /{}/x", "X-A: a\r\n folded\r\n", b"400"),
        ("GET /{}/\u00e9", "", b"400"),
        ("GET /{}/x", "X-A: a\r\n" * 100, b"431"),
        ("GET /{}/x", f"X-A: {'a' * 1600}\r\nX-B: {'b' * 1600}\r\n", b"431"),
    ],
    ids=[
        "target-over-4094", "repeated-host", "repeated-content-type", "contradictory-scheme",
        "expect-other", "repeated-content-length", "transfer-encoding-gzip",
        "transfer-encoding-unknown",
        "bad-header-name", "obsolete-folding", "raw-utf8-in-target",
        "over-100-fields", "fields-over-the-limit-in-total",
    ],
)  # fmt: skip
def test_the_parsers_refusals_are_gateway_errors(client, line, fields, status):
    head = f"{line.format(SERVICE)} HTTP/1.1\r\nHost: a\r\n{fields}\r\n"
    answer = raw_answer(client.port, head.encode())
    first, _, body = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 " + status), answer
    assert b"X-ProxyMQ-Error: " in first, answer
    error = json.loads(body)
    assert set(error) == {"error", "message", "correlation_id"}
    # Every gateway error carries a correlation id (SPEC), the parser's too.
    assert str(uuid.UUID(error["correlation_id"])) == error["correlation_id"], error
    assert f"X-Correlation-ID: {error['correlation_id']}".encode() in first.split(b"\r\n")
