"""deploy/README.md's procedure, as written, in a Debian 12 booted with systemd as PID 1.

The procedure is read from the document itself: its `sh` blocks after a
`<!-- procedure: NAME -->` comment run in order, in the checkout (bound read-only), so
the document and this test cannot drift. The unit is deploy/virtpub.service as shipped.
The container shares the host's network (the host's RabbitMQ on 127.0.0.1) and its
/run/libvirt (the host's real libvirtd with QEMU), so the daemon runs under the unit's
sandbox against both. The guest is the test's own, defined on the host's libvirtd.

Nothing here is mocked. One drop-in is the test's and not the procedure's: a 3 s
watchdog, so that several watchdog periods pass in seconds, not the shipped 30 s each.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import AMQP_URL, GUEST_XML, Consumer, Received, open_qemu
from tests.containers import Container, booted

pytestmark = [pytest.mark.broker, pytest.mark.libvirtd, pytest.mark.timeout(900)]

CHECKOUT = Path(__file__).resolve().parent.parent
DEPLOY_README = CHECKOUT / "deploy" / "README.md"
SOURCE = "/usr/src/virtpub"  # where the container sees the checkout
PROCEDURE_BLOCK = re.compile(r"<!-- procedure: (\w+) -->\n```sh\n(.*?)\n```", re.DOTALL)
TEST_WATCHDOG_S = 3
BURST_BEFORE_KILL_S = 0.3  # the burst runs this long before the kill, and after


def procedure() -> dict[str, str]:
    """The procedure's marked shell blocks, by name, in the document's order."""
    return dict(PROCEDURE_BLOCK.findall(DEPLOY_README.read_text()))


def test_the_procedure_has_its_install_and_start_steps() -> None:
    steps = procedure()
    assert list(steps) == ["install", "start"]
    assert "deploy/virtpub.service /etc/systemd/system/virtpub.service" in steps["install"]
    assert "systemctl enable --now virtpub" in steps["start"]


@pytest.fixture
def container() -> Iterator[Container]:
    with booted(
        "bookworm",
        binds=["/run/libvirt"],
        read_only_binds=[f"{CHECKOUT}:{SOURCE}"],
    ) as booted_container:
        yield booted_container


@pytest.fixture
def guest() -> Iterator[tuple[Any, str]]:
    """A tiny QEMU guest on the host's libvirtd (not started yet), removed afterwards."""
    conn = open_qemu()
    dom_uuid = str(uuid.uuid4())
    xml = GUEST_XML.format(name=f"virtpub-systemd-{dom_uuid[:8]}", uuid=dom_uuid)
    dom = conn.defineXML(xml)
    try:
        yield dom, dom_uuid
    finally:
        if dom_uuid in (d.UUIDString() for d in conn.listAllDomains()):
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        conn.close()


def run_step(container: Container, name: str) -> None:
    container.sh(f"cd {SOURCE}\n{procedure()[name]}", timeout=600)


def configure(container: Container, exchange: str) -> None:
    """The operator's edit of /etc/virtpub/virtpub.toml: this broker and exchange."""
    container.sh(
        f"sed -i -e 's|^amqp_url = .*|amqp_url = [\"{AMQP_URL}\"]|'"
        f" -e 's|^exchange = .*|exchange = \"{exchange}\"|' /etc/virtpub/virtpub.toml"
    )


def unit(container: Container, *properties: str) -> dict[str, str]:
    shown = container.run("systemctl", "show", "virtpub", *(f"--property={p}" for p in properties))
    return dict(line.split("=", 1) for line in shown.stdout.splitlines())


def journal(container: Container) -> str:
    return container.run("journalctl", "--unit=virtpub", "--output=cat", "--no-pager").stdout


