"""Celery's broker connections, failing over an ``amqps://`` list with each node's name.

Celery hands every connection of the app the one ``broker_use_ssl`` dict, which names
the first node's host (``proxymq.config.BrokerTLS.ssl_options``). On failover Kombu's
``Connection.switch()`` re-reads the parameters the connection was built with, that dict
included, so every other node's certificate would be checked against the first node's
name and refused. Kombu's documented way out, ``server_hostname=None``, does not hold:
``kombu.transport.pyamqp.Transport.establish_connection`` writes the first host it
connects to into that dict, which ``switch()`` then reuses for the next node (and it
fills in ``127.0.0.1`` for ``localhost``).

So the app's connections give themselves, after each switch, a fresh copy of the dict
naming the host they now point at. Only the name changes: the CA and client certificate
are the same for every node. Celery builds every broker connection (the consumer's,
Flower's, the one its pools are made from) as ``app.amqp.Connection``, whose class
``Celery(amqp=AMQP)`` sets. Kombu's pool (``app.pool``, under the producer pool, remote
control and Flower's inspect) makes its connections as ``PooledConnection`` whatever the
class of the one it was made from, so ``Pool()`` is overridden too.
"""

from __future__ import annotations

import kombu
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.connection import ConnectionPool, PooledConnection


class NodeNamingConnection(kombu.Connection):
    """A ``kombu.Connection`` whose TLS host name check follows it from node to node."""

    def switch(self, conn_str: str) -> None:
        """Point at ``conn_str`` (a URL of the list), checked against its own host.

        A new dict, never the shared one changed in place: the app's other connections
        (and ``_initial_params``, which the next switch starts from) keep theirs.
        """
        super().switch(conn_str)
        if isinstance(self.ssl, dict) and "server_hostname" in self.ssl:
            self.ssl = {**self.ssl, "server_hostname": self.hostname}

    def Pool(self, limit: int | None = None, **kwargs) -> ConnectionPool:
        """Kombu's connection pool, handing out connections that name their node too."""
        return _NodeNamingPool(self, limit, **kwargs)


class _PooledNodeNamingConnection(PooledConnection, NodeNamingConnection):
    """What Kombu's pool hands out (replaced in the pool after an error), node-naming."""


class _NodeNamingPool(ConnectionPool):
    def new(self) -> _PooledNodeNamingConnection:
        """As Kombu's ``ConnectionPool.new``, with the node-naming class."""
        return _PooledNodeNamingConnection(self, **dict(self.connection._info(resolve=False)))


class AMQP(CeleryAMQP):
    """Celery's AMQP helpers with ``NodeNamingConnection`` as the connection class."""

    Connection = NodeNamingConnection
