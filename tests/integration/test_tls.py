"""TLS to the broker: amqps:// checks the certificate and host name (issue: hostile networks).

Each test runs the real processes against private RabbitMQ nodes with a TLS listener and
certificates from a CA made here with openssl. "System CAs" are simulated with
``SSL_CERT_FILE``, which OpenSSL reads as the default trust store: a certificate signed
by a CA the system trusts, but for another host, is the attack the host name check stops.
"""

import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import amqp
import kombu
import pytest
import requests
from support import (
    BIN,
    ROOT,
    PrivateBroker,
    TLSListener,
    base_env,
    free_port,
    make_pki,
    unique_service,
    wait_for,
)

GATEWAY = ["gunicorn", "gateway:app"]
WORKER = ["celery", "-A", "workers", "worker", "-Q", "svc_requests"]


@pytest.fixture(scope="module")
def pki():
    directory = Path(tempfile.mkdtemp(prefix="proxymq-pki-"))
    yield make_pki(directory)
    shutil.rmtree(directory)


def _broker(pki, leaf, require_client_cert=False):
    broker = PrivateBroker(tls=TLSListener(pki.ca, *leaf, require_client_cert))
    broker.start()
    return broker


@pytest.fixture
def two_nodes(pki):
    """Two independent TLS nodes, each with a certificate valid only for its own address:
    127.0.0.1 for the first, 127.0.0.2 (also loopback) for the second. Started together,
    to halve the wait."""
    nodes = [
        PrivateBroker(tls=TLSListener(pki.ca, *pki.only_127_0_0_1, host="127.0.0.1")),
        PrivateBroker(tls=TLSListener(pki.ca, *pki.only_127_0_0_2, host="127.0.0.2")),
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(PrivateBroker.start, nodes))
        yield nodes
    finally:
        for node in nodes:
            node.remove()


@pytest.fixture(scope="module")
def tls_broker(pki):
    broker = _broker(pki, pki.server)
    yield broker
    broker.remove()


@pytest.fixture(scope="module")
def evil_broker(pki):
    """A broker whose certificate, signed by the same CA, names only evil.example."""
    broker = _broker(pki, pki.evil)
    yield broker
    broker.remove()


@pytest.fixture(scope="module")
def mtls_broker(pki):
    broker = _broker(pki, pki.server, require_client_cert=True)
    yield broker
    broker.remove()


def run_to_exit(args, timeout=30, **env):
    """Run a process that should stop by itself; one still running after ``timeout`` is
    the failure (it accepted what it should have refused)."""
    env.setdefault("PROXYMQ_DOWNSTREAM_URL", "http://127.0.0.1:9")
    env.setdefault("PROXYMQ_WORKER_METRICS_PORT", str(free_port()))
    env.setdefault("PROXYMQ_GATEWAY_BIND", f"127.0.0.1:{free_port()}")
    try:
        result = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            cwd=ROOT,
            env=base_env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace")[-2000:]
        raise AssertionError(f"{args[0]} still running after {timeout}s:\n{output}") from None
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return result.returncode, lines


