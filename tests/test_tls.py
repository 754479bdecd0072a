"""amqps:// with a CA, a client certificate and SASL EXTERNAL, on a private TLS node: the
daemon and every tool that talks to the broker (tail, archive, inventory, capabilities)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pika
import pika.credentials
import pytest

from tests.conftest import make_settings
from tests.rabbitnode import TLS_USER, RabbitNode
from tests.test_archive import ids, wait_for
from tests.test_archive import stop as stop_archiver
from tests.test_inventory import fleet
from tests.test_inventory import publish as publish_bodies
from tests.test_tail import finish, message, publish, start
from virtpub.amqp.connection import BrokerFatalError, connection_parameters

VIRTPUB = [sys.executable, "-m", "virtpub"]
CLI = "from virtpub.cli.main import main; main(prog_name='virtpub')"


@pytest.fixture(scope="module")
def tls_node() -> Iterator[RabbitNode]:
    with RabbitNode(tls=True) as node:
        yield node


def run(node: RabbitNode, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtpub", "run", "--libvirt-uri", "test:///default",
         "--state-dir", str(tmp_path), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_client_certificate_logs_in_by_external_and_publishes(
    tls_node: RabbitNode, tmp_path: Path
) -> None:
    exchange = f"tls-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(tls_node.url()))
    channel = connection.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "#")
    process = run(
        tls_node, tmp_path,
        "--amqp-url", tls_node.tls_url(), "--exchange", exchange,
        "--amqp-ca-file", str(tls_node.ca_file),
        "--amqp-cert-file", str(tls_node.client_cert),
        "--amqp-key-file", str(tls_node.client_key),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        first = None
        while first is None and time.monotonic() < deadline:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                connection.sleep(0.1)
            else:
                first = (method.routing_key, json.loads(body))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        connection.close()
    assert first is not None, stderr
    assert first[0].endswith(".publisher.capabilities")
    assert process.returncode == 0, stderr
    assert "amqps://localhost" in stderr


def test_a_certificate_that_does_not_verify_is_one_line_and_exit_1(
    tls_node: RabbitNode, tmp_path: Path
) -> None:
    """No --amqp-ca-file: the system's CAs do not know the node's; retrying cannot help."""
    url = tls_node.tls_url().replace("amqps://", "amqps://virtpub:sekret@")
    process = run(tls_node, tmp_path, "--amqp-url", url, "--exchange", f"tls-{uuid.uuid4().hex}")
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "failed TLS verification" in errors[0], stderr
    assert "sekret" not in stderr and "Traceback" not in stderr


def test_the_broker_host_name_is_verified_by_default(tmp_path: Path) -> None:
    settings = make_settings("amqps://mq.example:5671/%2F", "x", tmp_path)
    params = connection_parameters("amqps://mq.example:5671/%2F", "test", settings)
    assert params.ssl_options.server_hostname == "mq.example"
    assert params.ssl_options.context.check_hostname is True
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert isinstance(params.credentials, pika.credentials.PlainCredentials)


def test_unusable_tls_files_are_fatal_not_retried(tls_node: RabbitNode, tmp_path: Path) -> None:
    """A CA file without a certificate, or a key of another certificate: no attempt can work."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    settings = make_settings(tls_node.tls_url(), "x", tmp_path)
    with pytest.raises(BrokerFatalError, match="cannot use the TLS files"):
        connection_parameters(tls_node.tls_url(), "test", replace(settings, amqp_ca_file=not_pem))
    mismatched = replace(
        settings,
        amqp_ca_file=tls_node.ca_file,
        amqp_cert_file=tls_node.client_cert,
        amqp_key_file=tls_node.server_key,
    )
    with pytest.raises(BrokerFatalError, match="cannot use the TLS files"):
        connection_parameters(tls_node.tls_url(), "test", mismatched)


def test_a_client_certificate_means_external_only_without_a_password(
    tls_node: RabbitNode, tmp_path: Path
) -> None:
    settings = replace(
        make_settings("amqps://localhost/", "x", tmp_path),
        amqp_ca_file=tls_node.ca_file,
        amqp_cert_file=tls_node.client_cert,
        amqp_key_file=tls_node.client_key,
    )
    external = connection_parameters("amqps://localhost:5671/%2F", "test", settings)
    assert isinstance(external.credentials, pika.credentials.ExternalCredentials)
    plain = connection_parameters("amqps://u:p@localhost:5671/%2F", "test", settings)
    assert isinstance(plain.credentials, pika.credentials.PlainCredentials)


