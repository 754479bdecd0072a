"""Shared fixtures: a real RabbitMQ, an exchange per test, a consumer, and an in-process
publisher.

The broker is the host's at 127.0.0.1:5672 unless `VIRTPUB_TEST_BROKER=debian13`: then it
is one private Debian 13 RabbitMQ 4.0 node for the session, with every deprecated feature
denied (tests/rabbitnode.py), and the same tests run unchanged against it.

Integration tests never skip: a missing broker or libvirtd is a failure with a
message that says how to start it (`bash .ci/run` sets both up).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import libvirt
import pika
import pytest

from tests.rabbitnode import RabbitNode, selected_broker
from virtpub.config import Settings
from virtpub.contract import schemas
from virtpub.daemon.assembly import assemble
from virtpub.drivers.libvirt import capability_map
from virtpub.drivers.libvirt.domain import CapabilityLookup, LibvirtDomainDriver

AMQP_URL = os.environ.get("VIRTPUB_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
HOST_ID = "testhost"


def require_port(host: str, port: int, what: str) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as err:
        pytest.fail(f"{what} is not reachable at {host}:{port} ({err}); run `bash .ci/run`")


# What marks a test as needing a service: a fixture it uses (directly or not), or a name its
# module imports. Marked here rather than by hand, so a new test cannot be forgotten.
BROKER_FIXTURES = {"amqp_url"}
BROKER_MODULE_NAMES = ("RabbitNode", "RabbitCluster")
LIBVIRTD_FIXTURES = {"qemu"}
LIBVIRTD_MODULE_NAMES = ("QEMU_URI", "open_qemu", "restart_libvirtd")
CONTAINER_MODULE_NAMES = ("containers", "booted", "Container")
NODEJS_FIXTURES = {"node_validator"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test with the services and tools it needs (pyproject's markers), so
    `-m "not broker and not libvirtd and not container and not nodejs"` selects exactly the
    tests that need none: the ones the Debian 13 Python leg runs in its rootfs."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        module = getattr(item, "module", None)

        def imports(names: tuple[str, ...], module: object = module) -> bool:
            return any(hasattr(module, name) for name in names)

        if fixtures & BROKER_FIXTURES or imports(BROKER_MODULE_NAMES):
            item.add_marker(pytest.mark.broker)
        if fixtures & LIBVIRTD_FIXTURES or imports(LIBVIRTD_MODULE_NAMES):
            item.add_marker(pytest.mark.libvirtd)
        if imports(CONTAINER_MODULE_NAMES):
            item.add_marker(pytest.mark.container)
        if fixtures & NODEJS_FIXTURES:
            item.add_marker(pytest.mark.nodejs)


@pytest.fixture(autouse=True)
def no_stray_publisher() -> Iterator[None]:
    """Kills any virtpub process a test started and left running (a failed assertion
    before its SIGTERM): a stray publisher on a synthetic burst fills the disk."""
    yield
    for pid in _publisher_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _publisher_children() -> list[int]:
    mine = str(os.getpid())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = stat.rsplit(")", 1)[1].split()[1]
        if parent == mine and b"publisher" in argv and b"-m" in argv:
            found.append(int(entry.name))
    return found


# The session's private broker node when `VIRTPUB_TEST_BROKER` selects one, for `rabbitmqctl`.
_session_node: list[RabbitNode] = []


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    if selected_broker() == "host":
        require_port("127.0.0.1", 5672, "RabbitMQ")
        yield AMQP_URL
        return
    with RabbitNode() as node:
        _session_node.append(node)
        try:
            yield node.url()
        finally:
            _session_node.clear()


@pytest.fixture
def exchange(amqp_url: str) -> Iterator[str]:
    """A fresh exchange name; the exchange, its alternate exchange and queue are deleted after."""
    name = f"virtpub-test-{uuid.uuid4().hex[:10]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.exchange_delete(name)
    channel.exchange_delete(f"{name}.unroutable")
    channel.exchange_delete(f"{name}.requests")
    channel.queue_delete(f"{name}.unroutable")
    connection.close()


@pytest.fixture
def topic(amqp_url: str, exchange: str) -> str:
    """The test's exchange, declared as a publisher would (the `exchange` fixture deletes it)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    connection.channel().exchange_declare(exchange, "topic", durable=True)
    connection.close()
    return exchange