def run_app_script(script: str, env: dict) -> subprocess.CompletedProcess:
    """Run ``script`` in a Python of the venv, as Flower and the other celery commands
    use the workers' app: its settings at import, without a worker's start-up."""
    return subprocess.run(
        [str(BIN / "python"), "-c", script],
        cwd=ROOT,
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def post(gateway, service, path, body=b"x", **kwargs):
    return requests.post(f"{gateway.url}/{service}{path}", data=body, timeout=15, **kwargs)


def end_to_end(stack, downstream, env):
    """A worker and a gateway on ``env``'s broker; a request must come back echoed."""
    service = unique_service("tls")
    worker = stack.worker(service, downstream.url, wait=False, **env)
    gateway = stack.gateway(**env)
    wait_for(lambda: post(gateway, service, "/x").status_code == 200, 30, "first answer")
    answer = post(gateway, service, "/over/tls", b"secret")
    assert (answer.status_code, answer.content) == (200, b"secret"), (
        f"{answer.status_code} {answer.text}\n{gateway.process.log()[-3000:]}\n"
        f"{worker.log()[-3000:]}"
    )
    return gateway, worker


def consumers_on(broker, queue):
    """Consumers of ``queue`` on a private node (over its plain listener)."""
    with kombu.Connection(broker.url) as connection:
        return connection.default_channel.queue_declare(queue, passive=True)[2]


def await_answer(gateway, service, what, *processes, timeout=90):
    """Wait until a request is answered, echoed; else fail with the processes' logs."""
    try:
        wait_for(lambda: post(gateway, service, "/x").status_code == 200, timeout, what)
    except TimeoutError as exc:
        logs = "\n".join(process.log()[-3000:] for process in processes)
        raise AssertionError(f"{exc}\n{logs}") from None
    answer = post(gateway, service, "/over/tls", b"secret")
    assert (answer.status_code, answer.content) == (200, b"secret"), answer.text


def test_amqps_failover_list_checks_each_node_against_its_own_name(
    stack, downstream, pki, two_nodes
):
    """The gateway and a worker fail over from the first node to the second, each
    certificate valid for its own node's address only; so does the app Flower uses."""
    first, second = two_nodes
    env = {
        "PROXYMQ_BROKER_URL": f"{first.tls_url('127.0.0.1')};{second.tls_url('127.0.0.2')}",
        "PROXYMQ_BROKER_CA_FILE": str(pki.ca),
    }
    service = unique_service("tlslist")
    queue = f"{service}_requests"
    worker = stack.worker(service, downstream.url, wait=False, **env)
    gateway = stack.gateway(**env)
    await_answer(gateway, service, "an answer through the first node", gateway.process, worker)
    assert consumers_on(first, queue) == 1
    first.stop()
    with pytest.raises(ConnectionRefusedError):  # gone: what answers now is the second
        socket.create_connection(("127.0.0.1", first.tls_port), timeout=5).close()
    await_answer(gateway, service, "an answer through the second node", gateway.process, worker)
    assert consumers_on(second, queue) == 1
    script = (
        "from workers.app import app\n"
        "for connect in (app.connection_for_read, app.connection_for_write):\n"
        "    with connect() as connection:\n"
        "        connection.ensure_connection(max_retries=2)\n"
        "        print('connected to', connection.hostname)\n"
    )
    result = run_app_script(script, env)
    assert result.stdout.splitlines() == ["connected to 127.0.0.2"] * 2, result.stderr[-3000:]


def test_request_goes_end_to_end_over_amqps_with_a_private_ca(stack, downstream, pki, tls_broker):
    env = {"PROXYMQ_BROKER_URL": tls_broker.tls_url(), "PROXYMQ_BROKER_CA_FILE": str(pki.ca)}
    end_to_end(stack, downstream, env)


@pytest.mark.parametrize("trust", ["ca_file", "system_cas"])
@pytest.mark.parametrize("command", [GATEWAY, WORKER], ids=["gateway", "worker"])
def test_certificate_for_another_host_stops_the_process_with_one_line(
    pki, evil_broker, command, trust
):
    env = {"PROXYMQ_BROKER_URL": evil_broker.tls_url()}
    if trust == "ca_file":
        env["PROXYMQ_BROKER_CA_FILE"] = str(pki.ca)
    else:
        env["SSL_CERT_FILE"] = str(pki.ca)
    started = time.monotonic()
    code, lines = run_to_exit(command, **env)
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "Error: PROXYMQ_BROKER_URL: the broker's certificate is not valid for host 'localhost'"
    ), lines
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("command", [GATEWAY, WORKER], ids=["gateway", "worker"])
def test_start_checks_each_node_of_an_amqps_list_against_its_own_host(
    pki, tls_broker, evil_broker, command
):
    """A node that is down is skipped, a good one passes, the bad one is named."""
    down = f"amqps://guest:guest@127.0.0.1:{free_port()}//"
    url = ";".join([down, tls_broker.tls_url("localhost"), evil_broker.tls_url("127.0.0.1")])
    code, lines = run_to_exit(command, PROXYMQ_BROKER_URL=url, PROXYMQ_BROKER_CA_FILE=str(pki.ca))
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "Error: PROXYMQ_BROKER_URL: the broker's certificate is not valid for host '127.0.0.1'"
    ), lines


@pytest.mark.parametrize("command", [GATEWAY, WORKER], ids=["gateway", "worker"])
def test_certificate_from_an_untrusted_ca_stops_the_process_with_one_line(tls_broker, command):
    code, lines = run_to_exit(command, PROXYMQ_BROKER_URL=tls_broker.tls_url())
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "Error: PROXYMQ_BROKER_URL: the broker's certificate at localhost:"
    ), lines
    assert "does not verify against the system's CAs" in lines[0]


def test_celery_app_flower_uses_refuses_a_certificate_for_another_host(pki, evil_broker):
    """Flower (``celery -A workers flower``) connects with the workers' app settings."""
    script = (
        "from workers.app import app\n"
        "with app.connection_for_read() as connection:\n"
        "    connection.ensure_connection(max_retries=1)\n"
        "print('connected')\n"
    )
    env = {"PROXYMQ_BROKER_URL": evil_broker.tls_url(), "SSL_CERT_FILE": str(pki.ca)}
    result = run_app_script(script, env)
    assert "connected" not in result.stdout
    assert "Hostname mismatch, certificate is not valid for 'localhost'" in result.stderr


