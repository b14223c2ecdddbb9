"""A private CA made with openssl at test time, and the TLS listener a private broker
serves with its certificates."""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TLSListener:
    """A TLS listener's files (PEM), whether it demands a client certificate, and the
    loopback address it listens on (any of 127.0.0.0/8, so that two nodes can have
    certificates for different addresses)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class PKI:
    """A CA and certificates it signed: ``server`` for localhost/127.0.0.1, ``evil`` for
    evil.example only, ``client`` for client authentication, ``only_127_0_0_1`` and
    ``only_127_0_0_2`` for that IP address alone (two nodes of a failover list, each
    valid for its own address only). Each is ``(cert, key)``."""

    ca: Path
    server: tuple[Path, Path]
    evil: tuple[Path, Path]
    client: tuple[Path, Path]
    only_127_0_0_1: tuple[Path, Path]
    only_127_0_0_2: tuple[Path, Path]


def make_pki(directory: Path) -> PKI:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ProxyMQ test CA")  # fmt: skip

    def leaf(name: str, subject: str, extensions: str) -> tuple[Path, Path]:
        (directory / f"{name}.ext").write_text(extensions)
        openssl("req", "-new", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-set_serial", str(uuid.uuid4().int >> 64), "-days", "2",
                "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
        return directory / f"{name}.pem", directory / f"{name}.key"

    return PKI(
        ca=directory / "ca.pem",
        server=leaf(
            "server",
            "/CN=localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        evil=leaf(
            "evil",
            "/CN=evil.example",
            "subjectAltName=DNS:evil.example\nextendedKeyUsage=serverAuth\n",
        ),
        client=leaf("client", "/CN=proxymq-client", "extendedKeyUsage=clientAuth\n"),
        only_127_0_0_1=leaf(
            "only1", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        ),
        only_127_0_0_2=leaf(
            "only2", "/CN=127.0.0.2", "subjectAltName=IP:127.0.0.2\nextendedKeyUsage=serverAuth\n"
        ),
    )
