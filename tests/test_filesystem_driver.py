"""The filesystem driver on real inotify: tmp directories, real editors' save sequences,
hostile files, vanishing directories and a flooded inotify queue. No broker is involved:
the driver's signals are collected as the daemon's `accept` would receive them.

Tests run as root, which reads any file whatever its mode: "unreadable" is covered by
what root cannot read as a regular file either, a FIFO, a directory and symbolic links.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from virtpub.contract import schemas
from virtpub.contract.envelope import Envelope
from virtpub.core.driver import Driver, DriverError
from virtpub.core.event import SHUTOFF, BackendChange, ConfigRejected, DomainEvent
from virtpub.core.tracker import Tracker
from virtpub.drivers.files import watcher
from virtpub.drivers.files.config_files import MAX_BYTES
from virtpub.drivers.files.driver import FilesystemDriver
from virtpub.drivers.files.rules import Config, changes, owners

HOST = "testhost"
DEBOUNCE = 0.1
QUIET = 0.7
"""Silence that shows nothing more is coming: longer than the debounce plus the 0.5 s
watchdog holds a move's first half while it waits for the second."""
U1 = "11111111-1111-4111-8111-000000000001"
U2 = "11111111-1111-4111-8111-000000000002"


def xml(name: str, uuid: str = U1, extra: str = "") -> str:
    return f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>{extra}</domain>"


