"""``celery -A workers deadletters list|replay|purge <service>``: the dead-letter queue
``<service>_requests.dead`` for an operator.

A Celery sub-command (``celery.commands`` entry point, setup.cfg), so it connects with
the app's own broker settings: ``PROXYMQ_BROKER_URL`` (a ``;`` list fails over to the
next node), TLS included. Messages are read with ``basic.get`` and held unacknowledged:
what the command does not remove goes back to the queue when it closes its channel (or
dies), in its place, with nothing lost.

``replay`` publishes each copy (``workers.dead_letters``) on a confirm-mode channel
(``proxymq.confirms``), ``mandatory`` (a queue that does not exist returns it), and
acknowledges the dead letter only on the broker's ack of its copy: a command killed at
any point leaves every request in one of the two queues, and each copy published once.
A nacked copy (a queue at its ``PROXYMQ_QUEUE_MAX_LENGTH``) stops the replay; it and the
rest stay dead letters.

``purge`` prints its count and has one worker of the service add it to
``proxymq_worker_dead_letters_purged_total`` (``workers.purge_count``): this process
ends before any scrape.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator

import amqp
import click
import kombu
import redis
from kombu.message import Message

from proxymq.confirms import ACK, LOST, NACK, ConfirmTracker
from proxymq.jobs import JobStore, new_job_id
from proxymq.parsers import (
    QUEUE_SUFFIX,
    ConfigError,
    is_service_name,
    positive_int,
    positive_number,
    read,
)
from workers import dead_letters, purge_count
from workers.publisher import DEAD_SUFFIX

WINDOW = 64  # copies awaiting the broker's confirm at once
CONFIRM_WAIT = 30.0  # seconds to wait for the last confirms


def _positive_rate(ctx: click.Context, param: click.Parameter, rate: float | None) -> float | None:
    """A positive rate; ``inf`` paces nothing. ``click.FloatRange`` lets ``nan`` through,
    which no clock reading ever reaches: the replay would hold its dead letters for ever."""
    if rate is not None and not rate > 0:
        raise click.BadParameter(f"{rate} is not a positive number of messages a second")
    return rate


class Failed(click.ClickException):
    """One line on standard error, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"Error: {self.message}", err=True)


@click.group(name="deadletters")
def deadletters() -> None:
    """Inspect, replay or purge a service's dead letters (<service>_requests.dead)."""


@deadletters.command(name="list")
@click.argument("service")
@click.option("--bodies", is_flag=True, help="Also print each request (method, path, body).")
@click.pass_context
def list_command(ctx: click.Context, service: str, bodies: bool) -> None:
    """Correlation id, reason, deliveries and age of every dead letter."""
    with _connected(ctx) as connection:
        dead, _ = _dead_queue(connection, service)
        now = int(time.time() * 1000)
        click.echo("correlation_id\treason\tdeliveries\tage_s")
        for message in _messages(connection, dead):
            letter = dead_letters.describe(message.headers, message.properties)
            age = letter.age(now)
            shown = "?" if age is None else f"{age:.0f}"
            cid, reason = _printable(letter.correlation_id), _printable(letter.reason)
            click.echo(f"{cid}\t{reason}\t{letter.deliveries}\t{shown}")
            if bodies:
                click.echo(f"\t{_request_line(message)}")


@deadletters.command(name="purge")
@click.argument("service")
@click.option(
    "--older-than", type=float, default=None, help="Only those dead for more than S seconds."
)
@click.pass_context
def purge_command(ctx: click.Context, service: str, older_than: float | None) -> None:
    """Delete dead letters for good."""
    with _connected(ctx) as connection:
        dead, _ = _dead_queue(connection, service)
        if older_than is None:
            purged = connection.default_channel.queue_purge(dead)
        else:
            purged, now = 0, int(time.time() * 1000)
            for message in _messages(connection, dead):
                age = dead_letters.describe(message.headers, message.properties).age(now)
                if age is not None and age > older_than:
                    message.ack()
                    purged += 1
    click.echo(f"purged {purged} dead letters of {service}")
    if purged:
        _count_purged(ctx, service, purged)