# -- the tools ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsVhost:
    """A vhost of the TLS node where only the certificate's user (and the test's own) may go:
    guest is denied there, so a tool that gets in has logged in by its client certificate."""

    node: RabbitNode
    name: str
    tester_url: str
    """Plain AMQP as a user of the vhost, for the test's own declarations and messages."""

    def url(self, userinfo: str = "") -> str:
        return f"amqps://{userinfo}localhost:{self.node.tls_port}/{urllib.parse.quote(self.name)}"

    def options(
        self, ca: Path | None = None, *, certificate: bool = True, userinfo: str = ""
    ) -> list[str]:
        """--amqp-url and the TLS options for this vhost; the node's own CA unless told."""
        args = ["--amqp-url", self.url(userinfo), "--amqp-ca-file", str(ca or self.node.ca_file)]
        if certificate:
            args += ["--amqp-cert-file", str(self.node.client_cert),
                     "--amqp-key-file", str(self.node.client_key)]  # fmt: skip
        return args


@pytest.fixture(scope="module")
def tls_vhost(tls_node: RabbitNode) -> TlsVhost:
    name = f"tls-only-{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(8)
    tls_node.ctl("add_vhost", name)
    tls_node.add_user("tester", password, ".*", ".*", ".*")
    for user in (TLS_USER, "tester"):
        tls_node.ctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    quoted = urllib.parse.quote(name)
    return TlsVhost(tls_node, name, f"amqp://tester:{password}@127.0.0.1:{tls_node.port}/{quoted}")


@pytest.fixture
def tls_exchange(tls_vhost: TlsVhost) -> str:
    """A topic exchange of the vhost, declared as a publisher would."""
    name = f"tls-tools-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(tls_vhost.tester_url))
    connection.channel().exchange_declare(name, "topic", durable=True)
    connection.close()
    return name


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the node's certificate."""
    directory = tmp_path_factory.mktemp("stranger")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"),
         "-subj", "/CN=a stranger", "-days", "1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return directory / "ca.pem"


def virtpub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VIRTPUB, *args], capture_output=True, text=True, timeout=60,
                          check=False, env=env)  # fmt: skip


def test_tail_follows_the_tls_broker_by_its_client_certificate(
    tls_vhost: TlsVhost, tls_exchange: str
) -> None:
    guest = virtpub("tail", *tls_vhost.options(certificate=False), "--exchange", tls_exchange)
    assert guest.returncode == 1
    (line,) = guest.stderr.splitlines()
    assert line.startswith("virtpub tail: ") and "denied access" in line, guest.stderr
    tail, ready = start(CLI, "tail", *tls_vhost.options(), "--exchange", tls_exchange,
                        "--json", "--count", "1", ready="virtpub tail: following")  # fmt: skip
    assert tls_vhost.url() in ready
    sent = message("hv01", "started", "booted")
    publish(tls_vhost.tester_url, tls_exchange, [sent])
    code, out, err = finish(tail)
    assert code == 0, err
    assert out.splitlines() == [sent[1].decode()]


def test_archive_archives_from_the_tls_broker(
    tls_vhost: TlsVhost, tls_exchange: str, tmp_path: Path
) -> None:
    queue = f"tls-archive-{uuid.uuid4().hex[:8]}"
    archiver, ready = start(CLI, "archive", *tls_vhost.options(), "--exchange", tls_exchange,
                            "--queue", queue, "--dir", str(tmp_path), "--batch-ms", "50",
                            ready="virtpub archive: archiving")  # fmt: skip
    assert tls_vhost.url() in ready
    sent = [message("hv01", "started", "booted"), message("hv01", "stopped", "destroyed")]
    publish(tls_vhost.tester_url, tls_exchange, sent)
    wait_for(lambda: len(ids(tmp_path)) == len(sent))
    stop_archiver(archiver)
    assert ids(tmp_path) == [json.loads(body)["id"] for _key, body in sent]


def test_inventory_reads_the_tls_broker(tls_vhost: TlsVhost, tls_exchange: str) -> None:
    messages, expected = fleet()
    queue = f"tls-inventory-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(pika.URLParameters(tls_vhost.tester_url))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, tls_exchange, routing_key="v1.#")
    publish_bodies(tls_vhost.tester_url, tls_exchange, messages)
    try:
        result = virtpub("inventory", *tls_vhost.options(), "--queue", queue, "--json",
                         "--idle", "0.5")  # fmt: skip
        assert result.returncode == 0, result.stderr
        rows = [(r["host"], r["name"], r["state"], r["persistent"], r["last_event"])
                for r in json.loads(result.stdout)["rows"]]  # fmt: skip
        assert rows == expected
    finally:
        channel.queue_delete(queue)
        connection.close()


