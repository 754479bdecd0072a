"""The spool's bound and its drops, on a real SQLite file (no broker)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtpub.contract.envelope import OutgoingMessage, encode_properties
from virtpub.daemon import spool as spool_module
from virtpub.daemon.spool import KEEP_TYPE, DroppedRange, Spool, SpoolError, stored_size


def message(sequence: int, kind: str = "org.virtpub.domain.started") -> OutgoingMessage:
    body = b'{"pad": "' + b"x" * (sequence % 50) + b'"}'
    return OutgoingMessage(
        sequence=sequence,
        id=f"00000000-0000-4000-8000-{sequence:012d}",
        routing_key=f"v1.hv01.domain.{kind.rsplit('.', 1)[-1]}",
        type=kind,
        timestamp=1_700_000_000,
        properties=encode_properties(f"id-{sequence}", 1_700_000_000, kind, {}),
        body=body,
    )


def committed(spool: Spool, sequence: int, reserved: int | None = None) -> None:
    """Waits for the sync thread to make `sequence` (and the reservation) durable."""
    deadline = time.monotonic() + 10
    while (spool.last_sequence(), spool.reserved_sequence()) < (sequence, reserved or sequence):
        assert time.monotonic() < deadline, "the sync thread never committed"
        time.sleep(0.001)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    opened = Spool(tmp_path / "spool.sqlite3")
    yield opened
    opened.close()


def test_used_bytes_follow_appends_and_confirmations(spool: Spool) -> None:
    batch = [message(n) for n in range(1, 11)]
    spool.append(batch)
    assert spool.used_bytes == sum(map(stored_size, batch))
    spool.remove(batch[:4])
    assert spool.count() == 6  # waits for the janitor
    assert spool.used_bytes == sum(map(stored_size, batch[4:]))


def test_used_bytes_survive_a_reopen(tmp_path: Path) -> None:
    batch = [message(n) for n in range(1, 21)]
    first = Spool(tmp_path / "spool.sqlite3")
    first.append(batch)
    first.close()
    again = Spool(tmp_path / "spool.sqlite3")
    try:
        assert again.used_bytes == sum(map(stored_size, batch))
    finally:
        again.close()


def test_drop_oldest_frees_what_is_needed_after_the_handed_messages(spool: Spool) -> None:
    batch = [message(n, "org.virtpub.domain.resumed" if n % 2 else "org.virtpub.domain.suspended")
             for n in range(1, 101)]  # fmt: skip
    spool.append(batch)
    need = sum(map(stored_size, batch[10:15])) - 1  # a little less than five messages
    [span] = spool.drop_oldest(after=10, need=need)
    assert (span.first, span.last, span.count) == (11, 15, 5)
    assert span.types == {"org.virtpub.domain.resumed": 3, "org.virtpub.domain.suspended": 2}
    kept = [m.sequence for m in spool.after(0, 1000)]
    assert kept == [*range(1, 11), *range(16, 101)]
    assert spool.used_bytes == sum(stored_size(m) for m in batch if m.sequence in kept)


def test_drop_oldest_never_drops_a_report_of_earlier_drops(spool: Spool) -> None:
    batch = [message(n, KEEP_TYPE if n == 3 else "org.virtpub.domain.started")
             for n in range(1, 8)]  # fmt: skip
    spool.append(batch)
    need = sum(stored_size(batch[i]) for i in (0, 1, 3, 4)) - 1  # four messages, not three
    spans = spool.drop_oldest(after=0, need=need)
    assert [(s.first, s.last) for s in spans] == [(1, 2), (4, 5)]
    assert [m.sequence for m in spool.after(0, 100)] == [3, 6, 7]


def test_drop_oldest_with_everything_handed_drops_nothing(spool: Spool) -> None:
    spool.append([message(n) for n in range(1, 6)])
    assert spool.drop_oldest(after=5, need=10_000) == []
    assert spool.count() == 5


def test_adjacent_drops_merge_into_one_report() -> None:
    spans = [
        DroppedRange(11, 20, {"a": 10}, 2.0),
        DroppedRange(1, 10, {"a": 4, "b": 6}, 1.0),
        DroppedRange(30, 31, {"b": 2}, 3.0),
    ]
    merged = DroppedRange.merge(spans)
    assert merged == [
        DroppedRange(1, 20, {"a": 14, "b": 6}, 1.0),
        DroppedRange(30, 31, {"b": 2}, 3.0),
    ]


def test_returned_messages_are_kept_after_their_ack_deletes_them(spool: Spool) -> None:
    batch = [message(n) for n in range(1, 4)]
    spool.append(batch)
    spool.keep_returned(batch[1], 312, "NO_ROUTE")
    spool.remove(batch)
    assert spool.count() == 0
    [(kept, code, text)] = spool.returned()
    assert (kept, code, text) == (batch[1], 312, "NO_ROUTE")
    assert spool.returned_count() == 1


def test_an_append_takes_the_confirmations_along_in_its_own_transaction(
    spool: Spool, tmp_path: Path
) -> None:
    """In a burst, confirmations cost no transaction of their own: the next append deletes
    them (the janitor waits 20 ms to gather; the append comes first)."""
    first = [message(n) for n in range(1, 6)]
    second = [message(n) for n in range(6, 9)]
    spool.append(first)
    committed(spool, 5)
    spool.keep_returned(first[0], 312, "NO_ROUTE")
    spool.remove(first)
    spool.append(second)
    with sqlite3.connect(f"file:{tmp_path / 'spool.sqlite3'}?mode=ro", uri=True) as db:
        left = [row[0] for row in db.execute("SELECT sequence FROM messages ORDER BY 1")]
        kept = [row[0] for row in db.execute("SELECT sequence FROM returned")]
    assert left == [6, 7, 8]
    assert kept == [1]
    assert spool.used_bytes == sum(map(stored_size, second))


def rows(tmp_path: Path) -> list[int]:
    with sqlite3.connect(f"file:{tmp_path / 'spool.sqlite3'}?mode=ro", uri=True) as db:
        return [row[0] for row in db.execute("SELECT sequence FROM messages ORDER BY 1")]


def test_a_confirm_that_comes_before_the_commit_leaves_no_row(spool: Spool, tmp_path: Path) -> None:
    """The daemon publishes while the commit runs: a message confirmed first is committed
    and confirmed at once, so it is never written."""
    batch = [message(n) for n in range(1, 6)]
    spool.remove(batch[:3])
    spool.append(batch)
    assert rows(tmp_path) == [4, 5]
    assert spool.used_bytes == sum(map(stored_size, batch[3:]))
    committed(spool, 5)


def test_a_confirm_of_a_later_batch_waits_for_its_commit(spool: Spool, tmp_path: Path) -> None:
    """The janitor sweeps while a confirmed row is not yet committed: the confirmation stays
    listed, and the row still leaves once its append comes."""
    spool.append([message(1)])
    later = [message(2), message(3)]
    spool.remove(later)
    assert spool.count() == 1, "the janitor deleted nothing it could not see"
    spool.append(later)
    assert rows(tmp_path) == [1]
    spool.remove([message(1)])
    assert spool.count() == 0
    assert spool.used_bytes == 0


def test_each_commit_reserves_sequences_and_a_clean_close_gives_them_back(
    tmp_path: Path,
) -> None:
    first = Spool(tmp_path / "spool.sqlite3")
    first.append([message(1), message(2)], reserve=1000)
    committed(first, 2, 1002)
    first.close()
    unclean = Spool(tmp_path / "spool.sqlite3")
    assert (unclean.last_sequence(), unclean.reserved_sequence()) == (2, 1002), (
        "a run that never gave its reservation back stopped uncleanly"
    )
    unclean.append([message(1003)], reserve=10)
    unclean.release_reservation()
    unclean.close()
    clean = Spool(tmp_path / "spool.sqlite3")
    assert (clean.last_sequence(), clean.reserved_sequence()) == (1003, 1003)
    clean.close()


def test_a_failed_commit_loses_no_confirmation(spool: Spool, tmp_path: Path) -> None:
    """A transaction that fails puts the confirmations it took back: the next commit
    deletes them."""
    spool.JANITOR_PERIOD_S = 2.0  # the failing append, not the janitor, takes the confirmation
    spool.append([message(1), message(2)])
    committed(spool, 2)
    spool.remove([message(1)])
    with pytest.raises(SpoolError, match="cannot write"):
        spool.append([message(2)])  # sequence 2 is already there: the commit fails
    spool.append([message(3)])
    assert rows(tmp_path) == [2, 3]


class HeldFsync:
    """Holds the spool's fsync until released: a stand-in for a slow disk, the one thing
    here that cannot be slowed for real. Everything else is the real SQLite file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.release = threading.Event()
        self.calls = 0
        real = os.fsync

        def held(descriptor: int) -> None:
            self.calls += 1
            self.release.wait(10)
            real(descriptor)

        monkeypatch.setattr(spool_module.os, "fsync", held)