def wait_for(what: str, holds: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not holds():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def subject_keys(messages: list[Received], subject: str) -> list[str]:
    return [m.routing_key.split(".domain.", 1)[1] for m in messages if m.body["subject"] == subject]


def assert_stopped_cleanly(container: Container, stops: int) -> None:
    """`systemctl stop` drained: the summary line, all confirmed, nothing left behind."""
    summaries = re.findall(
        r"stopped: (\d+) published, (\d+) confirmed, (\d+) left in the spool", journal(container)
    )
    assert len(summaries) == stops, summaries
    published, confirmed, left = map(int, summaries[-1])
    assert published > 0
    assert (confirmed, left) == (published, 0)


def test_the_procedure_runs_the_unit_under_systemd(
    container: Container, guest: tuple[Any, str], exchange: str
) -> None:
    """`exchange` is conftest's: a unique name, deleted afterwards."""
    dom, dom_uuid = guest
    run_step(container, "install")
    configure(container, exchange)
    everything = Consumer(AMQP_URL, exchange, ("#",))
    try:
        start_and_publish_a_guest(container, everything, dom, dom_uuid)
        container.run("systemctl", "stop", "virtpub")
        assert unit(container, "ActiveState")["ActiveState"] == "inactive"
        assert_stopped_cleanly(container, stops=1)
        watchdog_holds(container, everything)
        pairs = restart_after_sigkill(container, everything, dom, dom_uuid)
        container.run("systemctl", "stop", "virtpub")
        assert_stopped_cleanly(container, stops=2)  # the killed one logged none
        received = everything.quiet(1.0)
    finally:
        everything.close()
    nothing_lost(received, dom_uuid, pairs)


def start_and_publish_a_guest(
    container: Container, everything: Consumer, dom: Any, dom_uuid: str
) -> None:
    started_at = time.monotonic()
    run_step(container, "start")
    print(f"systemctl enable --now: {time.monotonic() - started_at:.2f} s")
    # Type=notify: `systemctl start` returned only once READY=1 came from virtpub, in the
    # datagram that also set this status; systemd counted the unit active from then on.
    state = unit(
        container,
        "Type",
        "ActiveState",
        "SubState",
        "NRestarts",
        "Result",
        "StatusText",
        "User",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    exec_at = int(state.pop("ExecMainStartTimestampMonotonic"))
    ready_at = int(state.pop("ActiveEnterTimestampMonotonic"))
    assert state == {
        "Type": "notify",
        "ActiveState": "active",
        "SubState": "running",
        "NRestarts": "0",
        "Result": "success",
        "StatusText": f"publishing to exchange {everything.exchange!r}",
        # The container has no libvirt group and the host's socket is root's: the
        # procedure chose its root drop-in.
        "User": "root",
    }, journal(container)
    assert ready_at > exec_at
    print(f"READY=1 {(ready_at - exec_at) / 1e6:.2f} s after the exec")
    startup = everything.collect(lambda m: any("snapshot.end" in x.routing_key for x in m))
    assert startup[0].routing_key.endswith(".publisher.capabilities")
    at_startup = subject_keys(startup, dom_uuid)
    assert "snapshot" in at_startup  # defined before the start

    dom.create()
    dom.destroy()
    # libvirtd with QEMU resumes the vCPUs before it reports the boot, and reports a
    # destroy as a host-initiated shutdown followed by the stop.
    expected = ["resumed.unpaused", "started.booted", "shutdown.host", "stopped.destroyed"]
    received = everything.collect(
        lambda m: len(subject_keys(m, dom_uuid)) >= len(at_startup) + len(expected), timeout=30
    )
    assert subject_keys(received, dom_uuid)[len(at_startup) :] == expected


def watchdog_holds(container: Container, everything: Consumer) -> None:
    """Several watchdog periods pass: still the first process, never killed by the watchdog."""
    # The test's own drop-in: the shipped 30 s watchdog, shortened (module docstring).
    container.sh(
        "install -d /etc/systemd/system/virtpub.service.d\n"
        f"printf '[Service]\\nWatchdogSec={TEST_WATCHDOG_S}\\n'"
        " >/etc/systemd/system/virtpub.service.d/test-watchdog.conf\n"
        "systemctl daemon-reload\n"
        "systemctl start virtpub"
    )
    assert unit(container, "WatchdogUSec")["WatchdogUSec"] == f"{TEST_WATCHDOG_S}s"
    first = unit(container, "WatchdogTimestampMonotonic", "MainPID")
    everything.quiet(4 * TEST_WATCHDOG_S)
    state = unit(
        container, "ActiveState", "NRestarts", "Result", "WatchdogTimestampMonotonic", "MainPID"
    )
    assert state["ActiveState"] == "active", journal(container)
    assert (state["NRestarts"], state["Result"], state["MainPID"]) == (
        "0",
        "success",
        first["MainPID"],
    )
    # Pings keep coming: systemd's record of the last one moved on.
    last_ping = int(state["WatchdogTimestampMonotonic"])
    assert last_ping > int(first["WatchdogTimestampMonotonic"])


def restart_after_sigkill(
    container: Container, everything: Consumer, dom: Any, dom_uuid: str
) -> int:
    """SIGKILL while a burst of events is being published, and the restart policy.

    Returns how many pause/resume pairs the guest went through around the kill."""
    dom.create()
    stop_burst = threading.Event()
    pairs = 0

    def burst() -> None:
        nonlocal pairs
        while not stop_burst.is_set():
            dom.suspend()
            dom.resume()
            pairs += 1

    burster = threading.Thread(target=burst, name="burst")
    burster.start()
    try:
        time.sleep(BURST_BEFORE_KILL_S)
        killed_at = time.monotonic()
        container.run("systemctl", "kill", "--signal=KILL", "virtpub")
        time.sleep(BURST_BEFORE_KILL_S)
    finally:
        stop_burst.set()
        burster.join()
    wait_for(
        "the restart after SIGKILL",
        lambda: (
            unit(container, "NRestarts", "ActiveState")
            == {"NRestarts": "1", "ActiveState": "active"}
        ),
        timeout=90,
    )
    print(f"active again {time.monotonic() - killed_at:.1f} s after SIGKILL")
    resent = re.findall(r"resending (\d+) message\(s\) left in the spool", journal(container))
    print(f"{pairs} pause/resume pairs around the kill; resent after the restart: {resent}")
    dom.destroy()
    dom.undefine()
    everything.collect(lambda m: "removed.undefined" in subject_keys(m, dom_uuid), timeout=60)
    return pairs


def nothing_lost(received: list[Received], dom_uuid: str, pairs: int) -> None:
    """Every sequence number from the first to the last arrived, but those the restart's
    `publisher.dropped.unclean_stop` names (reserved by the killed run, sent or not): any
    other gap is a lost message.

    A message unconfirmed at the kill is resent after the restart with the same id (and
    sequence), so a consumer dedupes it."""
    unique = {m.body["id"]: m for m in received}
    assert len({m.body["sequence"] for m in received}) == len(unique)
    sequences = sorted(m.body["sequence"] for m in unique.values())
    explained = {
        n
        for m in unique.values()
        if m.body["type"] == "org.virtpub.publisher.dropped"
        and m.body["data"]["reason"] == "unclean_stop"
        for n in range(m.body["data"]["first_sequence"], m.body["data"]["last_sequence"] + 1)
    }
    assert explained, "the restart after the kill names the sequences that may be missing"
    missing = set(range(sequences[0], sequences[-1] + 1)) - set(sequences)
    assert missing <= explained, sorted(missing - explained)[:20]
    keys = subject_keys(list(unique.values()), dom_uuid)
    paused = keys.count("suspended.paused")
    print(
        f"{len(received)} messages, {len(unique)} unique, {paused} of {pairs} pauses"
        " around the kill (those made while virtpub was down it never saw)"
    )
    assert 0 < paused <= pairs
    assert keys[-2:] == ["undefined.removed", "removed.undefined"]
    starts = [m for m in unique.values() if m.routing_key.endswith(".publisher.capabilities")]
    assert len(starts) == 3  # the start, the start after the stop, the restart
