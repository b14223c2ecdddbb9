"""The bare RPC loop: the ceiling any request/reply design can reach on this broker.

No HTTP and no Celery, only what every design must do: publish a request to a queue,
have a consumer publish a reply to ``reply_to`` with the same ``correlation_id``, and
receive it. Both ends are pure Python py-amqp, like the gateway's and workers' stack.

- ``python bench/rpc_loop.py serve --queue Q`` is the responder: it declares ``Q``
  (auto-delete, so it vanishes with the responder; not exclusive, so readiness checks
  from another connection can see it), consumes it with manual acks and a prefetch
  window, and answers each message with its own body.
- ``python bench/rpc_loop.py client --queue Q -c 16 -d 10`` keeps ``c`` requests in
  flight (closed loop: a new request for each reply) using RabbitMQ direct reply-to
  (``amq.rabbitmq.reply-to``, consumed no-ack on the channel it publishes on), and prints
  one JSON line: req/s, p50/p99 in ms, requests, errors, CPU seconds it used.

- ``python bench/rpc_loop.py serve --queue S_requests --envelope`` answers as a worker that
  costs nothing would: a ProxyMQ reply envelope (200, a ~100-byte body) to the gateway's
  reply queue. ``bench/run.py`` points the gateway at it to measure the gateway's own
  ceiling (the "gateway, no-op worker" row).

Neither end uses publisher confirms: this is the floor of broker work per request; the
gateway adds confirms and ``mandatory`` on top because it needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from urllib.parse import unquote, urlsplit

import amqp

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
BODY = b'{"id": 12345, "text": "the quick brown fox jumps over the lazy dog", "pad": "xxxxxxxxxx"}'


def connect(url: str) -> amqp.Connection:
    """A py-amqp connection from an ``amqp://user:pass@host:port/vhost`` URL."""
    parts = urlsplit(url)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    connection = amqp.Connection(
        host=f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}",
        userid=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        virtual_host=vhost,
    )
    connection.connect()
    return connection


def consumer_count(url: str, queue: str) -> int:
    """Consumers on ``queue``, or -1 when it does not exist (for readiness checks)."""
    connection = connect(url)
    try:
        _, _, consumers = connection.channel().queue_declare(queue, passive=True)
        return consumers
    except amqp.exceptions.NotFound:
        return -1
    finally:
        connection.close()


# -- responder --------------------------------------------------------------------------


def serve(url: str, queue: str, prefetch: int, envelope: bool = False) -> None:
    """Answer every request on ``queue`` until SIGTERM/SIGINT; with ``envelope``, answer
    a ProxyMQ reply envelope instead of echoing the body."""
    connection = connect(url)
    channel = connection.channel()
    channel.queue_declare(queue, durable=False, auto_delete=True)
    channel.basic_qos(0, prefetch, False)
    canned = _canned_reply() if envelope else None

    def on_request(message: amqp.Message) -> None:
        body = canned or message.body
        reply = amqp.Message(body, correlation_id=message.properties["correlation_id"])
        channel.basic_publish(reply, exchange="", routing_key=message.properties["reply_to"])
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume(queue, callback=on_request)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while running:
        try:
            connection.drain_events(timeout=0.5)
        except TimeoutError:
            continue
    connection.close()


def _canned_reply() -> bytes:
    """One reply envelope made once: a worker that spends nothing on the request."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from proxymq.envelope import ReplyEnvelope, encode_reply

    headers = [("Content-Type", "application/json")]
    return encode_reply(ReplyEnvelope(status=200, headers=headers, body=BODY))


# -- client -----------------------------------------------------------------------------


@dataclass
class LoopResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_s: float


@dataclass
class ClosedLoop:
    """``concurrency`` requests in flight; each reply sends the next request."""

    channel: amqp.Channel
    queue: str
    measure_from: float
    stop_at: float
    pending: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    unexpected: int = 0

    def send(self) -> None:
        correlation_id = uuid.uuid4().hex
        message = amqp.Message(BODY, correlation_id=correlation_id, reply_to=DIRECT_REPLY_TO)
        self.pending[correlation_id] = time.perf_counter()
        self.channel.basic_publish(message, exchange="", routing_key=self.queue)

    def on_reply(self, message: amqp.Message) -> None:
        now = time.perf_counter()
        sent = self.pending.pop(message.properties.get("correlation_id"), None)
        if sent is None:
            self.unexpected += 1
            return
        if sent >= self.measure_from:
            self.latencies.append(now - sent)
        if now < self.stop_at:
            self.send()


def run_client(
    url: str, queue: str, concurrency: int, duration: float, warmup: float
) -> LoopResult:
    """Run the closed loop; only requests sent after the warm-up are measured."""
    connection = connect(url)
    channel = connection.channel()
    start = time.perf_counter()
    loop = ClosedLoop(channel, queue, start + warmup, start + warmup + duration)
    channel.basic_consume(DIRECT_REPLY_TO, no_ack=True, callback=loop.on_reply)
    cpu_before = time.process_time()
    for _ in range(concurrency):
        loop.send()
    while loop.pending and time.perf_counter() < loop.stop_at + 10:
        try:
            connection.drain_events(timeout=1)
        except TimeoutError:
            continue
    cpu = time.process_time() - cpu_before
    connection.close()
    return summarize(loop, duration, cpu)


def summarize(loop: ClosedLoop, duration: float, cpu_s: float) -> LoopResult:
    """Throughput counts replies to requests sent inside the measured window."""
    latencies = sorted(loop.latencies)
    count = len(latencies)

    def quantile(q: float) -> float:
        return latencies[min(count - 1, int(q * count))] * 1000 if count else float("nan")

    errors = len(loop.pending) + loop.unexpected
    return LoopResult(count / duration, quantile(0.50), quantile(0.99), count, errors, cpu_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["serve", "client"])
    parser.add_argument(
        "--broker-url", default=os.environ.get("BENCH_BROKER_URL", DEFAULT_BROKER_URL)
    )
    parser.add_argument("--queue", default="bench_rpc_loop")
    parser.add_argument("--envelope", action="store_true", help="answer as a no-op worker")
    parser.add_argument("--prefetch", type=int, default=256, help="responder's prefetch window")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.role == "serve":
        serve(args.broker_url, args.queue, args.prefetch, args.envelope)
        return
    result = run_client(args.broker_url, args.queue, args.concurrency, args.duration, args.warmup)
    sys.stdout.write(json.dumps(asdict(result)) + "\n")


if __name__ == "__main__":
    main()