class Signals:
    """The driver's `emit`: collects what it is handed, from the driver's threads."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self._changed = threading.Condition()

    def __call__(self, signal: object) -> None:
        with self._changed:
            self.items.append(signal)
            self._changed.notify_all()

    def wait_for(self, done: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"timed out; received {self.items!r}")
                self._changed.wait(min(remaining, 0.05))  # `done` may watch the driver too

    def wait_count(self, kind: type, count: int, timeout: float = 5.0) -> None:
        self.wait_for(lambda: len(self.of(kind)) >= count, timeout)

    def settle(self) -> list[object]:
        """Everything received, once nothing more came for QUIET seconds."""
        with self._changed:
            while True:
                seen = len(self.items)
                self._changed.wait(QUIET)
                if len(self.items) == seen:
                    return list(self.items)

    def of(self, kind: type) -> list[Any]:
        return [item for item in self.items if isinstance(item, kind)]

    def domain(self) -> list[tuple[str, str | None, str, str]]:
        """The domain events as (event, detail, name, file name)."""
        return [
            (e.event, e.detail, e.domain.name, os.path.basename(str(e.info["path"])))
            for e in self.of(DomainEvent)
        ]

    def clear(self) -> None:
        with self._changed:
            self.items.clear()


Start = Callable[..., tuple[FilesystemDriver, Signals]]


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    directory = tmp_path / "qemu"
    directory.mkdir()
    return directory


@pytest.fixture
def start(conf: Path) -> Iterator[Start]:
    started: list[FilesystemDriver] = []

    def start_(
        watches: list[tuple[Path, str]] | None = None, **options: float
    ) -> tuple[FilesystemDriver, Signals]:
        driver = FilesystemDriver(
            watches or [(conf, "libvirt-xml")], HOST, debounce_s=DEBOUNCE, **options
        )
        signals = Signals()
        driver.start(signals)
        started.append(driver)
        return driver, signals

    yield start_
    for driver in started:
        driver.stop()


def names(driver: FilesystemDriver) -> dict[str, str]:
    return {facts.uuid: facts.name for facts in driver.list_domains()}


# -- the driver's face ------------------------------------------------------------------------


def test_startup_lists_existing_configs_without_announcing(conf: Path, start: Start) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    checked: Driver = driver
    assert checked.backend == f"virtpub://{HOST}/filesystem/" + str(conf).replace("/", "%2F")
    assert driver.list_domains()[0].state == SHUTOFF
    assert [(f.uuid, f.name, f.id, f.persistent) for f in driver.list_domains()] == [
        (U1, "web", None, True)
    ]
    facts = driver.lookup(U1)
    assert facts is not None and facts != "gone" and facts.name == "web"
    assert driver.lookup(U2) == "gone"
    caps = driver.capabilities()
    assert (caps.driver, caps.source, caps.uri) == ("filesystem", driver.backend, conf.as_uri())
    assert {name: (e.status, e.reason) for name, e in caps.events.items()} == {
        "added": ("derived", None),
        "defined": ("filesystem", f"config files in {conf}"),
        "removed": ("derived", None),
        "snapshot": ("derived", None),
        "undefined": ("filesystem", f"config files in {conf}"),
    }
    assert {e.basis for e in caps.events.values()} == {"inotify"}
    assert driver.polled == frozenset()
    assert signals.settle() == []  # the daemon's startup resync announces what was there


def test_created_file_is_one_defined_added(conf: Path, start: Start) -> None:
    _, signals = start()
    (conf / "web.xml").write_text(xml("web"))
    signals.wait_count(DomainEvent, 1)
    assert signals.settle() == signals.of(DomainEvent)
    [event] = signals.of(DomainEvent)
    assert (event.event, event.detail, event.domain.uuid, event.domain.name) == (
        "defined",
        "added",
        U1,
        "web",
    )
    assert event.domain.id is None and event.codes is None and event.state is None
    assert event.origin == "filesystem"
    assert dict(event.info) == {"path": str(conf / "web.xml"), "format": "libvirt-xml"}


def test_edit_in_place_is_one_update_and_an_identical_rewrite_none(
    conf: Path, start: Start
) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    edited = xml("web", extra="<vcpu>2</vcpu>")
    with (conf / "web.xml").open("w") as file:  # written in pieces, as a slow editor would
        for piece in (edited[:30], edited[30:]):
            file.write(piece)
            file.flush()
            time.sleep(DEBOUNCE / 3)
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("defined", "updated", "web", "web.xml")]
    signals.clear()
    (conf / "web.xml").write_text(edited)
    assert signals.settle() == []
    assert names(driver) == {U1: "web"}


def test_vim_style_save_is_one_update(conf: Path, start: Start) -> None:
    target = conf / "web.xml"
    target.write_text(xml("web"))
    _, signals = start()
    swap = conf / ".web.xml.swp"
    swap.write_bytes(b"\0vim swap")
    (conf / "4913").write_text("")  # vim's check that it may create files here
    (conf / "4913").unlink()
    os.rename(target, conf / "web.xml~")
    target.write_text(xml("web", extra="<vcpu>4</vcpu>"))
    (conf / "web.xml~").unlink()
    swap.unlink()
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("defined", "updated", "web", "web.xml")]
    assert signals.of(ConfigRejected) == []


def test_atomic_rename_saves_are_one_update_each(conf: Path, start: Start) -> None:
    target = conf / "web.xml"
    target.write_text(xml("web"))
    _, signals = start()
    (conf / ".web.xml.tmp").write_text(xml("web", extra="<vcpu>2</vcpu>"))
    os.replace(conf / ".web.xml.tmp", target)
    signals.wait_count(DomainEvent, 1)
    (conf / "web.xml.new").write_text(xml("web", extra="<vcpu>3</vcpu>"))  # libvirt's way
    os.replace(conf / "web.xml.new", target)
    signals.wait_count(DomainEvent, 2)
    signals.settle()
    assert signals.domain() == [("defined", "updated", "web", "web.xml")] * 2


def test_renaming_the_file_keeps_the_domain(conf: Path, start: Start) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    os.rename(conf / "web.xml", conf / "frontend.xml")
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    [event] = signals.of(DomainEvent)
    assert (event.event, event.detail, event.domain.name) == ("defined", "updated", "web")
    assert event.info["path"] == str(conf / "frontend.xml")
    assert event.info["previous_path"] == str(conf / "web.xml")
    assert names(driver) == {U1: "web"}


@pytest.mark.parametrize("gap", [0.0, 3 * DEBOUNCE], ids=["together", "apart"])
def test_domain_rename_is_one_defined_renamed(conf: Path, start: Start, gap: float) -> None:
    """libvirt renames by writing the new file, then deleting the old one; with a gap the
    two files claim the UUID for a while."""
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    (conf / "www.xml").write_text(xml("www"))
    time.sleep(gap)
    (conf / "web.xml").unlink()
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("defined", "renamed", "www", "www.xml")]
    assert names(driver) == {U1: "www"}


def test_move_in_and_move_out(conf: Path, start: Start, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "web.xml").write_text(xml("web"))
    driver, signals = start()
    os.rename(outside / "web.xml", conf / "web.xml")
    signals.wait_count(DomainEvent, 1)
    os.rename(conf / "web.xml", outside / "web.xml")
    signals.wait_count(DomainEvent, 2)
    signals.settle()
    assert signals.domain() == [
        ("defined", "added", "web", "web.xml"),
        ("undefined", "removed", "web", "web.xml"),
    ]
    assert driver.lookup(U1) == "gone"


def test_deleted_file_is_one_undefined_removed(conf: Path, start: Start) -> None:
    (conf / "web.xml").write_text(xml("web"))
    (conf / "db.xml").write_text(xml("db", U2))
    driver, signals = start()
    (conf / "web.xml").unlink()
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("undefined", "removed", "web", "web.xml")]
    assert names(driver) == {U2: "db"}


def test_editor_and_foreign_files_are_ignored(conf: Path, start: Start) -> None:
    driver, signals = start()
    for name in (
        ".web.xml.swp",
        ".web.xml.swx",
        "web.xml~",
        "4913",
        "#web.xml#",
        ".#web.xml",
        ".web.xml",
        "web.xml.tmp",
        "web.cfg",
        "notes.txt",
    ):
        (conf / name).write_bytes(b"\0<not a config")
    (conf / "subdir").mkdir()
    assert signals.settle() == []
    assert driver.list_domains() == []


def test_invalid_edit_keeps_the_domain_until_fixed(conf: Path, start: Start) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    (conf / "web.xml").write_text("<domain><name>web</name>")
    signals.wait_count(ConfigRejected, 1)
    assert signals.settle() == signals.of(ConfigRejected)
    assert names(driver) == {U1: "web"}
    (conf / "web.xml").write_text(xml("web2"))
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("defined", "renamed", "web2", "web.xml")]
    assert len(signals.of(ConfigRejected)) == 1


def test_xl_without_uuid_is_identified_by_name(conf: Path, start: Start, tmp_path: Path) -> None:
    xen = tmp_path / "xen"
    xen.mkdir()
    driver, signals = start([(conf, "libvirt-xml"), (xen, "xl")])
    assert sorted(driver.uri.split(",")) == sorted([conf.as_uri(), xen.as_uri()])
    (xen / "pv.cfg").write_text("name = 'pv'  # no uuid: xl makes one up at create\n")
    (xen / "hvm.cfg").write_text(f"name = 'hvm'\nuuid = '{U2}'\n")
    (conf / "kvm.xml").write_text(xml("kvm"))
    signals.wait_count(DomainEvent, 3)
    [pv] = [e for e in signals.of(DomainEvent) if e.domain.name == "pv"]
    assert pv.info["identity"] == "name" and pv.info["format"] == "xl"
    [hvm] = [e for e in signals.of(DomainEvent) if e.domain.name == "hvm"]
    assert hvm.domain.uuid == U2 and "identity" not in hvm.info
    signals.clear()
    (xen / "pv.cfg").write_text("name = 'pv2'\n")
    signals.wait_count(DomainEvent, 2)
    signals.settle()
    assert signals.domain() == [
        ("undefined", "removed", "pv", "pv.cfg"),
        ("defined", "added", "pv2", "pv.cfg"),
    ]
    removed, added = signals.of(DomainEvent)
    assert removed.domain.uuid == pv.domain.uuid != added.domain.uuid
    assert set(names(driver).values()) == {"pv2", "hvm", "kvm"}


# -- hostile files ----------------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{n} "{("&lol" + str(n - 1) + ";") * 10}">'.replace("&lol0;", "&lol;")
        for n in range(1, 10)
    )
    + "]><domain><name>&lol9;</name></domain>"
)


def test_each_hostile_file_is_rejected_once(conf: Path, start: Start, tmp_path: Path) -> None:
    driver, signals = start()
    expected = {
        "malformed.xml": "malformed",
        "dtd.xml": "forbidden_xml",
        "laughs.xml": "forbidden_xml",
        "huge.xml": "too_large",
        "binary.xml": "binary",
        "fifo.xml": "not_regular",
        "dir.xml": "not_regular",
        "dangling.xml": "symlink",
        "loop.xml": "symlink",
        "link.xml": "symlink",
        "noname.xml": "missing_name",
        "baduuid.xml": "bad_uuid",
        "network.xml": "not_a_domain",
    }
    (conf / "malformed.xml").write_text("<domain><name>x</name>")
    (conf / "dtd.xml").write_text('<!DOCTYPE domain SYSTEM "http://evil/x.dtd">' + xml("x"))
    (conf / "laughs.xml").write_text(BILLION_LAUGHS)
    with (conf / "huge.xml").open("wb") as file:
        file.truncate(MAX_BYTES + 1)  # sparse: too large without a disk to match
    (conf / "binary.xml").write_bytes(os.urandom(64) + b"\0")
    os.mkfifo(conf / "fifo.xml")
    (conf / "dir.xml").mkdir()
    (conf / "dangling.xml").symlink_to(tmp_path / "nowhere.xml")
    (conf / "loop.xml").symlink_to(conf / "loop.xml")
    (tmp_path / "real.xml").write_text(xml("linked"))
    (conf / "link.xml").symlink_to(tmp_path / "real.xml")
    (conf / "noname.xml").write_text(f"<domain><uuid>{U1}</uuid></domain>")
    (conf / "baduuid.xml").write_text("<domain><name>x</name><uuid>42</uuid></domain>")
    (conf / "network.xml").write_text("<network><name>default</name></network>")
    signals.wait_count(ConfigRejected, len(expected))
    signals.settle()
    got = {os.path.basename(r.path): r.reason for r in signals.of(ConfigRejected)}
    assert got == expected
    assert len(signals.of(ConfigRejected)) == len(expected)  # once each
    assert signals.of(DomainEvent) == [] and driver.list_domains() == []
    [sample] = [r for r in signals.of(ConfigRejected) if r.path.endswith("dtd.xml")]
    assert sample.backend == driver.backend and sample.message and sample.received_at > 0
    assert driver.rejected == len(expected)

    rescans = driver.rescans
    driver.request_rescan()
    signals.wait_for(lambda: driver.rescans > rescans)
    assert len(signals.of(ConfigRejected)) == len(expected)  # a rescan does not repeat them
    (conf / "good.xml").write_text(xml("good"))
    signals.wait_count(DomainEvent, 1)
    assert signals.domain() == [("defined", "added", "good", "good.xml")]


def _hostile(rng: random.Random, index: int) -> bytes:
    valid = xml(f"d{index}").encode()
    kind = index % 6
    if kind == 0:
        return rng.randbytes(rng.randint(1, 2048))
    if kind == 1:
        return valid[: rng.randrange(len(valid))]
    if kind == 2:
        return f'<!DOCTYPE d [<!ENTITY e{index} "{"x" * rng.randint(1, 99)}">]>'.encode() + valid
    if kind == 3:
        return f"<domain><uuid>{U1}</uuid><memory>{index}</memory></domain>".encode()
    if kind == 4:
        return valid.replace(U1.encode(), rng.randbytes(8).hex().encode())
    return bytes(b ^ rng.randrange(1, 256) if i % 7 == 3 else b for i, b in enumerate(valid))


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_a_thousand_hostile_files_are_all_rejected_and_memory_stays_flat(
    conf: Path, start: Start
) -> None:
    driver, signals = start()
    rng = random.Random(20081107)
    before = _rss_kib()
    for index in range(1000):
        (conf / f"h{index:04}.xml").write_bytes(_hostile(rng, index))
    signals.wait_count(ConfigRejected, 1000, timeout=30)
    signals.settle()
    rejected = {r.path for r in signals.of(ConfigRejected)}
    assert len(rejected) == len(signals.of(ConfigRejected)) == driver.rejected == 1000
    assert signals.of(DomainEvent) == [] and driver.failures == 0
    grown = _rss_kib() - before
    assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
    (conf / "good.xml").write_text(xml("good"))
    signals.wait_count(DomainEvent, 1)
    assert names(driver) == {U1: "good"}


# -- directories ------------------------------------------------------------------------------


def _arrive(staging: Path, target: Path, files: dict[str, str]) -> None:
    """Makes a directory appear at `target` with its files already in it."""
    staging.mkdir()
    for name, text in files.items():
        (staging / name).write_text(text)
    os.rename(staging, target)


def test_a_directory_created_after_start_is_picked_up(start: Start, tmp_path: Path) -> None:
    later = tmp_path / "later"
    driver, signals = start([(later, "libvirt-xml")])
    [lost] = signals.items
    assert isinstance(lost, BackendChange) and not lost.connected
    assert lost.reason == f"{later} does not exist"
    with pytest.raises(DriverError, match="does not exist"):
        driver.list_domains()
    assert driver.lookup(U1) is None  # cannot say: it may be in the missing directory
    _arrive(tmp_path / "staging", later, {"web.xml": xml("web")})
    signals.wait_count(BackendChange, 2)
    assert signals.of(BackendChange)[1].connected
    assert names(driver) == {U1: "web"}
    assert signals.of(DomainEvent) == []  # the daemon's resync on reconnect announces it
    (later / "db.xml").write_text(xml("db", U2))
    signals.wait_count(DomainEvent, 1)
    assert signals.domain() == [("defined", "added", "db", "db.xml")]


def test_a_removed_directory_is_reported_and_watched_again(
    conf: Path, start: Start, tmp_path: Path
) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    shutil.rmtree(conf)
    signals.wait_count(BackendChange, 1)
    signals.settle()
    [lost] = signals.items  # the files went with the directory: no undefined for them
    assert isinstance(lost, BackendChange) and not lost.connected and lost.reason
    with pytest.raises(DriverError):
        driver.list_domains()
    assert driver.lookup(U1) is None
    _arrive(tmp_path / "staging", conf, {"db.xml": xml("db", U2)})
    signals.wait_count(BackendChange, 2)
    back = signals.items[-1]
    assert isinstance(back, BackendChange) and back.connected and back.reason is None
    assert names(driver) == {U2: "db"}
    (conf / "web.xml").write_text(xml("web"))
    signals.wait_count(DomainEvent, 1)
    assert signals.domain() == [("defined", "added", "web", "web.xml")]


def test_a_replaced_directory_is_watched_anew(conf: Path, start: Start, tmp_path: Path) -> None:
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "db.xml").write_text(xml("db", U2))
    os.rename(conf, tmp_path / "old")
    os.rename(tmp_path / "new", conf)
    signals.wait_count(BackendChange, 2)
    lost, back = signals.of(BackendChange)
    assert (lost.connected, back.connected) == (False, True)
    assert names(driver) == {U2: "db"}
    signals.clear()
    (tmp_path / "old" / "ghost.xml").write_text(xml("ghost"))  # the old inode: not watched
    (conf / "web.xml").write_text(xml("web"))
    signals.wait_count(DomainEvent, 1)
    signals.settle()
    assert signals.domain() == [("defined", "added", "web", "web.xml")]


# -- blind spots ------------------------------------------------------------------------------

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def operator_level_error() -> Iterator[None]:
    """`--log-level error`, as the daemon sets it: on the root logger."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    yield
    root.setLevel(previous)