def test_capabilities_and_snapshot_ask_a_publisher_over_tls(
    tls_vhost: TlsVhost, tmp_path: Path
) -> None:
    """The publisher and the askers all log in by the client certificate."""
    exchange, host = f"tls-caps-{uuid.uuid4().hex[:8]}", f"tlshost{uuid.uuid4().hex[:6]}"
    publisher = subprocess.Popen(
        [*VIRTPUB, "run", "--libvirt-uri", "test:///default", "--state-dir", str(tmp_path),
         "--exchange", exchange, "--host-id", host, *tls_vhost.options()],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # The first requests may come before the publisher serves them; ask until it answers.
        deadline = time.monotonic() + 60
        while True:
            asked = virtpub("capabilities", *tls_vhost.options(), "--exchange", exchange,
                            "--host", host, "--timeout", "2")  # fmt: skip
            if asked.returncode == 0 or time.monotonic() > deadline:
                break
        snapshot = virtpub("snapshot", *tls_vhost.options(), "--exchange", exchange,
                           "--host", host, "--timeout", "30")  # fmt: skip
    finally:
        publisher.send_signal(signal.SIGTERM)
        _, stderr = publisher.communicate(timeout=30)
    assert asked.returncode == 0, asked.stderr + stderr
    assert asked.stdout.splitlines()[0].split() == ["event", "type", f"{host}/libvirt"]
    assert snapshot.returncode == 0, snapshot.stderr + stderr
    assert snapshot.stdout.startswith(f"{host}  "), snapshot.stdout
    assert publisher.returncode == 0, stderr


TOOLS = {
    "tail": ["--exchange", "virtpub-tls-unused"],
    "archive": ["--exchange", "virtpub-tls-unused", "--queue", "unused", "--dir", "{tmp}"],
    "inventory": ["--idle", "0.5"],
    "capabilities": ["--timeout", "1"],
    "snapshot": ["--discovery-timeout", "1", "--timeout", "1"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_a_wrong_ca_is_one_line_and_exit_1(
    tls_vhost: TlsVhost, stranger_ca: Path, tmp_path: Path, tool: str
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in TOOLS[tool]]
    options = tls_vhost.options(stranger_ca, userinfo="virtpub:sekret@")
    result = virtpub(tool, *options, *args)
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    prefix = "virtpub: " if tool == "capabilities" else f"virtpub {tool}: "
    assert line.startswith(prefix) and "failed TLS verification" in line, line
    assert "sekret" not in result.stderr and "Traceback" not in result.stderr


def test_a_tool_takes_its_broker_options_from_config_and_environment(
    tls_vhost: TlsVhost, tls_exchange: str, stranger_ca: Path, tmp_path: Path
) -> None:
    """The URL, the exchange, the CA and the client certificate must all arrive: without any
    one of them the tool would miss the node, the exchange, the verification or the login.
    The daemon's own settings in the file (a state_dir under a file here) do not matter."""
    node = tls_vhost.node

    def toml(ca: Path) -> Path:
        path = tmp_path / f"virtpub-{ca.parent.name}.toml"
        path.write_text(
            f"amqp_url = [{tls_vhost.url()!r}]\nexchange = {tls_exchange!r}\n"
            f"amqp_ca_file = {str(ca)!r}\namqp_cert_file = {str(node.client_cert)!r}\n"
            f"amqp_key_file = {str(node.client_key)!r}\nstate_dir = {str(ca / 'state')!r}\n"
        )
        return path

    clean = {k: v for k, v in os.environ.items() if not k.startswith("VIRTPUB_")}
    inventory = ["inventory", "--idle", "0.3"]
    from_file = virtpub(*inventory, "--config", str(toml(node.ca_file)), env=clean)
    assert from_file.returncode == 0, from_file.stderr
    environment = {
        **clean,
        # Two URLs, the first unreachable: the tool goes on to the second.
        "VIRTPUB_AMQP_URL": f"amqps://localhost:1/%2F {tls_vhost.url()}",
        "VIRTPUB_EXCHANGE": tls_exchange,
        "VIRTPUB_AMQP_CA_FILE": str(node.ca_file),
        "VIRTPUB_AMQP_CERT_FILE": str(node.client_cert),
        "VIRTPUB_AMQP_KEY_FILE": str(node.client_key),
    }
    from_env = virtpub(*inventory, env=environment)
    assert from_env.returncode == 0, from_env.stderr
    # The environment wins over the file, and a flag over the environment.
    env_over_file = {**clean, "VIRTPUB_CONFIG": str(toml(stranger_ca)),
                     "VIRTPUB_AMQP_CA_FILE": str(node.ca_file)}  # fmt: skip
    assert virtpub(*inventory, env=env_over_file).returncode == 0
    flag_over_env = virtpub(*inventory, "--amqp-ca-file", str(stranger_ca), env=env_over_file)
    assert flag_over_env.returncode == 1
    assert "failed TLS verification" in flag_over_env.stderr
