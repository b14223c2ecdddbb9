"""Fixtures for the fetcher tests: local HTTP servers, a fake resolver, a connect recorder.

Every server here listens on a loopback address; the ``loopback_only`` fixture (autouse)
fails any test whose code tries to open a connection anywhere else, so a guard bug can
never make the suite touch a real network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest


class _Handler(BaseHTTPRequestHandler):
    """Endpoints shaped for the tests; HTTP/1.0, so every answer closes its connection."""

    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # silence stderr
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        name, _, arg = parts.path.strip("/").partition("/")
        self.server.record(self.command, parts.path, self.headers.get("Cookie"))
        endpoint = getattr(self, f"_{name.replace('-', '_')}", self._missing)
        # A broken pipe means the fetcher gave up on us, as some tests intend.
        with self.server.in_flight(), contextlib.suppress(BrokenPipeError, ConnectionResetError):
            endpoint(arg, query)

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": "text/plain", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _missing(self, arg: str, query: dict[str, str]) -> None:
        self._answer(404, b"no such endpoint")

    def _ok(self, arg: str, query: dict[str, str]) -> None:
        self._answer(200, b"hello world")

    def _status(self, arg: str, query: dict[str, str]) -> None:
        self._answer(int(arg), b"status")

    def _bytes(self, arg: str, query: dict[str, str]) -> None:
        self._answer(200, b"x" * int(arg), {"Content-Type": "application/octet-stream"})

    def _stream(self, arg: str, query: dict[str, str]) -> None:
        # No Content-Length: the body ends when the connection closes (HTTP/1.0).
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"y" * int(arg))

    def _cookie(self, arg: str, query: dict[str, str]) -> None:
        self._answer(200, b"have a cookie", {"Set-Cookie": "session=secret; Path=/"})

    def _redirect(self, arg: str, query: dict[str, str]) -> None:
        self.server.stopping.wait(float(query.get("sleep", "0")))
        self._answer(int(query.get("code", "302")), b"", {"Location": query["to"]})

    def _chain(self, arg: str, query: dict[str, str]) -> None:
        hops = int(arg)
        if hops == 0:
            self._answer(200, b"end of chain")
        else:
            self._answer(302, b"", {"Location": f"/chain/{hops - 1}"})

    def _sleep(self, arg: str, query: dict[str, str]) -> None:
        self.server.stopping.wait(float(query["s"]))
        self._answer(200, b"slept")

    def _drip(self, arg: str, query: dict[str, str]) -> None:
        """One byte every ``every`` seconds, ``count`` times: never idle, never done."""
        self.send_response(200)
        self.end_headers()
        for _ in range(int(query["count"])):
            if self.server.stopping.wait(float(query["every"])):
                return
            self.wfile.write(b"z")
            self.wfile.flush()

    def _stall(self, arg: str, query: dict[str, str]) -> None:
        """After ``wait`` seconds, headers and one byte, then silence for ``s`` seconds."""
        self.server.stopping.wait(float(query.get("wait", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"a")
        self.wfile.flush()
        self.server.stopping.wait(float(query["s"]))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.stopping = threading.Event()
        self.hits: list[tuple[str, str]] = []
        self.cookies: list[str | None] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def record(self, method: str, path: str, cookie: str | None) -> None:
        with self._lock:
            self.hits.append((method, path))
            self.cookies.append(cookie)

    def in_flight(self) -> _InFlight:
        return _InFlight(self)


class _InFlight:
    """Counts requests being handled at once, to prove a batch really ran concurrently."""

    def __init__(self, server: _Server) -> None:
        self.server = server

    def __enter__(self) -> None:
        with self.server._lock:
            self.server._in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server._in_flight)

    def __exit__(self, *exc: object) -> None:
        with self.server._lock:
            self.server._in_flight -= 1


@dataclass
class LocalServer:
    """A running test server; it is listening from construction, so no waiting is needed."""

    httpd: _Server
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        self.host, self.port = self.httpd.server_address[:2]

    def url(self, path: str, host: str | None = None) -> str:
        scheme = "https" if isinstance(self.httpd.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    @property
    def hits(self) -> list[tuple[str, str]]:
        return list(self.httpd.hits)

    @property
    def cookies(self) -> list[str | None]:
        """The Cookie header of each request, in order (None when absent)."""
        return list(self.httpd.cookies)

    @property
    def max_in_flight(self) -> int:
        return self.httpd.max_in_flight


def _start(host: str, tls: ssl.SSLContext | None = None) -> tuple[LocalServer, threading.Thread]:
    httpd = _Server(host)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    return LocalServer(httpd), thread


def _stop(server: LocalServer, thread: threading.Thread) -> None:
    server.httpd.stopping.set()
    server.httpd.shutdown()
    server.httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    """A test server on 127.0.0.1."""
    server, thread = _start("127.0.0.1")
    yield server
    _stop(server, thread)


@pytest.fixture
def other_server() -> Iterator[LocalServer]:
    """A second server on 127.0.0.2 (still loopback), for "a different, refused host"."""
    server, thread = _start("127.0.0.2")
    yield server
    _stop(server, thread)


@pytest.fixture(scope="session")
def tls_certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (needs the openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    command = [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(
        command,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def tls_server(tls_certificate: tuple[Path, Path]) -> Iterator[LocalServer]:
    """A test server speaking HTTPS on 127.0.0.1 with the self-signed certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_certificate)
    server, thread = _start("127.0.0.1", context)
    yield server
    _stop(server, thread)


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record every TCP connect made in this process; fail any to a non-loopback address.

    Patched on the socket class itself, below urllib3 and the fetcher's transport, so the
    net holds even if the code under test stopped using the guarded path.
    """
    attempts: list[tuple[str, int]] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: tuple) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append((address[0], address[1]))
            host = address[0].split("%")[0]
            assert ipaddress.ip_address(host).is_loopback, f"test tried to reach {host}"
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


class FakeDNS:
    """Answers for ``*.test`` names; anything else goes to the real resolver.

    ``answers[name]`` is a list of address lists: each lookup takes the next one, the
    last one repeating, so a test can make a name change its answer (DNS rebinding).
    """

    def __init__(self) -> None:
        self.answers: dict[str, list[list[str]]] = {}
        self.lookups: dict[str, int] = {}
        self._real = socket.getaddrinfo

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if not (isinstance(name, str) and name.endswith(".test")):
            return self._real(host, port, family, type, proto, flags)
        count = self.lookups.get(name, 0)
        self.lookups[name] = count + 1
        answers = self.answers.get(name)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        addresses = answers[min(count, len(answers) - 1)]
        return [self._info(address, port) for address in addresses]

    @staticmethod
    def _info(address: str, port: int) -> tuple:
        if ":" in address:
            return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
        return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> FakeDNS:
    dns = FakeDNS()
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    return dns
