"""TLS to the broker: the files named by the settings, checked at start, the options
py-amqp is given per node, and a live handshake that stops a process whose broker's
certificate does not verify.

Kept apart from the settings (``proxymq.config``) as httpx keeps its SSL context apart
from its client settings: this is the one part of the configuration that reads files and
opens connections. ``ssl`` and ``amqp`` are imported inside the functions that use them:
gunicorn's master imports this module before gevent patches the workers, and ssl
imported before the patch is not made cooperative.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from proxymq.parsers import ConfigError, broker_urls, read

if TYPE_CHECKING:
    import ssl

# ``amqps://`` verifies the broker's certificate chain and its host name. Left to itself,
# py-amqp's ``ssl=True`` (what Kombu and Celery pass for ``amqps://``) checks the chain
# against the system's CAs but not the host name, so any certificate a trusted CA signed
# for any name would do, and the PLAIN credentials would go to whoever holds it. These
# settings are turned into the options dict py-amqp's SSLTransport takes (a dict, never
# an ``ssl.SSLContext``: py-amqp silently drops anything that is not a dict). A
# ``;``-separated list gets one such dict per node, each naming its own node's host: the
# gateway passes each to that URL's connection, the workers' Celery connections rename
# the host when they fail over (``workers.failover``).

BROKER_TLS_VARIABLES = (
    "PROXYMQ_BROKER_CA_FILE",
    "PROXYMQ_BROKER_CERT_FILE",
    "PROXYMQ_BROKER_KEY_FILE",
)
AMQPS_PORT = 5671
# OpenSSL's verify codes for "the certificate does not name this host / IP address".
_NAME_MISMATCH = frozenset({62, 64})


@dataclass(frozen=True, slots=True)
class BrokerNode:
    """One URL of ``PROXYMQ_BROKER_URL``: its host, the name the node's certificate must
    be valid for, and its port."""

    host: str
    port: int = AMQPS_PORT

    @property
    def address(self) -> str:
        """``HOST:PORT`` as py-amqp takes it (an IPv6 literal in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BrokerTLS:
    """How to check the brokers of an ``amqps://`` URL or list, and how to prove who we are.

    ``nodes`` are the URLs' hosts and ports, in the list's order: each node's certificate
    is checked against its own host, never against another node's (a cluster's nodes
    usually have a certificate each). ``ca_file`` unset means the system's CAs; set, only
    that CA is trusted. ``cert_file`` and ``key_file`` (both or neither) are a client
    certificate, for a broker with ``fail_if_no_peer_cert``.
    """

    nodes: tuple[BrokerNode, ...]
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def ssl_options(self, host: str) -> dict[str, Any]:
        """The ``ssl`` argument of a Kombu connection to ``host`` (Celery's
        ``broker_use_ssl`` for the first node); only ``server_hostname`` differs by host.

        ``server_hostname`` is what makes py-amqp check the host name (and send SNI); it
        is given explicitly because Kombu rewrites ``localhost`` to ``127.0.0.1``. A new
        dict on every call, so that no two connections share one: Kombu may write into
        the dict it is given, and a shared one would carry one node's name to the others.
        """
        import ssl  # only with amqps: see the module docstring

        options: dict[str, Any] = {"server_hostname": host, "cert_reqs": ssl.CERT_REQUIRED}
        if self.ca_file is not None:
            options["ca_certs"] = self.ca_file
        if self.cert_file is not None:
            options["certfile"] = self.cert_file
            options["keyfile"] = self.key_file
        return options


def broker_tls(env: Mapping[str, str], url: str) -> BrokerTLS | None:
    """The TLS settings for broker ``url`` (already valid: a list is all ``amqps://`` or
    none), or None for plain ``amqp://``.

    The files are read and parsed here, so a missing, unreadable or wrong file stops the
    process at start with one line instead of failing every connection attempt later
    (and a pass-phrase-protected key cannot make OpenSSL prompt on a terminal). A CA or
    client certificate with a URL that is not ``amqps://`` is an error: the operator
    believes the link is encrypted and it would not be.
    """
    urls = [urlsplit(one) for one in broker_urls(url)]
    ssl_keys = [
        key
        for parts in urls
        for key, _ in parse_qsl(parts.query)
        if key == "ssl" or key.startswith("ssl_")
    ]
    if ssl_keys:
        # Kombu lets them replace the whole ssl argument, host name check included.
        raise ConfigError(
            "PROXYMQ_BROKER_URL",
            f"TLS options in the URL ({ssl_keys[0]!r}) are not supported; use amqps:// and "
            "PROXYMQ_BROKER_CA_FILE, PROXYMQ_BROKER_CERT_FILE, PROXYMQ_BROKER_KEY_FILE",
        )
    ca_file, cert_file, key_file = (read(env, name, str, None) for name in BROKER_TLS_VARIABLES)
    if urls[0].scheme != "amqps":
        for name, value in zip(BROKER_TLS_VARIABLES, (ca_file, cert_file, key_file), strict=True):
            if value is not None:
                raise ConfigError(
                    name, "is set, but PROXYMQ_BROKER_URL is not amqps://, so TLS would not be used"
                )
        return None
    if (cert_file is None) != (key_file is None):
        given, missing = "PROXYMQ_BROKER_CERT_FILE", "PROXYMQ_BROKER_KEY_FILE"
        if cert_file is None:
            given, missing = missing, given
        raise ConfigError(given, f"is set without {missing}; a client certificate needs both")
    # Imported here, not at the top: gunicorn's master imports this module before gevent
    # patches the workers, and ssl imported before the patch is not made cooperative.
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        _load_pem(
            "PROXYMQ_BROKER_CA_FILE",
            ca_file,
            "holds no PEM certificate",
            lambda: context.load_verify_locations(cafile=ca_file),
        )
    if cert_file is not None:
        _load_pem(
            "PROXYMQ_BROKER_CERT_FILE",
            cert_file,
            "holds no PEM certificate",
            lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cert_file),
        )
        _load_pem(
            "PROXYMQ_BROKER_KEY_FILE",
            key_file,
            "is not the unencrypted PEM private key of PROXYMQ_BROKER_CERT_FILE's certificate",
            lambda: context.load_cert_chain(cert_file, key_file, password=""),
        )
    nodes = tuple(BrokerNode(parts.hostname, parts.port or AMQPS_PORT) for parts in urls)
    return BrokerTLS(nodes, ca_file, cert_file, key_file)


