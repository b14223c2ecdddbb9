"""A Server-Sent Events stub for the streaming benchmark: ``python bench/sse_stub.py --port 9100``.

``GET /sse?events=50&gap_ms=20`` answers ``200 text/event-stream``, chunked, and sends
``events`` events ``gap_ms`` apart (the first at once, with the head), each
``data: <n> <t>\\n\\n`` where ``t`` is ``time.monotonic_ns()`` when it was written, so a
client on the same machine can tell each event's delay from the stub's write to its own
read (CLOCK_MONOTONIC is one clock for every process). Each event is one write, with
TCP_NODELAY (asyncio's default), so nothing is held back by Nagle. Anything else: 200
``ok``. On an asyncio event loop: many streams at once cost nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from urllib.parse import parse_qs, urlsplit


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("latin-1")
            url = urlsplit(target)
            if url.path != "/sse":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                continue
            query = parse_qs(url.query)
            events = int(query.get("events", ["50"])[0])
            gap = float(query.get("gap_ms", ["20"])[0]) / 1000
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            start = time.monotonic()
            for number in range(events):
                # On a schedule (start + n x gap), so a late wake-up does not push every
                # later event back.
                await asyncio.sleep(max(0.0, start + number * gap - time.monotonic()))
                event = b"data: %d %d\n\n" % (number, time.monotonic_ns())
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(handle, host, port, backlog=1024)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
