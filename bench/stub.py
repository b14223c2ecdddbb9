"""A fast stub downstream for the benchmark: ``python bench/stub.py --port 9000``.

The stub must cost as little as possible so the benchmark measures ProxyMQ, not the
service behind it. It is a hand-written HTTP/1.1 keep-alive server on a bare asyncio
``Protocol``: on one core it answers several times more requests per second than
``gevent.pywsgi`` (which parses into a WSGI environ and runs a greenlet per connection),
see bench/README.md. It understands only what the benchmark sends: ``Content-Length``
bodies, keep-alive, pipelining; chunked bodies are refused with 501.

Every answer is 200 echoing the request body (or a small JSON body when it is empty).

With ``--cost-ms`` / ``--cost-per-item-ms`` it becomes a *cost model* of a batch-capable
service such as a GPU model server: calls are served one at a time (a lock) and each costs
``cost_ms + cost_per_item_ms * items`` of wall time (a single call is one item).
``POST /batch`` then follows SPEC.md's batch contract. ``GET /_stub/stats`` (never
costed) reports the calls served, so a benchmark can check whether batching happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, field

MAX_HEAD_BYTES = 64 * 1024
EMPTY_BODY_ANSWER = b'{"ok":true}'
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 501: "Not Implemented"}


class BadRequest(Exception):
    """The bytes received are not a request this stub handles; answer and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True, slots=True)
class Response:
    status: int = 200
    body: bytes = EMPTY_BODY_ANSWER
    content_type: str = "application/json"


@dataclass
class Stats:
    """What the stub has served; ``items`` counts single calls as one item each."""

    calls: int = 0
    batch_calls: int = 0
    items: int = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {"calls": self.calls, "batch_calls": self.batch_calls, "items": self.items}
        ).encode()


# -- parsing ----------------------------------------------------------------------------


class RequestParser:
    """Incremental HTTP/1.1 request parser over one connection's bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_request(self) -> Request | None:
        """The next complete request, or None until more bytes arrive."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise BadRequest(400, "request head too large")
            return None
        method, target, version, headers = _parse_head(bytes(self.buffer[:end]))
        if "chunked" in headers.get("transfer-encoding", ""):
            raise BadRequest(501, "chunked request bodies are not supported")
        length = _content_length(headers)
        start = end + 4
        if len(self.buffer) < start + length:
            return None
        body = bytes(self.buffer[start : start + length])
        del self.buffer[: start + length]
        return Request(method, target, headers, body, _keep_alive(version, headers))


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400, "malformed request line") from None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return method, target, version, headers


def _content_length(headers: dict[str, str]) -> int:
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise BadRequest(400, "malformed Content-Length") from None
    if length < 0:
        raise BadRequest(400, "negative Content-Length")
    return length


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


def serialize(response: Response, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    return head.encode("latin-1") + b"\r\n" + response.body


# -- behaviours -------------------------------------------------------------------------


def echo(request: Request) -> Response:
    content_type = request.headers.get("content-type", "application/octet-stream")
    if not request.body:
        return Response()
    return Response(200, request.body, content_type)


@dataclass
class EchoService:
    """The fast mode: answers at once, in the event loop's callback, with no task."""

    stats: Stats = field(default_factory=Stats)

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        if request.path == "/_stub/stats":
            return Response(200, self.stats.as_json())
        self.stats.calls += 1
        self.stats.items += 1
        return echo(request)


@dataclass
class CostModelService:
    """One call at a time, each costing wall time like a model server's forward pass.

    The lock is FIFO (asyncio.Lock), so callers are served in arrival order.
    """

    cost_ms: float
    cost_per_item_ms: float
    stats: Stats = field(default_factory=Stats)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        if request.path == "/_stub/stats":
            return Response(200, self.stats.as_json())
        return self._serve(request)

    async def _serve(self, request: Request) -> Response:
        is_batch = request.method == "POST" and request.path == "/batch"
        try:
            items = json.loads(request.body) if is_batch else None
        except ValueError:
            return Response(400, b'{"error":"batch body is not JSON"}')
        if is_batch and not isinstance(items, list):
            return Response(400, b'{"error":"batch body is not a JSON array"}')
        count = len(items) if items is not None else 1
        async with self.lock:
            await asyncio.sleep((self.cost_ms + self.cost_per_item_ms * count) / 1000)
            self.stats.calls += 1
            self.stats.batch_calls += is_batch
            self.stats.items += count
        if items is None:
            return echo(request)
        return Response(200, json.dumps([batch_answer(item) for item in items]).encode())


def batch_answer(item: dict) -> dict:
    """One item's answer per SPEC.md: same correlation id, its body echoed back."""
    content_type = (item.get("headers") or {}).get("content-type", "application/octet-stream")
    answer = {
        "correlation_id": item.get("correlation_id"),
        "status": 200,
        "headers": {"content-type": content_type},
    }
    if "body_base64" in item:
        answer["body_base64"] = item["body_base64"]
    else:
        answer["body"] = item.get("body")
    return answer


# -- the server -------------------------------------------------------------------------


class StubProtocol(asyncio.Protocol):
    """One connection. Answers are sent in request order: while an answer is pending
    (cost-model mode), reading pauses and later pipelined requests wait in the buffer."""

    def __init__(self, service: EchoService | CostModelService) -> None:
        self.service = service
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        if not self.busy:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self.transport is not None and not self.transport.is_closing():
            try:
                request = self.parser.next_request()
            except BadRequest as error:
                self._send(Response(error.status, str(error).encode(), "text/plain"), False)
                return
            if request is None:
                return
            answer = self.service.handle(request)
            if isinstance(answer, Response):
                self._send(answer, request.keep_alive)
                continue
            self.busy = True
            self.transport.pause_reading()
            task = asyncio.ensure_future(answer)
            task.add_done_callback(lambda done, r=request: self._finish(done, r.keep_alive))
            return

    def _finish(self, task: asyncio.Future, keep_alive: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self._send(task.result(), keep_alive)
        self.transport.resume_reading()
        self._serve_buffered()

    def _send(self, response: Response, keep_alive: bool) -> None:
        assert self.transport is not None
        self.transport.write(serialize(response, keep_alive))
        if not keep_alive:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, service: EchoService | CostModelService) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(lambda: StubProtocol(service), host, port, backlog=1024)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--cost-ms", type=float, default=None, help="cost-model mode")
    parser.add_argument("--cost-per-item-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    cost_model = args.cost_ms is not None or args.cost_per_item_ms > 0

    async def run() -> None:
        service = (
            CostModelService(args.cost_ms or 0.0, args.cost_per_item_ms)
            if cost_model
            else EchoService()
        )
        await serve(args.host, args.port, service)

    asyncio.run(run())


if __name__ == "__main__":
    main()