def _count_purged(ctx: click.Context, service: str, purged: int) -> None:
    """Counted by one worker (``workers.purge_count``), after the dead queue's channel
    closed and gave back what ``--older-than`` kept. A purge no worker counted still
    succeeded: one line on standard error, and exit 0."""
    try:
        purge_count.record(ctx.obj.app, service, purged)
    except purge_count.NotCounted as exc:
        click.echo(f"not counted in proxymq_worker_dead_letters_purged_total: {exc}", err=True)


@deadletters.command(name="replay")
@click.argument("service")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N of them.")
@click.option(
    "--rate", type=float, callback=_positive_rate, default=None, help="At most R a second."
)
@click.option(
    "--as-jobs",
    is_flag=True,
    help="Store each answer as an asynchronous job (needs PROXYMQ_RESULT_URL); prints the ids.",
)
@click.pass_context
def replay_command(
    ctx: click.Context, service: str, limit: int | None, rate: float | None, as_jobs: bool
) -> None:
    """Publish dead letters to <service>_requests again, each removed once the broker
    confirmed its copy."""
    jobs = _job_settings() if as_jobs else None
    with _connected(ctx) as connection:
        dead, waiting = _dead_queue(connection, service)
        replayer = _Replayer(connection, service + QUEUE_SUFFIX, jobs)
        # At most what was dead when the run began: a copy dead-lettered again meanwhile
        # (a request that kills every worker) would otherwise be taken again, for ever.
        limit = waiting if limit is None else min(limit, waiting)
        try:
            replayer.run(dead, limit, rate)
        except (*connection.connection_errors, *connection.channel_errors) as exc:
            raise Failed(
                f"the broker connection failed ({exc!r}) after {replayer.replayed} replayed; "
                "the rest stay dead letters"
            ) from None
    click.echo(
        f"replayed {replayer.replayed} dead letters of {service}; "
        f"kept {replayer.kept} (not requests: {replayer.not_requests})"
    )
    if replayer.store_error is not None:
        raise Failed(
            f"PROXYMQ_RESULT_URL: the result store failed ({type(replayer.store_error).__name__}); "
            "the rest stay dead letters"
        )
    if replayer.refused:
        raise Failed(f"{service + QUEUE_SUFFIX} refused a copy (full?); the rest stay dead letters")


class _Replayer:
    """One replay run: takes dead letters, publishes their copies, settles each on its
    copy's confirm."""

    def __init__(
        self, connection: kombu.Connection, target: str, jobs: tuple[JobStore, int] | None
    ) -> None:
        self._connection = connection
        self._target = target
        self._jobs = jobs
        self._tracker = ConfirmTracker(connection.connection)
        self.replayed = self.kept = self.not_requests = 0
        self.refused = False
        self.store_error: redis.RedisError | None = None

    def run(self, dead: str, limit: int, rate: float | None) -> None:
        started = time.monotonic()
        if limit < 1:
            return
        for taken, message in enumerate(_messages(self._connection, dead), 1):
            try:
                self._publish(message)
            except redis.RedisError as exc:  # no job record: this one and the rest stay
                self.store_error = exc
                break
            if taken >= limit:
                break
            pace = started + taken / rate if rate else 0.0
            self._settle(lambda pace=pace: len(self._tracker) < WINDOW and time.monotonic() >= pace)
            if self.refused:
                break
        # What was published is settled either way: its dead letter removed, its job id
        # printed (a job nobody can name would be a result nobody collects).
        self._settle(lambda: not len(self._tracker), CONFIRM_WAIT)
        self.kept += len(self._tracker)  # never confirmed: they stay dead letters

    def _publish(self, message: Message) -> None:
        timeout_ms = self._jobs[1] if self._jobs else None
        try:
            copy = dead_letters.replay_of(
                message.body, message.headers, message.properties, timeout_ms
            )
        except dead_letters.NotARequest:
            self.kept += 1
            self.not_requests += 1
            return
        job_id = None
        if self._jobs is not None:
            job_id = new_job_id()
            cid = copy.properties["correlation_id"]
            self._jobs[0].create(job_id, cid, copy.request.service, "", copy.request.deadline)
        out = amqp.Message(copy.body, application_headers=copy.headers, **copy.properties)
        settled = functools.partial(self._settled, message, copy, job_id)
        self._tracker.publish(self._target, out, settled, mandatory=True)

    def _settled(
        self, message: Message, copy: dead_letters.Replay, job_id: str | None, outcome: str
    ) -> None:
        original = message.properties.get("correlation_id")
        if outcome == ACK:
            message.ack()
            self.replayed += 1
            if job_id is not None:
                new = copy.properties["correlation_id"]
                click.echo(f"job {job_id} replays {_printable(original)} as {new}")
            else:
                click.echo(f"replayed {_printable(original)}")
            return
        self.kept += 1
        if job_id is not None:  # a record left behind expires with PROXYMQ_JOB_TTL
            with contextlib.suppress(redis.RedisError):
                self._jobs[0].forget(job_id, copy.properties["correlation_id"])
        if outcome == NACK:
            self.refused = True
        elif outcome == LOST:
            raise Failed("the broker connection was lost; unconfirmed dead letters stay")
        else:  # RETURNED: no such queue
            raise Failed(f"no queue {self._target}: start a worker for it first")

    def _settle(self, done, timeout: float | None = None) -> None:
        """Read the broker's confirms until ``done()``."""
        give_up = None if timeout is None else time.monotonic() + timeout
        while not done():
            if give_up is not None and time.monotonic() > give_up:
                return
            try:
                self._connection.drain_events(timeout=0.05)
            except TimeoutError:
                continue