def test_inotify_overflow_triggers_a_rescan(
    conf: Path, start: Start, caplog: pytest.LogCaptureFixture, operator_level_error: None
) -> None:
    """The kernel queue is left no room only while the driver creates its inotify instance
    (the limit is read then), so other processes' watches keep the normal one. With no room
    every change overflows, so the domains can only be found by the rescan the overflow asks
    for; the operator's level hides watchdog's warning, which must not hide the overflow."""
    if os.access(MAX_QUEUED, os.W_OK):
        normal = MAX_QUEUED.read_text()
        MAX_QUEUED.write_text("0")
        try:
            driver, signals = start(rescan_interval=3600.0)
        finally:
            MAX_QUEUED.write_text(normal)
    else:
        driver, signals = start(rescan_interval=3600.0)
    for index in range(300):
        uuid = f"{index:08x}-1111-4111-8111-000000000000"
        (conf / f"d{index:03}.xml").write_text(xml(f"d{index:03}", uuid))
    if not os.access(MAX_QUEUED, os.W_OK):
        driver.request_rescan()  # the queue cannot be shrunk: stand in for the detection
    signals.wait_for(lambda: len(driver.list_domains()) == 300, timeout=10)
    signals.settle()
    assert sorted(names(driver).values()) == [f"d{i:03}" for i in range(300)]
    assert len(signals.of(DomainEvent)) == 300  # once each, whether seen or rescanned
    if os.access(MAX_QUEUED, os.W_OK):
        assert driver.overflows > 0
        assert not [r for r in caplog.records if r.name.startswith("watchdog")]


