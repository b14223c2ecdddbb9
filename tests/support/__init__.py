"""The tests' harness (also the benchmark's): real processes, downstreams that record,
the broker (shared, private, clustered), a private CA, and awaiting conditions.

Tests import from here (``from support import Stack, wait_for``); the modules say where
each piece lives: ``processes``, ``downstreams``, ``broker``, ``pki``, ``cluster``,
``metrics``, ``names``, ``waiting``. ``tests/`` is on ``sys.path`` through pytest's
``pythonpath`` (pyproject.toml); bench/ scripts put it there themselves.
"""

from support.broker import (
    BROKER_URL,
    PrivateBroker,
    TaskEventsTap,
    broker_user,
    consumers,
    delete_queues,
    queue_counts,
    queue_exists,
)
from support.cluster import ClusterNode, PrivateCluster
from support.downstreams import Downstream, RawServer, Seen
from support.metrics import Scrape
from support.names import free_port, unique_service
from support.pki import PKI, TLSListener, make_pki
from support.processes import (
    BIN,
    ROOT,
    Gateway,
    Process,
    Stack,
    StartError,
    await_ready,
    base_env,
    poll_until_done,
    running_stack,
)
from support.waiting import NOT_YET, wait_for

__all__ = [
    "BIN",
    "BROKER_URL",
    "NOT_YET",
    "PKI",
    "ROOT",
    "ClusterNode",
    "Downstream",
    "Gateway",
    "PrivateBroker",
    "PrivateCluster",
    "Process",
    "RawServer",
    "Scrape",
    "Seen",
    "Stack",
    "StartError",
    "TLSListener",
    "TaskEventsTap",
    "await_ready",
    "base_env",
    "broker_user",
    "consumers",
    "delete_queues",
    "free_port",
    "make_pki",
    "poll_until_done",
    "queue_counts",
    "queue_exists",
    "running_stack",
    "unique_service",
    "wait_for",
]