@contextlib.contextmanager
def alternate_exchange_policy(exchange: str) -> Iterator[str]:
    """A policy on the shared broker giving `exchange` (and only it: the pattern is its
    exact name) the alternate exchange `<exchange>.unroutable`, as the README's
    `rabbitmqctl set_policy` line does; cleared afterwards whatever happens."""
    name = f"{exchange}-ae"
    definition = json.dumps({"alternate-exchange": f"{exchange}.unroutable"})
    pattern = f"^{re.escape(exchange)}$"
    rabbitmqctl("set_policy", name, pattern, definition, "--apply-to", "exchanges")
    try:
        yield name
    finally:
        rabbitmqctl("clear_policy", name)


@pytest.fixture(autouse=True)
def no_deprecated_feature_used() -> Iterator[None]:
    """On the session's Debian 13 node, a test whose clients used a deprecated feature
    fails, even where RabbitMQ 4.0 only logs the use (a global QoS)."""
    before = _session_node[0].deprecated_features_used() if _session_node else []
    yield
    if _session_node:
        used = [f for f in _session_node[0].deprecated_features_used() if f not in before]
        if used:
            pytest.fail(f"deprecated features used on RabbitMQ 4.0: {used}")


def rabbitmqctl(*args: str) -> str:
    """`rabbitmqctl args...` on the broker the tests use; its output, or the test fails."""
    if _session_node:
        done = _session_node[0].ctl(*args, check=False)
    else:
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class Received:
    routing_key: str
    properties: Any
    body: dict[str, Any]
    raw: bytes


@dataclass
class Consumer:
    """A queue bound to the exchange before the publisher starts, read from the test thread.

    It declares the exchange itself (topic, durable, no arguments) unless the test
    declared it otherwise first (`declare=False`)."""

    url: str
    exchange: str
    bindings: tuple[str, ...] = ("#",)
    declare: bool = True
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
        self._channel = self._connection.channel()
        if self.declare:
            # As Nova-style consumers declare the exchange they bind to, before any publisher.
            self._channel.exchange_declare(self.exchange, "topic", durable=True)
        self.queue = self._channel.queue_declare("", exclusive=True).method.queue
        for binding in self.bindings:
            self._channel.queue_bind(self.queue, self.exchange, routing_key=binding)

    def collect(
        self, until: Callable[[list[Received]], bool], timeout: float = 15.0
    ) -> list[Received]:
        """Reads messages until `until(messages)` holds; fails the test on timeout."""
        deadline = time.monotonic() + timeout
        while not until(self.messages):
            if time.monotonic() > deadline:
                keys = [m.routing_key for m in self.messages]
                pytest.fail(f"timed out after {timeout} s; received {len(keys)}: {keys}")
            self._receive_one()
        return self.messages

    def quiet(self, seconds: float = 0.5) -> list[Received]:
        """Reads whatever arrives within `seconds` (to prove nothing more comes)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive_one()
        return self.messages

    def _receive_one(self) -> None:
        method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
        if method is None:
            self._connection.sleep(0.02)
        else:
            self.messages.append(Received(method.routing_key, properties, json.loads(body), body))

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


@pytest.fixture
def consumer_factory(amqp_url: str, exchange: str) -> Iterator[Callable[..., Consumer]]:
    made: list[Consumer] = []

    def make(*bindings: str, declare: bool = True) -> Consumer:
        consumer = Consumer(amqp_url, exchange, bindings or ("#",), declare)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.close()


def make_settings(
    amqp_url: str,
    exchange: str,
    state_dir: Path,
    *libvirt_uris: str,
    host_id: str = HOST_ID,
    poll_interval: float = 10.0,
) -> Settings:
    return Settings(
        libvirt_uris=libvirt_uris or ("test:///default",),
        amqp_urls=(amqp_url,),
        exchange=exchange,
        host_id=host_id,
        state_dir=state_dir,
        log_level="info",
        log_format="text",
        poll_interval=poll_interval,
    )


class RunningPublisher:
    """A publisher running in this process, so a test can drive `test:///default` through
    the very connection the driver watches (each such connection is a separate host)."""

    def __init__(
        self, settings: Settings, capability_lookup: CapabilityLookup = capability_map.lookup
    ) -> None:
        self.settings = settings
        self.drivers = [
            LibvirtDomainDriver(
                uri,
                settings.host_id,
                capability_lookup=capability_lookup,
                poll_interval=settings.poll_interval,
            )
            for uri in settings.libvirt_uris
        ]
        daemon = assemble(settings, self.drivers)
        if daemon is None:
            pytest.fail("publisher could not be assembled (see the log)")
        self.daemon = daemon
        self.stop_event = threading.Event()
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)
        self._thread.start()
        if not self.daemon.started.wait(20):
            self.stop()
            pytest.fail(f"publisher did not start (exit code {self.exit_code})")

    def _run(self) -> None:
        self.exit_code = self.daemon.run(self.stop_event)

    @property
    def conn(self) -> Any:
        return self.drivers[0].connection

    def stop(self) -> int | None:
        self.stop_event.set()
        self._thread.join(30)
        return self.exit_code


@pytest.fixture
def publisher_factory(
    amqp_url: str, exchange: str, tmp_path: Path
) -> Iterator[Callable[..., RunningPublisher]]:
    running: list[RunningPublisher] = []

    def start(
        *libvirt_uris: str,
        state_dir: Path | None = None,
        capability_lookup: CapabilityLookup = capability_map.lookup,
        poll_interval: float = 10.0,
    ) -> RunningPublisher:
        settings = make_settings(
            amqp_url,
            exchange,
            state_dir or tmp_path / "state",
            *libvirt_uris,
            poll_interval=poll_interval,
        )
        publisher = RunningPublisher(settings, capability_lookup)
        running.append(publisher)
        return publisher

    yield start
    for publisher in running:
        assert publisher.stop() == 0


def validator(schema_name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schemas.info(schema_name).load(), format_checker=jsonschema.FormatChecker()
    )


def assert_valid(message: Received) -> None:
    """Validates a received message against the schema its `dataschema` names."""
    name = message.body["dataschema"].split(":")[3]
    errors = sorted(validator(name).iter_errors(message.body), key=str)
    assert not errors, f"{message.routing_key}: {[e.message for e in errors]}"


# -- a real libvirtd with QEMU ----------------------------------------------------------

QEMU_URI = "qemu:///system"
DEBIAN12_LIBVIRT = "9.0"
"""The host's libvirt (Debian 12, the platform the README sets up)."""