def test_a_flood_beyond_the_pending_bound_becomes_a_rescan(
    conf: Path, start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watcher, "MAX_PENDING", 8)
    driver, signals = start(rescan_interval=3600.0)
    for index in range(40):
        uuid = f"{index:08x}-1111-4111-8111-000000000000"
        (conf / f"d{index:02}.xml").write_text(xml(f"d{index:02}", uuid))
    signals.wait_count(DomainEvent, 40)
    signals.settle()
    assert len(signals.of(DomainEvent)) == 40 and len(names(driver)) == 40
    assert driver.overflows > 0 and driver.rescans > 0


def test_periodic_rescans_are_silent_when_nothing_changed(conf: Path, start: Start) -> None:
    (conf / "web.xml").write_text(xml("web"))
    (conf / "bad.xml").write_text("<domain>")
    driver, signals = start(rescan_interval=0.2)
    signals.wait_for(lambda: driver.rescans >= 3)
    assert [type(s) for s in signals.items] == [ConfigRejected]


# -- lifecycle --------------------------------------------------------------------------------


def test_start_refuses_what_cannot_work(tmp_path: Path) -> None:
    plain = tmp_path / "file.xml"
    plain.write_text("")
    with pytest.raises(DriverError, match="is not a directory"):
        FilesystemDriver([(plain, "libvirt-xml")], HOST).start(Signals())
    with pytest.raises(DriverError, match="unknown format 'json'"):
        FilesystemDriver([(tmp_path, "json")], HOST)
    with pytest.raises(DriverError, match="given twice"):
        FilesystemDriver([(tmp_path, "xl"), (tmp_path / ".", "libvirt-xml")], HOST)
    with pytest.raises(DriverError, match="no directory"):
        FilesystemDriver([], HOST)