def test_broker_down_at_start_stops_nothing_and_amqps_connects_once_it_is_up(
    stack, downstream, pki
):
    broker = PrivateBroker(tls=TLSListener(pki.ca, *pki.server))
    try:
        env = {"PROXYMQ_BROKER_URL": broker.tls_url(), "PROXYMQ_BROKER_CA_FILE": str(pki.ca)}
        service = unique_service("tlsdown")
        worker = stack.worker(service, downstream.url, wait=False, **env)
        gateway = stack.gateway(ready_path="/healthz", **env)
        assert requests.get(gateway.url + "/readyz").status_code == 503
        # Past its start-up check (the broker's certificate, if it answers), the worker
        # tries to connect, and says so.
        wait_for(lambda: "Cannot connect to amqps://" in worker.log(), 30, "a connect attempt")
        assert worker.alive() and gateway.process.alive(), worker.log()[-2000:]
        broker.start()
        wait_for(lambda: requests.get(gateway.url + "/readyz").ok, 60, "gateway to connect")
        wait_for(lambda: post(gateway, service, "/x").status_code == 200, 60, "an answer")
    finally:
        broker.remove()


def test_broker_requiring_a_client_certificate_accepts_cert_and_key(
    stack, downstream, pki, mtls_broker
):
    # The node really refuses a client without a certificate...
    with pytest.raises(OSError):
        connection = amqp.Connection(
            f"localhost:{mtls_broker.tls_port}",
            ssl={"ca_certs": str(pki.ca), "server_hostname": "localhost"},
            connect_timeout=5,
        )
        connection.connect()
    # ...and takes ours.
    cert, key = pki.client
    env = {
        "PROXYMQ_BROKER_URL": mtls_broker.tls_url(),
        "PROXYMQ_BROKER_CA_FILE": str(pki.ca),
        "PROXYMQ_BROKER_CERT_FILE": str(cert),
        "PROXYMQ_BROKER_KEY_FILE": str(key),
    }
    end_to_end(stack, downstream, env)


@pytest.mark.parametrize(
    ("settings", "line"),
    [
        (
            {"PROXYMQ_BROKER_CA_FILE": "/nonexistent/ca.pem"},
            "PROXYMQ_BROKER_CA_FILE: cannot read '/nonexistent/ca.pem': No such file or directory",
        ),
        (
            {"PROXYMQ_BROKER_CA_FILE": "{key}"},
            "PROXYMQ_BROKER_CA_FILE: '{key}' holds no PEM certificate",
        ),
        (
            {"PROXYMQ_BROKER_CERT_FILE": "{cert}"},
            "PROXYMQ_BROKER_CERT_FILE: is set without PROXYMQ_BROKER_KEY_FILE",
        ),
        (
            {"PROXYMQ_BROKER_CERT_FILE": "{cert}", "PROXYMQ_BROKER_KEY_FILE": "{ca}"},
            "PROXYMQ_BROKER_KEY_FILE: '{ca}' is not the unencrypted PEM private key",
        ),
        (
            {
                "PROXYMQ_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                "PROXYMQ_BROKER_CA_FILE": "{ca}",
            },
            "PROXYMQ_BROKER_CA_FILE: is set, but PROXYMQ_BROKER_URL is not amqps://",
        ),
        (
            {"PROXYMQ_BROKER_URL": "amqps://guest:guest@localhost:1//?ssl_cert_reqs=CERT_NONE"},
            "PROXYMQ_BROKER_URL: TLS options in the URL ('ssl_cert_reqs') are not supported",
        ),
    ],
    ids=[
        "ca-unreadable",
        "ca-not-a-cert",
        "cert-without-key",
        "key-not-for-cert",
        "ca-without-amqps",
        "tls-in-url",
    ],
)
@pytest.mark.parametrize("command", [GATEWAY, WORKER], ids=["gateway", "worker"])
def test_bad_tls_setting_stops_the_process_with_one_line(pki, command, settings, line):
    files = {"ca": pki.ca, "cert": pki.client[0], "key": pki.client[1]}
    env = {"PROXYMQ_BROKER_URL": "amqps://guest:guest@localhost:1//"}
    env.update({name: value.format(**files) for name, value in settings.items()})
    code, lines = run_to_exit(command, timeout=20, **env)
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: " + line.format(**files)), lines
