"""The `virtpub` command as an operator meets it: real processes, real broker, real signals."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pika
import pytest

from tests.conftest import HOST_ID, Consumer
from virtpub.config import sanitize_host_id

VIRTPUB = [sys.executable, "-m", "virtpub"]


def virtpub(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VIRTPUB, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line or "invalid" in line]


def test_help_explains_every_option() -> None:
    result = virtpub("run", "--help")
    assert result.returncode == 0
    for option in (
        "--config",
        "--libvirt-uri",
        "--amqp-url",
        "--exchange",
        "--host-id",
        "--state-dir",
        "--log-level",
        "--log-format",
        "VIRTPUB_",
    ):
        assert option in result.stdout, option
    top = virtpub("--help")
    assert top.returncode == 0 and "demo" in top.stdout and "run" in top.stdout


def test_wrong_credentials_give_one_line_and_exit_1(tmp_path: Path, exchange: str) -> None:
    started = time.monotonic()
    result = virtpub(
        "run",
        "--amqp-url",
        "amqp://guest:wrongsecret@127.0.0.1:5672/%2F",
        "--libvirt-uri",
        "test:///default",
        "--exchange",
        exchange,
        "--state-dir",
        str(tmp_path),
    )
    assert result.returncode == 1
    assert time.monotonic() - started < 15, "credentials are not worth retrying"
    (line,) = error_lines(result.stderr)
    assert "refused the login" in line
    assert "wrongsecret" not in result.stderr and "Traceback" not in result.stderr


def test_an_exchange_of_another_type_gives_one_line_and_exit_1(
    tmp_path: Path, amqp_url: str, exchange: str
) -> None:
    """Someone declared the exchange as fanout: virtpub's topic bindings would never see a
    routing key there, and retrying cannot change the type."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().exchange_declare(exchange, "fanout", durable=True)
    started = time.monotonic()
    result = virtpub(
        "run", "--libvirt-uri", "test:///default", "--exchange", exchange,
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert time.monotonic() - started < 15, "the type is not worth retrying"
    (line,) = error_lines(result.stderr)
    assert f"exchange {exchange!r} exists as a fanout exchange, not topic" in line
    assert "Traceback" not in result.stderr


def test_bogus_libvirt_uri_gives_one_line_and_exit_1(tmp_path: Path, exchange: str) -> None:
    result = virtpub(
        "run", "--libvirt-uri", "bogus:///", "--exchange", exchange, "--state-dir", str(tmp_path)
    )
    assert result.returncode == 1
    (line,) = error_lines(result.stderr)
    assert "bogus:///" in line and "libvirt" in line
    assert "Traceback" not in result.stderr


def test_invalid_configuration_names_each_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "virtpub.toml"
    config.write_text('exchange = "has space"\nlog_level = "loud"\n')
    result = virtpub(
        "run",
        "--config",
        str(config),
        "--amqp-url",
        "http://u:topsecret@example/",
        "--state-dir",
        str(tmp_path),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert [line.split(": ")[2] for line in lines] == ["amqp_url", "exchange", "log_level"]
    assert "topsecret" not in result.stderr


def test_unknown_config_key_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "virtpub.toml"
    config.write_text('amqp_uri = "amqp://localhost/"\n')
    result = virtpub("run", "--config", str(config))
    assert result.returncode == 2
    assert "unknown key 'amqp_uri'" in result.stderr


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VIRTPUB, "run", "--libvirt-uri", "test:///default", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_0(
    signum: signal.Signals,
    tmp_path: Path,
    exchange: str,
    consumer_factory: Callable[..., Consumer],
) -> None:
    consumer = consumer_factory("#")
    process = _start("--exchange", exchange, "--state-dir", str(tmp_path))
    try:
        consumer.collect(lambda m: len(m) >= 1)
    finally:
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert re.search(r"stopped: (\d+) published, \1 confirmed, 0 left in the spool", stderr)


def test_unreachable_broker_is_retried_and_nothing_accepted_is_lost(
    tmp_path: Path, exchange: str, consumer_factory: Callable[..., Consumer]
) -> None:
    consumer = consumer_factory("#")
    down = _start(
        "--amqp-url", "amqp://guest:guest@127.0.0.1:1/", "--exchange", exchange,
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    time.sleep(4)
    assert down.poll() is None, "an unreachable broker must be retried, not fatal"
    down.send_signal(signal.SIGTERM)
    _, stderr = down.communicate(timeout=30)
    assert down.returncode == 0
    assert "broker unreachable" in stderr and "retrying in" in stderr
    with sqlite3.connect(tmp_path / "spool.sqlite3") as db:
        spooled = [
            key for (key,) in db.execute("SELECT routing_key FROM messages ORDER BY sequence")
        ]
    assert f"{len(spooled)} left in the spool" in stderr
    assert spooled[0] == f"v1.{_default_host_id()}.publisher.capabilities"
    assert spooled[-1] == f"v1.{_default_host_id()}.publisher.snapshot.end"

    # The next start, with the broker reachable, sends what was spooled first.
    up = _start("--exchange", exchange, "--state-dir", str(tmp_path))
    try:
        messages = consumer.collect(
            lambda m: sum(x.routing_key.endswith("snapshot.end") for x in m) == 2
        )
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=30)
    assert [m.body["sequence"] for m in messages] == list(range(1, len(messages) + 1))
    assert [m.routing_key for m in messages[: len(spooled)]] == spooled


def _default_host_id() -> str:
    return sanitize_host_id(socket.gethostname().split(".")[0])


def test_demo_prints_what_the_broker_confirmed(tmp_path: Path, exchange: str) -> None:
    result = virtpub(
        "demo", "--cycles", "1", "--pause", "0", "--exchange", exchange,
        "--state-dir", str(tmp_path), "--host-id", "demohost",
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines[0][2] == "v1.demohost.publisher.capabilities"
    assert [line[2] for line in lines if line[-1] == "demo-1"] == [
        "v1.demohost.domain.added.defined",
        "v1.demohost.domain.defined.added",
        "v1.demohost.domain.started.booted",
        "v1.demohost.domain.suspended.paused",
        "v1.demohost.domain.resumed.unpaused",
        "v1.demohost.domain.stopped.destroyed",
        "v1.demohost.domain.undefined.removed",
        "v1.demohost.domain.removed.undefined",
    ]
    assert [line[2] for line in lines if line[-1] == "demo-transient-1"] == [
        "v1.demohost.domain.added.started",
        "v1.demohost.domain.started.booted",
        "v1.demohost.domain.stopped.destroyed",
        "v1.demohost.domain.removed.stopped",
    ]


def test_capabilities_explain_describes_a_connection_without_a_broker() -> None:
    result = virtpub(
        "capabilities", "--explain", "--libvirt-uri", "test:///default", "--poll-interval", "7"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    number = libvirt.getVersion()  # Debian 12's 9.0.0 here, Debian 13's 11.3.0 in its leg
    version = f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
    assert lines[0] == f"test:///default: TEST driver, libvirt {version}; basis map:{version}"
    rows = {line.split()[0]: line.split(maxsplit=2)[1:] for line in lines[2:-1]}
    native, unsupported = (
        sum(1 for row in rows.values() if row[0] == status) for status in ("native", "unsupported")
    )
    assert rows["started"][0] == "native"
    assert rows["added"] == ["derived"]
    assert rows["crashed"] == ["polled", "every 7 s; libvirt's TEST driver does not emit it"]
    assert rows["reboot"][0] == "unsupported"
    # By the map's TEST rows: 7 native and 24 unsupported on libvirt 9.0, 9 and 23 on 11.3.
    assert native >= 7
    summary = f"({native} native, 3 derived, 2 polled, {unsupported} unsupported)"
    assert lines[-1].strip() == summary


@pytest.mark.libvirtd  # libvirt's remote driver asks libvirtd about an unknown scheme
def test_capabilities_explain_of_a_bad_uri_is_one_line_and_exit_1() -> None:
    result = virtpub("capabilities", "--explain", "--libvirt-uri", "nope:///x")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "virtpub: libvirt: cannot open 'nope:///x': no connection driver available for nope:///x"
    ]


def test_capabilities_asks_the_running_publishers(
    amqp_url: str, exchange: str, publisher_factory: Callable[..., Any]
) -> None:
    publisher_factory()  # test:///default, host id HOST_ID
    asked = ["capabilities", "--amqp-url", amqp_url, "--exchange", exchange, "--timeout", "5"]
    result = virtpub(*asked, "--host", HOST_ID)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["event", "type", f"{HOST_ID}/libvirt"]
    cells = {row.split()[0]: row.split()[1] for row in rows}
    assert (cells["started"], cells["added"], cells["crashed"], cells["reboot"]) == (
        "native", "derived", "polled", "-",
    )  # fmt: skip
    everyone = virtpub(*asked, "--timeout", "1.5", "--json")
    assert everyone.returncode == 0, everyone.stderr
    (answer,) = [json.loads(line) for line in everyone.stdout.splitlines()]
    assert answer["type"] == "org.virtpub.publisher.capabilities"
    assert answer["data"]["host_id"] == HOST_ID
    absent = virtpub(*asked, "--host", "nosuchhost", "--timeout", "1")
    assert absent.returncode == 1
    assert absent.stderr.splitlines() == ["virtpub: no answer from host 'nosuchhost' within 1 s"]


def test_capabilities_without_any_publisher_is_one_line_and_exit_1(
    amqp_url: str, exchange: str
) -> None:
    result = virtpub("capabilities", "--amqp-url", amqp_url, "--exchange", exchange)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"virtpub: no publisher has ever served requests on exchange {exchange!r}"
        f" ({exchange}.requests does not exist)"
    ]