def test_stop_is_idempotent_and_ends_every_thread(conf: Path) -> None:
    before = set(threading.enumerate())
    driver = FilesystemDriver([(conf, "libvirt-xml")], HOST)
    driver.start(Signals())
    with pytest.raises(DriverError, match="already started"):
        driver.start(Signals())
    driver.stop()
    driver.stop()
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(DriverError, match="already started"):
        driver.start(Signals())


# -- from file changes to existence -----------------------------------------------------------


def _config(path: str, name: str, uuid: str = U1, digest: bytes = b"1") -> Config:
    return Config(path, "libvirt-xml", uuid, name, False, digest)


def test_the_first_claim_on_a_uuid_keeps_it() -> None:
    old, copy = _config("/d/web.xml", "web"), _config("/d/a-copy.xml", "web")
    assert owners([copy, old], {U1: old}) == {U1: old}
    assert owners([copy, old], {}) == {U1: copy}  # new claims: first path
    renamed = _config("/d/www.xml", "www")
    assert changes({U1: old}, owners([renamed, old], {U1: old})) == []
    [change] = changes({U1: old}, owners([renamed], {U1: old}))
    assert (change.event, change.detail, change.config, change.previous) == (
        "defined",
        "renamed",
        renamed,
        old,
    )


def test_changes_end_before_they_begin() -> None:
    before = {U1: _config("/d/a.xml", "a")}
    after = {U2: _config("/d/a.xml", "b", U2)}
    found = [(c.event, c.detail, c.config.uuid) for c in changes(before, after)]
    assert found == [("undefined", "removed", U1), ("defined", "added", U2)]
    edited = {U1: _config("/d/a.xml", "a", digest=b"2")}
    assert [(c.event, c.detail) for c in changes(before, edited)] == [("defined", "updated")]
    assert changes(before, dict(before)) == []


