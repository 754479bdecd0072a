"""`virtpub run --watch` end to end: real inotify, the real daemon process, the real broker.

The acceptance of the filesystem issue: a Xen-style directory with no libvirt at
all gives exactly the expected messages for a create, a vim-style edit, a rename
and a delete; 1,000 hostile files are each rejected and reported while the
daemon stays up with flat memory; and beside a real libvirtd that writes its own
config directory, one define is one `defined`.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    HOST_ID,
    QEMU_URI,
    Consumer,
    Received,
    assert_valid,
    guest_xml,
)

U1 = "6f2b8d1e-3c4a-4b5e-9f60-7a8b9c0d1e2f"


def xl(name: str, memory: int = 512, uuid_: str = U1) -> str:
    return f'name = "{name}"\nuuid = "{uuid_}"\nmemory = {memory}\nvcpus = 1\n'


@dataclass
class Virtpub:
    """virtpub as its own process; its log goes to a file (a pipe nobody reads would fill
    up and block the logging thread: a thousand rejected files log a thousand lines)."""

    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        log = self.log.read_text()
        assert self.process.returncode == 0, log
        return log


@pytest.fixture
def run_virtpub(amqp_url: str, exchange: str, tmp_path: Path) -> Iterator[Callable[..., Virtpub]]:
    started: list[Virtpub] = []

    def start(*args: str) -> Virtpub:
        log = tmp_path / f"virtpub-{len(started)}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "virtpub", "run", "--amqp-url", amqp_url,
                 "--exchange", exchange, "--state-dir", str(tmp_path / "state"),
                 "--host-id", HOST_ID, *args],
                stdout=subprocess.DEVNULL, stderr=sink,
            )  # fmt: skip
        started.append(Virtpub(process, log))
        return started[-1]

    yield start
    for virtpub in started:
        if virtpub.process.poll() is None:
            virtpub.process.send_signal(signal.SIGTERM)
            virtpub.process.wait(timeout=30)


def domain_keys(messages: list[Received]) -> list[str]:
    return [m.routing_key for m in messages if ".domain." in m.routing_key]


def snapshot_done(messages: list[Received]) -> bool:
    return any(m.routing_key.endswith("snapshot.end") for m in messages)


def test_xen_style_directory_without_libvirt(
    tmp_path: Path,
    consumer_factory: Callable[..., Consumer],
    run_virtpub: Callable[..., Virtpub],
) -> None:
    xen = tmp_path / "xen"
    xen.mkdir()
    consumer = consumer_factory("#")
    virtpub = run_virtpub("--watch", f"{xen}:xl")
    messages = consumer.collect(snapshot_done)
    capabilities = messages[0]
    assert capabilities.routing_key == f"v1.{HOST_ID}.publisher.capabilities"
    (backend,) = capabilities.body["data"]["backends"]
    assert backend["driver"] == "filesystem"
    assert {name: backend["events"][name]["status"] for name in ("defined", "undefined")} == {
        "defined": "filesystem",
        "undefined": "filesystem",
    }
    start = len(messages)

    def step(action: Callable[[], None], count: int) -> list[str]:
        before = len(domain_keys(consumer.messages))
        action()
        consumer.collect(lambda m: len(domain_keys(m)) >= before + count)
        consumer.quiet(1.0)  # debounce, then nothing more
        return domain_keys(consumer.messages)[before:]

    web = xen / "web.cfg"
    assert step(lambda: web.write_text(xl("web")), 2) == [
        f"v1.{HOST_ID}.domain.added.defined",
        f"v1.{HOST_ID}.domain.defined.added",
    ]

    def vim_save() -> None:
        swap = xen / ".web.cfg.swp"
        swap.write_bytes(b"\x00vim swap")
        web.rename(xen / "web.cfg~")
        web.write_text(xl("web", memory=1024))
        (xen / "web.cfg~").unlink()
        swap.unlink()

    assert step(vim_save, 1) == [f"v1.{HOST_ID}.domain.defined.updated"]

    def atomic_save() -> None:
        temporary = xen / ".web.cfg.tmp"
        temporary.write_text(xl("web", memory=2048))
        temporary.replace(web)

    assert step(atomic_save, 1) == [f"v1.{HOST_ID}.domain.defined.updated"]
    db = xen / "db.cfg"
    assert step(lambda: web.rename(db), 1) == [f"v1.{HOST_ID}.domain.defined.updated"]
    assert step(lambda: db.write_text(xl("db", memory=2048)), 1) == [
        f"v1.{HOST_ID}.domain.defined.renamed"
    ]
    assert step(db.unlink, 2) == [
        f"v1.{HOST_ID}.domain.undefined.removed",
        f"v1.{HOST_ID}.domain.removed.undefined",
    ]
    ours = [m for m in consumer.messages[start:] if ".domain." in m.routing_key]
    assert {m.body["subject"] for m in ours} == {U1}
    assert [m.body["data"]["seq"] for m in ours] == list(range(1, len(ours) + 1))
    assert all(m.body["data"]["origin"] in ("filesystem", "derived") for m in ours)
    assert ours[-3].body["data"]["info"]["path"] == str(db)
    for message in consumer.messages:
        assert_valid(message)
    virtpub.stop()


def hostile(kind: str, rng: random.Random) -> bytes:
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2048))) + b"\x00"
    if kind == "bomb":
        return (
            b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><domain><name>&b;</name></domain>'
        )
    if kind == "external":
        return b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/shadow">]><domain>&x;</domain>'
    if kind == "truncated":
        return b"<domain><name>half" + bytes(rng.randrange(97, 123) for _ in range(20))
    if kind == "nameless":
        return f"<domain><uuid>{uuid.UUID(int=rng.getrandbits(128))}</uuid></domain>".encode()
    return b"<domain><name>x</name><uuid>not-a-uuid</uuid></domain>"  # bad_uuid


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_thousand_hostile_files_are_each_rejected_and_reported(
    tmp_path: Path,
    consumer_factory: Callable[..., Consumer],
    run_virtpub: Callable[..., Virtpub],
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    consumer = consumer_factory("v1.*.config.invalid", "v1.*.publisher.#")
    virtpub = run_virtpub("--watch", str(conf))
    consumer.collect(snapshot_done)
    rng = random.Random(2026)
    kinds = ["binary", "bomb", "external", "truncated", "nameless", "bad_uuid"]
    paths: list[Path] = []

    def drop(count: int) -> None:
        for _ in range(count):
            path = conf / f"hostile-{len(paths):04d}.xml"
            path.write_bytes(hostile(rng.choice(kinds), rng))
            paths.append(path)

    def invalid(messages: list[Received]) -> list[Received]:
        return [m for m in messages if m.routing_key.endswith("config.invalid")]

    drop(100)
    consumer.collect(lambda m: len(invalid(m)) >= 100, timeout=60)
    baseline = rss_kib(virtpub.process.pid)
    for i in range(3):  # symlinks: a loop, a dangling one, one to a valid file elsewhere
        (conf / f"link-{i}.xml").symlink_to(conf / f"link-{(i + 1) % 2}.xml")
        paths.append(conf / f"link-{i}.xml")
    (conf / "big.xml").write_bytes(b"<domain>" + b" " * (2 << 20) + b"</domain>")
    paths.append(conf / "big.xml")
    drop(1000 - len(paths))
    consumer.collect(lambda m: len(invalid(m)) >= 1000, timeout=120)
    consumer.quiet(1.5)
    reported = invalid(consumer.messages)
    assert sorted(m.body["data"]["path"] for m in reported) == sorted(map(str, paths))
    reasons = {m.body["data"]["reason"] for m in reported}
    assert {"binary", "forbidden_xml", "malformed", "missing_name", "bad_uuid"} <= reasons
    assert {"symlink", "too_large"} <= reasons
    for message in reported[:50]:
        assert_valid(message)
    assert virtpub.process.poll() is None, "virtpub must stay up"
    growth = rss_kib(virtpub.process.pid) - baseline
    assert growth < 20 * 1024, f"RSS grew {growth} KiB over 900 hostile files"
    assert not [m for m in consumer.messages if ".domain." in m.routing_key]
    virtpub.stop()


@pytest.mark.parametrize("policy", ["fallback", "always"])
def test_beside_a_real_libvirtd_one_define_is_one_defined(
    policy: str,
    qemu: Any,
    consumer_factory: Callable[..., Consumer],
    run_virtpub: Callable[..., Virtpub],
) -> None:
    consumer = consumer_factory("v1.*.domain.#", "v1.*.publisher.#")
    virtpub = run_virtpub(
        "--libvirt-uri", QEMU_URI, "--watch", "/etc/libvirt/qemu", "--watch-defines", policy
    )
    consumer.collect(lambda m: sum(snapshot_done([x]) for x in m) >= 2, timeout=30)
    capabilities = consumer.messages[0].body["data"]["backends"]
    files = next(b for b in capabilities if b["driver"] == "filesystem")
    expected_status = "unsupported" if policy == "fallback" else "filesystem"
    assert files["events"]["defined"]["status"] == expected_status
    xml, dom_uuid = guest_xml()

    def ours(messages: list[Received]) -> list[Received]:
        return [m for m in messages if m.body.get("subject") == dom_uuid]

    dom = qemu.defineXML(xml)
    assert Path(f"/etc/libvirt/qemu/{dom.name()}.xml").exists()
    consumer.collect(lambda m: len(ours(m)) >= 2)
    consumer.quiet(1.0)  # the file's change settles (debounce) before the undefine
    dom.undefine()
    expected = 4 if policy == "fallback" else 8  # added/defined/undefined/removed, per source

    consumer.collect(lambda m: len(ours(m)) >= expected, timeout=30)
    consumer.quiet(1.5)
    defined = [m for m in ours(consumer.messages) if ".domain.defined." in m.routing_key]
    sources = sorted(m.body["source"] for m in defined)
    if policy == "fallback":
        assert len(defined) == 1 and "/libvirt/" in sources[0]
    else:
        assert len(defined) == 2 and "/filesystem/" in sources[0] and "/libvirt/" in sources[1]
    stderr = virtpub.stop()
    if policy == "fallback":
        assert "duplicate event(s) suppressed" in stderr
