"""`virtpub tail` against the real RabbitMQ: run as a process, as an operator would, on traffic
from the in-process publisher or from crafted messages."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest
from click.testing import CliRunner

from tests.conftest import HOST_ID, RunningPublisher, on_test_broker
from tests.test_publish_test_driver import domain_xml, run_lifecycle
from virtpub.tools.tail import tail_command

ROOT = Path(__file__).resolve().parent.parent
TAIL = "from virtpub.tools.tail import tail_command; tail_command(prog_name='virtpub tail')"
ESC = "\x1b["

Message = tuple[str, bytes]


def clean_env() -> dict[str, str]:
    """The environment without what decides colour behind the command's back."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"}
    }
    env.update(TERM="xterm-256color", PYTHONPATH=str(ROOT))
    return env


def start(
    code: str, *args: str, ready: str, stdout: Any = subprocess.PIPE
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts `python -c code args`; returns once it wrote the `ready` line on stderr, with it."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=clean_env(),
    )
    assert process.stderr is not None
    readable, _, _ = select.select([process.stderr], [], [], 20)
    line = process.stderr.readline().decode() if readable else ""
    if ready not in line:
        process.kill()
        _out, err = process.communicate()
        pytest.fail(f"not ready: {line}{err.decode()}")
    return process, line


def finish(process: subprocess.Popen[bytes], timeout: float = 20) -> tuple[int, str, str]:
    """Waits for the process; (exit code, stdout, the rest of stderr)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {timeout} s; stderr: {err.decode()}")
    return process.returncode, (out or b"").decode(), err.decode()


def start_tail(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    return start(TAIL, *args, ready="virtpub tail: following", stdout=stdout)[0]


def publish(
    amqp_url: str, exchange: str, messages: list[Message], *, mandatory: bool = True
) -> None:
    """With confirms and, unless told, `mandatory`: each message is known to reach a queue."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    for routing_key, body in messages:
        channel.basic_publish(exchange, routing_key, body, mandatory=mandatory)
    connection.close()


def message(
    host: str, event: str, detail: str | None = None, *, name: str = "web1", dom: str = ""
) -> Message:
    """A domain message as a publisher sends it, but with json.dumps' spacing, so a test can
    tell the body as published from one re-encoded."""
    body = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"virtpub://{host}/libvirt/test%3A%2F%2F%2Fdefault",
        "type": f"org.virtpub.domain.{event}",
        "subject": dom or str(uuid.uuid5(uuid.NAMESPACE_DNS, name)),
        "time": "2026-11-27T09:48:53.003457Z",
        "sequence": 1,
        "data": {
            "domain": {"uuid": dom or str(uuid.uuid5(uuid.NAMESPACE_DNS, name)), "name": name},
            "event": event,
            "detail": detail,
            "origin": "libvirt",
        },
    }
    key = f"v1.{host}.domain.{event}" + (f".{detail}" if detail else "")
    return key, json.dumps(body).encode()


def fields(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()]


@pytest.mark.broker
def test_prints_one_plain_line_per_message_of_the_domain(
    publisher_factory: Callable[..., RunningPublisher],
) -> None:
    publisher = publisher_factory()  # declares the exchange
    tail = start_tail(
        "--amqp-url", publisher.settings.amqp_urls[0], "--exchange", publisher.settings.exchange,
        "--domain", "vm-tail", "--count", "8",
    )  # fmt: skip
    for name in ("vm-other", "vm-tail"):  # the other domain's messages come first
        xml, _ = domain_xml(name)
        run_lifecycle(publisher.conn, xml)
    code, out, err = finish(tail)
    assert code == 0, err
    assert ESC not in out  # not a terminal: plain text
    lines = fields(out)
    assert [line[1:3] for line in lines] == [[HOST_ID, "vm-tail"]] * 8
    assert [line[3] for line in lines] == [
        "added.defined", "defined.added", "started.booted", "suspended.paused",
        "resumed.unpaused", "stopped.destroyed", "undefined.removed", "removed.undefined",
    ]  # fmt: skip
    assert [line[4] for line in lines] == ["derived"] + ["libvirt"] * 6 + ["derived"]
    assert all(line[0].startswith("20") and line[0].endswith("Z") for line in lines)