def _load_pem(variable: str, path: str, wrong: str, load: Callable[[], None]) -> None:
    import ssl

    try:
        with open(path, "rb"):
            pass
        load()
    except ssl.SSLError:
        raise ConfigError(variable, f"{path!r} {wrong}") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path!r}: {exc.strerror}") from None


def check_broker_certificate(tls: BrokerTLS, timeout: float = 5.0) -> None:
    """Stop at start-up, with one line naming the node, if a broker's certificate does
    not verify; every node of a list that answers is checked, each against its own host.

    A TLS handshake only (py-amqp's own transport and options, no credentials sent):
    a certificate that does not verify is a configuration mistake that retrying cannot
    fix, so the process must not come up and retry forever. A node that is down or
    unreachable is not: the process starts and connects when it can, as over plain AMQP
    (and a node checked later on, at failover, is refused by that connection's own check).
    """
    for node in tls.nodes:
        _check_node(tls, node, timeout)


def _check_node(tls: BrokerTLS, node: BrokerNode, timeout: float) -> None:
    import ssl

    from amqp.transport import Transport  # here: the rest of this module needs no AMQP

    transport = Transport(node.address, connect_timeout=timeout, ssl=tls.ssl_options(node.host))
    try:
        transport.connect()
    except ssl.SSLCertVerificationError as exc:
        raise _certificate_error(tls, node, exc) from None
    except OSError:
        return  # down, unreachable, or refusing us: the process's own reconnects report it
    transport.close()


def _certificate_error(
    tls: BrokerTLS, node: BrokerNode, exc: ssl.SSLCertVerificationError
) -> ConfigError:
    """The one line for ``node``'s certificate: which setting to fix, naming the node."""
    if exc.verify_code in _NAME_MISMATCH:
        return ConfigError(
            "PROXYMQ_BROKER_URL",
            f"the broker's certificate is not valid for host {node.host!r} "
            f"({exc.verify_message}); the URL must name a host the certificate lists",
        )
    if tls.ca_file is not None:
        return ConfigError(
            "PROXYMQ_BROKER_CA_FILE",
            f"the broker's certificate at {node.address} does not verify against "
            f"{tls.ca_file!r}: {exc.verify_message}",
        )
    return ConfigError(
        "PROXYMQ_BROKER_URL",
        f"the broker's certificate at {node.address} does not verify against the system's "
        f"CAs: {exc.verify_message}; PROXYMQ_BROKER_CA_FILE names a private CA",
    )