def expected_libvirt_release() -> str:
    """The libvirt release (`major.minor`) this run must be on: Debian 12's, or the one a
    Debian 13 leg names, so that the host's libvirt can't pass for another release's."""
    return os.environ.get("VIRTPUB_TEST_EXPECT_LIBVIRT", DEBIAN12_LIBVIRT)


GUEST_XML = """<domain type='qemu'>
  <name>{name}</name><uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='network'/></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


@pytest.fixture
def qemu() -> Iterator[Any]:
    """A connection for the test's own actions; guests left behind are removed, before and after."""
    remove_test_guests()
    conn = open_qemu()
    yield conn
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
    remove_test_guests()


def guest_xml() -> tuple[str, str]:
    """A 64 MiB diskless guest that boots from the network: it starts in well under a second."""
    dom_uuid = str(uuid.uuid4())
    return GUEST_XML.format(name=f"virtpub-e2e-{dom_uuid[:8]}", uuid=dom_uuid), dom_uuid


def open_qemu() -> Any:
    try:
        return libvirt.open(QEMU_URI)
    except libvirt.libvirtError as err:
        pytest.fail(f"no libvirtd at {QEMU_URI} ({err}); run `bash .ci/run`")


def remove_test_guests() -> None:
    conn = open_qemu()
    for dom in conn.listAllDomains():
        if not dom.name().startswith("virtpub-e2e-"):
            continue
        with contextlib.suppress(libvirt.libvirtError):  # a transient one vanishes on destroy
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    conn.close()


def restart_libvirtd(while_down: Callable[[], None] | None = None) -> None:
    """Stops libvirtd (its guests keep running), runs `while_down`, starts it again.

    The daemon is the shared one `bash .ci/run` started; it is back and answering
    before this returns, so later tests are not disturbed.
    """
    subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], check=False).returncode == 0:
        if time.monotonic() > deadline:
            pytest.fail("libvirtd did not stop within 30 s")
        time.sleep(0.1)
    if while_down is not None:
        while_down()
    env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": "3:file:/var/log/libvirt/libvirtd.log"}
    subprocess.run(["libvirtd", "-d"], check=True, env=env)
    deadline = time.monotonic() + 30
    while True:
        try:
            libvirt.open(QEMU_URI).close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                pytest.fail("libvirtd did not come back within 30 s")
            time.sleep(0.2)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` held; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


def on_test_broker(url: str, amqp_url: str) -> str:
    """`url` with `{broker}` as the test broker's host:port and `{amqp_url}` as its URL, so
    error cases meet the broker of the leg that runs them (RabbitMQ 3.10 or 4.0)."""
    return url.format(broker=urllib.parse.urlsplit(amqp_url).netloc.rpartition("@")[2],
                      amqp_url=amqp_url)  # fmt: skip
