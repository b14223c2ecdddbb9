"""Downstreams in the test process that record what they get: an HTTP one (``Downstream``)
and a raw TCP one for misbehaving at the byte level (``RawServer``)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from support.names import free_port


class RawServer:
    """A TCP server on loopback for a downstream or receiver that must misbehave at the
    byte level, which an HTTP server library would not let it do: every connection goes
    to ``answer`` in a thread of its own. Subclasses set their own state before calling
    ``__init__``, which starts accepting."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()


@dataclass
class Seen:
    method: str
    raw_uri: str
    headers: list[tuple[str, str]]
    body: bytes


class Downstream:
    """A threaded HTTP server in the test process that records every request.

    Paths pick a behaviour: ``/sleep/<s>`` waits, ``/hold`` waits until ``release`` is
    set (at most a minute), ``/status/<code>`` answers that status,
    ``/bytes/<n>`` answers n bytes with a Content-Length, ``/chunked-bytes/<n>`` chunked,
    ``/close`` drops the connection without answering, ``/health`` answers 200 or 503 as
    ``healthy`` says (and is not recorded), ``/whoami`` names the Cookie and Authorization
    it got and sets a session cookie of its own for each call; anything else echoes the
    body.
    """

    def __init__(self) -> None:
        self.healthy = True
        self.release = threading.Event()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Downstream:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def requests_for(self, correlation_id: str) -> list[Seen]:
        with self._lock:
            return [
                s for s in self.seen if dict(s.headers).get("X-Correlation-Id") == correlation_id
            ]

    def _app(self, environ, start_response):
        request = Request(environ)
        if request.path == "/health":
            return Response(status=200 if self.healthy else 503)(environ, start_response)
        body = request.get_data()
        seen = Seen(
            request.method, environ.get("REQUEST_URI", ""), list(request.headers.items()), body
        )
        with self._lock:
            self.seen.append(seen)
        parts = request.path.strip("/").split("/")
        if parts[0] == "sleep":
            time.sleep(float(parts[1]))
        elif parts[0] == "hold":
            self.release.wait(60)
        elif parts[0] == "truncate":  # promises 100 bytes, sends 5, hangs up
            sock = environ["werkzeug.socket"]
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            return []
        elif parts[0] == "close":
            environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
            environ["werkzeug.socket"].close()
            return []
        if parts[0] == "whoami":  # an answer only its caller should ever see
            who = {name: request.headers.get(name) for name in ("Cookie", "Authorization")}
            response = Response(json.dumps(who), content_type="application/json")
            response.headers.add("Set-Cookie", f"session={uuid.uuid4().hex}")
            return response(environ, start_response)
        if parts[0] in ("bytes", "chunked-bytes"):  # n bytes, with or without a length
            size = int(parts[1])
            if parts[0] == "bytes":
                return Response(b"b" * size)(environ, start_response)
            return Response(b"b" * 1000 for _ in range(size // 1000))(environ, start_response)
        status = int(parts[1]) if parts[0] == "status" else 200
        if parts[0] == "sized":  # a fixed body, so HEAD has a Content-Length to keep
            body = b"s" * 1234
        response = Response(body, status=status, content_type=request.content_type)
        response.headers["X-Echo-Method"] = request.method
        response.headers["X-Echo-Uri"] = seen.raw_uri
        response.headers.add("Set-Cookie", "first=1")
        response.headers.add("Set-Cookie", "second=2")
        return response(environ, start_response)