def test_an_append_returns_before_its_fsync_and_is_committed_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = HeldFsync(monkeypatch)
    moved = threading.Event()
    spool = Spool(tmp_path / "spool.sqlite3")
    spool.on_durable(moved.set)
    try:
        batch = [message(n) for n in range(1, 4)]
        spool.append(batch, reserve=100)  # returns with the fsync held
        assert rows(tmp_path) == [1, 2, 3], "written, where a kill leaves it"
        assert (spool.last_sequence(), spool.reserved_sequence()) == (0, 0), "not committed"
        spool.remove(batch)
        time.sleep(0.1)  # the janitor's period, five times over
        assert rows(tmp_path) == [1, 2, 3], "a confirmed row waits for its commit"
        disk.release.set()
        assert moved.wait(10), "on_durable tells the daemon"
        committed(spool, 3, 103)
        deadline = time.monotonic() + 10
        while rows(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows(tmp_path) == [], "committed and confirmed: gone"
    finally:
        disk.release.set()
        spool.close()


def test_a_confirm_of_a_row_written_but_not_committed_outlives_the_next_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next append takes only the confirmations it can settle; one of a row still
    waiting for its fsync stays listed, and the row leaves once committed."""
    disk = HeldFsync(monkeypatch)
    spool = Spool(tmp_path / "spool.sqlite3")
    try:
        first = [message(1), message(2)]
        spool.append(first)
        spool.remove(first)
        spool.append([message(3)])  # while 1 and 2 wait for their fsync
        disk.release.set()
        committed(spool, 3)
        deadline = time.monotonic() + 10
        while rows(tmp_path) != [3] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rows(tmp_path) == [3]
    finally:
        disk.release.set()
        spool.close()


def test_many_appends_before_one_fsync_are_committed_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = HeldFsync(monkeypatch)
    spool = Spool(tmp_path / "spool.sqlite3")
    try:
        spool.append([message(1)])
        deadline = time.monotonic() + 10
        while disk.calls == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert disk.calls == 1, "the first append's fsync is under way"
        for n in range(2, 50):
            spool.append([message(n)])  # while the first fsync is held
        disk.release.set()
        committed(spool, 49)
        assert disk.calls <= 3, f"{disk.calls} fsyncs for 49 appends"
    finally:
        disk.release.set()
        spool.close()


def _append_then_die(path: Path, written: Any) -> None:
    """In a child: appends with every fsync held forever, then dies by SIGKILL."""
    spool_module.os.fsync = lambda _descriptor: threading.Event().wait()  # type: ignore[assignment]
    spool = Spool(path)
    spool.append([message(n) for n in range(1, 6)], reserve=10)
    written.set()
    os.kill(os.getpid(), 9)


def test_an_append_not_yet_fsynced_survives_a_kill(tmp_path: Path) -> None:
    """What the kernel holds outlives the process: the restart has every row."""
    context = multiprocessing.get_context("spawn")
    written = context.Event()
    child = context.Process(target=_append_then_die, args=(tmp_path / "spool.sqlite3", written))
    child.start()
    child.join(30)
    assert written.is_set() and child.exitcode == -9
    again = Spool(tmp_path / "spool.sqlite3")
    try:
        assert [m.sequence for m in again.after(0, 100)] == [1, 2, 3, 4, 5]
        assert (again.last_sequence(), again.reserved_sequence()) == (5, 15)
    finally:
        again.close()


def wal_size(spool: Spool) -> int:
    wal = Path(f"{spool.path}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_stays_small_while_messages_flow_through(spool: Spool) -> None:
    """Appends and confirmations back to back, as in a flood: the janitor's checkpoints let
    the WAL start over, so its file never grows past the size that would have to be cut
    back. (Without the second, locked checkpoint it never started over: it grew by about
    0.9 MB every 1,000 messages, here to 90 MB.)"""
    sequence, largest = 0, 0
    for _ in range(2000):
        batch = [message(sequence + n) for n in range(1, 51)]
        sequence += 50
        spool.append(batch, reserve=1000)
        spool.remove(batch)
        largest = max(largest, wal_size(spool))
    assert largest <= Spool.WAL_SIZE_LIMIT


def test_the_janitor_cuts_back_an_oversized_wal_without_an_append(spool: Spool) -> None:
    """One huge transaction (a backlog written at once) leaves a WAL file far over the
    limit; once it is confirmed, the janitor's checkpoint cuts the file back itself, so
    no append pays for the cut (SQLite's own limit cut it in the next append, which
    then took 20-40 ms). The janitor's own sweeps wait a while here, so the cut is seen
    being made by the sweep that `count` runs."""
    spool.JANITOR_PERIOD_S = 3.0
    backlog = [message(n)._replace(body=b"x" * 4000) for n in range(1, 20_001)]
    spool.append(backlog)
    assert wal_size(spool) > Spool.WAL_SIZE_LIMIT
    spool.remove(backlog)
    assert spool.count() == 0  # the janitor deleted them and checkpointed
    assert wal_size(spool) <= Spool.WAL_SIZE_LIMIT