@pytest.mark.broker
def test_filters_by_host_and_event_and_json_prints_the_bodies(amqp_url: str, topic: str) -> None:
    tail = start_tail(
        "--amqp-url", amqp_url, "--exchange", topic, "--json", "--count", "3",
        "--host", "hv01", "--event", "stopped", "--event", "started.booted",
    )  # fmt: skip
    messages = [
        message("hv02", "started", "booted"),
        message("hv01", "started", "booted"),  # 1
        message("hv01", "started", "restored"),
        message("hv01", "suspended", "paused"),
        message("hv01", "stopped", "destroyed"),  # 2
        ("v1.hv01.publisher.capabilities", b'{"id": "x", "data": {}}'),
        message("hv02", "stopped", "shutdown"),
        message("hv01", "stopped", "shutdown"),  # 3
        message("hv01", "started", "booted"),  # past --count
    ]
    publish(amqp_url, topic, messages)
    code, out, err = finish(tail)
    assert code == 0, err
    expected = [messages[i][1].decode() for i in (1, 4, 7)]
    assert out.splitlines() == expected  # the bodies byte for byte, one per line


@pytest.mark.broker
def test_bindings_and_domain_by_uuid_in_any_case(amqp_url: str, topic: str) -> None:
    dom = str(uuid.uuid4())
    tail = start_tail(
        "v1.*.domain.stopped.#", "--amqp-url", amqp_url, "--exchange", topic,
        "--domain", dom.upper(), "--count", "2",
    )  # fmt: skip
    publish(
        amqp_url,
        topic,
        [
            message("hv01", "stopped", "destroyed", name="other"),  # another domain
            message("hv01", "started", "booted", name="db", dom=dom),  # not bound
            message("hv01", "stopped", "destroyed", name="db", dom=dom),
            message("hv02", "stopped", "shutdown", name="db", dom=dom),
        ],
        mandatory=False,
    )
    code, out, err = finish(tail)
    assert code == 0, err
    assert [line[1:4] for line in fields(out)] == [
        ["hv01", "db", "stopped.destroyed"],
        ["hv02", "db", "stopped.shutdown"],
    ]


def read_terminal(master: int) -> str:
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the other side is closed and drained
        while chunk := os.read(master, 65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@pytest.mark.broker
@pytest.mark.parametrize(
    ("terminal", "flag", "coloured"),
    [(False, "--color", True), (True, None, True), (True, "--no-color", False)],
)
def test_colour_follows_the_terminal_unless_told(
    amqp_url: str, topic: str, terminal: bool, flag: str | None, coloured: bool
) -> None:
    args = ["--amqp-url", amqp_url, "--exchange", topic, "--count", "1", *([flag] if flag else [])]
    master, slave = pty.openpty() if terminal else (-1, -1)
    try:
        tail = start_tail(*args, stdout=slave if terminal else subprocess.PIPE)
        publish(amqp_url, topic, [message("hv01", "started", "booted")])
        code, out, err = finish(tail)
        if terminal:
            os.close(slave)
            slave = -1
            out = read_terminal(master)
    finally:
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
    assert code == 0, err
    assert "web1" in out and "started.booted" in out
    assert (ESC in out) == coloured, repr(out)


@pytest.mark.broker
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_it_cleanly(amqp_url: str, topic: str, signum: int) -> None:
    tail = start_tail("--amqp-url", amqp_url, "--exchange", topic)
    publish(amqp_url, topic, [message("hv01", "started", "booted")])
    tail.send_signal(signum)
    code, _out, err = finish(tail, timeout=10)
    assert code == 0, err
    assert err == ""  # no traceback, no "Aborted!"


@pytest.mark.broker
@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_a_reader_that_goes_away_ends_it_quietly(
    amqp_url: str, topic: str, mode: list[str]
) -> None:
    """`virtpub tail | head -1`: rich and click both end on a closed pipe with code 1 and
    nothing on stderr; the test keeps it that way."""
    tail = start_tail("--amqp-url", amqp_url, "--exchange", topic, *mode)
    assert tail.stdout is not None
    tail.stdout.close()
    publish(amqp_url, topic, [message("hv01", "started", "booted")])
    tail.wait(10)
    assert tail.returncode == 1
    assert tail.stderr is not None and tail.stderr.read() == b""


@pytest.mark.broker
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://guest:wrongsecret@{broker}/%2F", "refused the credentials"),
        ("amqp://guest:guest@127.0.0.1:1/%2F", "cannot reach the broker"),
        ("http://guest:wrongsecret@{broker}/", "invalid AMQP URL"),
        ("{amqp_url}", "does not exist"),
    ],
)
def test_errors_are_one_line_and_exit_1(amqp_url: str, url: str, says: str) -> None:
    missing = f"virtpub-test-missing-{uuid.uuid4().hex[:8]}"
    url = on_test_broker(url, amqp_url)
    result = CliRunner().invoke(tail_command, ["--amqp-url", url, "--exchange", missing])
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("virtpub tail: "), result.stderr
    assert says in lines[0]
    assert "wrongsecret" not in result.output and "Traceback" not in result.output