def _messages(connection: kombu.Connection, queue: str) -> Iterator[Message]:
    """Every message ready in ``queue`` once each, held unacknowledged: ``basic.get``
    moves past a held message, and closing the channel gives back what was not acked."""
    channel = connection.default_channel
    channel.auto_decode = False  # bodies as they are: py-amqp would decode text ones
    bound = kombu.Queue(queue, no_declare=True)(channel)
    while (message := bound.get(no_ack=False, accept=["application/x-msgpack"])) is not None:
        yield message


def _printable(text: str) -> str:
    """``text`` with control and non-ASCII characters escaped: whoever may publish to
    the dead queue chooses it, and must not forge lines or escape sequences on the
    operator's terminal."""
    return ascii(text)[1:-1]


def _request_line(message: Message) -> str:
    try:
        copy = dead_letters.replay_of(message.body, message.headers, message.properties)
    except dead_letters.NotARequest as exc:
        return _printable(f"(not a request: {exc}) {bytes(message.body)!r}")
    request = copy.request
    query = "" if request.query is None else f"?{request.query}"
    return _printable(f"{request.method} {request.path}{query} {request.body!r}")


def _dead_queue(connection: kombu.Connection, service: str) -> tuple[str, int]:
    """The dead queue's name and how many messages are ready in it now."""
    if not is_service_name(service):
        raise Failed(f"{service!r} is not a service name")
    dead = service + QUEUE_SUFFIX + DEAD_SUFFIX
    try:
        declared = connection.default_channel.queue_declare(dead, passive=True)
    except connection.channel_errors:
        raise Failed(f"no queue {dead}") from None
    return dead, declared.message_count


def _job_settings() -> tuple[JobStore, int]:
    """The result store and job deadline (ms) a replay as jobs needs, from the
    gateway's variables."""
    try:
        url = read(os.environ, "PROXYMQ_RESULT_URL", str, None)
        if url is None:
            raise ConfigError("PROXYMQ_RESULT_URL", "not set; --as-jobs stores the answers there")
        ttl = read(os.environ, "PROXYMQ_JOB_TTL", positive_int, 3600)
        timeout = read(os.environ, "PROXYMQ_JOB_TIMEOUT", positive_number, 3600.0)
    except ConfigError as error:
        raise Failed(str(error)) from None
    return JobStore(url, ttl), int(timeout * 1000)


class _connected:
    """The app's broker connection (``-A workers``), closed at the end: the channel's
    close gives back every message not acknowledged."""

    def __init__(self, ctx: click.Context) -> None:
        self._connection = ctx.obj.app.connection_for_write()

    def __enter__(self) -> kombu.Connection:
        try:
            self._connection.ensure_connection(max_retries=2)
        except Exception as exc:
            raise Failed(f"cannot reach the broker: {exc}") from None
        return self._connection

    def __exit__(self, *exc) -> None:
        try:
            self._connection.release()
        except Exception as error:  # the connection is gone: the broker requeues anyway
            print(f"closing the broker connection: {error!r}", file=sys.stderr)