def test_the_tracker_derives_existence_from_these_events(conf: Path, start: Start) -> None:
    """Config-file domains are listed shut off: a listing must not replay `started`, and a
    deleted file must end its domain. Every message built from them fits the schema."""
    (conf / "web.xml").write_text(xml("web"))
    driver, signals = start()
    tracker = Tracker(driver.backend)
    published = tracker.reconcile(driver.list_domains(), "resync", time.time())
    assert [(p.event.event, p.event.detail) for p in published] == [
        ("added", "defined"),
        ("defined", None),
    ]

    def publish(event: DomainEvent) -> list[tuple[str, str | None, object]]:
        out = tracker.apply(event, driver.lookup)
        published.extend(out)
        return [(p.event.event, p.event.detail, p.rename) for p in out]

    (conf / "db.xml").write_text(xml("db", U2))
    signals.wait_count(DomainEvent, 1)
    assert publish(signals.of(DomainEvent)[0]) == [
        ("added", "defined", None),
        ("defined", "added", None),
    ]
    (conf / "dbnew.xml").write_text(xml("db-new", U2))
    (conf / "db.xml").unlink()
    signals.wait_count(DomainEvent, 2)
    assert publish(signals.of(DomainEvent)[1]) == [("defined", "renamed", ("db", "db-new"))]
    (conf / "web.xml").unlink()
    signals.wait_count(DomainEvent, 3)
    assert publish(signals.of(DomainEvent)[2]) == [
        ("undefined", "removed", None),
        ("removed", "undefined", None),
    ]
    assert set(tracker.records) == {U2}

    validator = Draft202012Validator(
        schemas.info(schemas.DOMAIN_EVENT).load(), format_checker=FormatChecker()
    )
    envelope = Envelope(HOST)
    for sequence, publication in enumerate(published, start=1):
        validator.validate(json.loads(envelope.domain_event(publication, sequence).body))
