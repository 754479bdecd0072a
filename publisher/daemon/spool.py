"""A durable FIFO of accepted messages: in it before publishing, out of it after the broker's ack.

Beside the messages it keeps what virtpub last published about each domain, in
the same transaction: after a crash or restart the two always agree, so the
resync compares libvirt's listing with exactly what consumers were told.

SQLite in WAL mode. An append is one transaction, written to the WAL without waiting
for the disk (`synchronous=NORMAL`): from then on it survives a kill, as the kernel
holds it. A sync thread of the spool's own then fsyncs the WAL, and one fsync makes
durable every append written before it, so a burst costs few fsyncs and no append
waits for one: the fsync, the slowest part of an append (1 ms at the median here, 3
at p99), is off the daemon's path. Until that fsync an append counts as not yet
committed: `last_sequence` and `reserved_sequence` tell what is durable, and
`on_durable` tells when they move. The spool also keeps the last sequence number
handed out, so a restarted publisher continues without a gap.

The spool is bounded by what its unconfirmed messages take (`stored_size`,
counted as they come and go, so no query is needed to know it); the daemon
applies the full-spool policy. Messages the broker returned as unroutable even
through the alternate exchange are kept in a table of their own, for the
operator, instead of vanishing with their ack.

The daemon hands a message to the broker while its commit runs, so a confirm can come
before the commit: the row leaves only once it is both committed (durable) and
confirmed (a confirmation of a row not yet committed waits for that commit, and an
append skips the rows already confirmed). So that no sequence number is ever given
twice, each commit also reserves the numbers the next batch may put on the wire before
its own commit (`reserved_sequence`, once durable); a clean close gives the unused ones
back. A reservation still open at the next start means the last run ended without a
clean stop.

Confirmed messages are deleted by a janitor thread of the spool's own, in
batches and without fsync: the AMQP I/O thread never waits for the disk, and a
delete lost to a power cut only means a resend (with the same id) of a message
the broker already had, which at-least-once allows. One connection serves both
threads under a lock: two connections would contend for SQLite's write lock,
whose busy handler sleeps for up to tens of milliseconds.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.event import DomainState
from virtpub.core.tracker import Record

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    sequence    INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    type        TEXT NOT NULL,
    timestamp   INTEGER NOT NULL,
    properties  BLOB NOT NULL,
    body        BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS returned (
    sequence    INTEGER PRIMARY KEY,
    id          TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    type        TEXT NOT NULL,
    timestamp   INTEGER NOT NULL,
    properties  BLOB NOT NULL,
    body        BLOB NOT NULL,
    reply_code  INTEGER NOT NULL,
    reply_text  TEXT NOT NULL,
    returned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS domains (
    backend     TEXT NOT NULL,
    uuid        TEXT NOT NULL,
    name        TEXT NOT NULL,
    persistent  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    state_code  INTEGER NOT NULL,
    reason_code INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    PRIMARY KEY (backend, uuid)
);
"""

log = logging.getLogger(__name__)

KEEP_TYPE = "org.virtpub.publisher.dropped"
"""Never dropped to make room: the reports of earlier drops."""
ROW_OVERHEAD = 40
"""Bytes a stored message takes beyond its fields: SQLite's record header and index entry."""
_STORED_SIZE_SQL = (
    f"length(id) + length(routing_key) + length(type) + length(properties) + length(body)"
    f" + {ROW_OVERHEAD}"
)


def stored_size(message: OutgoingMessage) -> int:
    """What a spooled message counts against the spool's bound (ids and keys are ASCII)."""
    return (
        len(message.id)
        + len(message.routing_key)
        + len(message.type)
        + len(message.properties)
        + len(message.body)
        + ROW_OVERHEAD
    )


@dataclass(frozen=True, slots=True)
class DroppedRange:
    """Spooled messages given up to make room: sequences first..last, all of them."""

    first: int
    last: int
    types: Mapping[str, int]
    at: float
    """Wall-clock time of the drop."""

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    @staticmethod
    def merge(ranges: Iterable[DroppedRange]) -> list[DroppedRange]:
        """Adjacent ranges as one, so a long outage is told in one message, not hundreds."""
        merged: list[DroppedRange] = []
        for current in sorted(ranges, key=lambda r: r.first):
            previous = merged[-1] if merged else None
            if previous is None or previous.last + 1 != current.first:
                merged.append(current)
                continue
            types = collections.Counter(previous.types)
            types.update(current.types)
            merged[-1] = DroppedRange(previous.first, current.last, dict(types), previous.at)
        return merged


Confirmation = tuple[int, int]
"""(sequence, stored size) of a message the broker confirmed."""
Returned = tuple[OutgoingMessage, int, str, float]
"""A message the broker returned: reply code, reply text, and when."""

DomainChanges = Mapping[str, tuple[Mapping[str, Record], AbstractSet[str]]]
"""Per backend: the records that changed and the UUIDs that no longer exist."""


class SpoolError(Exception):
    """The spool cannot be opened or written; one line for the operator."""


class SpoolDiskFullError(SpoolError):
    """The state directory's filesystem is full: nothing was written, and trying again
    once there is room succeeds."""


class Spool:
    JANITOR_PERIOD_S = 0.02
    SYNC_PERIOD_S = 0.005
    """How long the sync thread lets appends gather before one fsync commits them all: at
    1,000 events a second an fsync each kept the disk busy most of the time, and the
    broker's own fsyncs (its confirms) queued behind them. Publishing does not wait
    for it (the reservation runs 1,000 sequences ahead)."""
    CHECKPOINT_PERIOD_S = 0.25
    """How often the janitor checkpoints while messages flow, so the WAL starts over from its
    beginning: its file then holds about what this period writes (4 MB at 1,000 events
    a second, a message taking four pages of WAL when each is its own transaction, 20 MB
    in a tight loop of appends; a checkpoint every 5,000 confirmations let it reach
    76-136 MB at 1,000 a second). By time, not by size: the WAL's file only ever grows,
    and what it holds since it started over is known only inside SQLite (reading it
    from the -shm file here opens and closes that file, which drops SQLite's POSIX
    locks on it: the process died of SIGBUS)."""
    WAL_SIZE_LIMIT = 64 << 20
    """A WAL file bigger than this at a checkpoint (a flood's or a huge transaction's) is cut
    back to nothing by the janitor, once: it would otherwise keep its largest size.
    Appends never cut it: SQLite's own limit (`journal_size_limit`) truncates in the
    first commit after the WAL starts over, and that commit, an append, took 20-40 ms
    to cut 80 MB, the pipeline stalled behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._confirmed: list[tuple[int, int]] = []
        """(sequence, stored size) of confirmed messages the janitor has yet to delete."""
        self._returned: list[Returned] = []
        self._confirmed_lock = threading.Lock()
        self._janitor_lock = threading.Lock()
        self._janitor_failing = False
        self._wake = threading.Event()
        self._closing = False
        self._sync_wake = threading.Event()
        self._sync_lock = threading.Lock()
        self._sync_failing = False
        self._on_durable: Callable[[], None] = _nothing
        self._wal = Path(f"{path}-wal")
        self._checkpointed_at = 0.0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect("NORMAL")
            # Checkpoints copy the WAL into the database and fsync it, and cutting an 80 MB
            # WAL file back took 20-40 ms: the janitor does both, so no append waits for
            # either.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("PRAGMA journal_size_limit=-1")
            self._db.executescript(_SCHEMA)
            row = self._db.execute(f"SELECT TOTAL({_STORED_SIZE_SQL}) FROM messages").fetchone()
            self._bytes = int(row[0])
            self._committed = self._meta("sequence", 0)
            """The last sequence committed (durable): confirmations beyond it wait for it."""
            self._reserved = max(self._meta("reserved", 0), self._committed)
            self._written, self._written_reserved = self._committed, self._reserved
            """The same, as written: durable at the sync thread's next fsync."""
            self._checkpointer = self._connect("FULL")
        except (OSError, sqlite3.Error) as err:
            raise SpoolError(f"spool: cannot open {str(path)!r}: {err}") from err
        self._janitor = threading.Thread(target=self._sweep, name="spool-janitor", daemon=True)
        self._janitor.start()
        self._syncer = threading.Thread(target=self._sync, name="spool-sync", daemon=True)
        self._syncer.start()

    def on_durable(self, callback: Callable[[], None]) -> None:
        """`callback` runs on the sync thread each time `last_sequence` or
        `reserved_sequence` moves; it must not block or raise."""
        self._on_durable = callback

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    @property
    def used_bytes(self) -> int:
        """What the unconfirmed messages take, by `stored_size`."""
        return self._bytes

    def _meta(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else default

    def last_sequence(self) -> int:
        """The last sequence committed (durable)."""
        with self._lock:
            return self._committed

    def reserved_sequence(self) -> int:
        """The last sequence the daemon may have put on the wire before committing it.

        Above `last_sequence` only while a run is going, or after a run that did not
        stop cleanly: the numbers between may have reached consumers, or never existed.
        A reservation counts once it is durable.
        """
        with self._lock:
            return self._reserved

    def after(self, sequence: int, limit: int) -> list[OutgoingMessage]:
        """Up to `limit` unconfirmed messages that follow `sequence`, in original order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, id, routing_key, type, timestamp, properties, body"
                " FROM messages WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            ).fetchall()
        return [_message(row) for row in rows]

    def domains(self) -> dict[str, dict[str, Record]]:
        """What was last published about each domain, per backend."""
        with self._lock:
            rows = self._db.execute(
                "SELECT backend, uuid, name, persistent, state, reason, state_code, reason_code,"
                " seq FROM domains"
            ).fetchall()
        result: dict[str, dict[str, Record]] = {}
        for backend, uuid, name, persistent, state, reason, state_code, reason_code, seq in rows:
            result.setdefault(backend, {})[uuid] = Record(
                name, bool(persistent), DomainState(state, reason, state_code, reason_code), seq
            )
        return result

    def append(
        self,
        messages: Sequence[OutgoingMessage],
        domains: DomainChanges | None = None,
        *,
        reserve: int = 0,
    ) -> None:
        """Writes `messages` with the domain records they lead to, in one transaction, and
        reserves the `reserve` sequences that follow them; returns without waiting for
        the disk (they are committed at the sync thread's next fsync).

        A message the broker confirmed before this commit is not written at all: its
        row would leave in the same transaction. Confirmations of earlier rows are
        deleted along, so in a burst they cost no transaction of their own.
        """
        if not messages:
            return
        first, last = messages[0].sequence, messages[-1].sequence
        with self._lock:
            confirmed, returned = self._take_settled()
            done = [(s, size) for s, size in confirmed if s <= self._committed]
            early = {s for s, _ in confirmed if first <= s <= last}
            waiting = [
                (s, size) for s, size in confirmed if s > self._committed and s not in early
            ]  # written before this batch but not yet committed, or of a later batch
            fresh = [m for m in messages if m.sequence not in early]
            reserved = max(self._written_reserved, last + reserve)
            try:
                self._db.execute("BEGIN")
                self._write_domains(domains or {})
                self._db.executemany(
                    "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", (m[:7] for m in fresh)
                )
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    [("sequence", last), ("reserved", reserved)],
                )
                self._forget(done, returned)
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                self._put_back(confirmed, returned)
                raise self._write_error(err) from err
            self._put_back(waiting, [])
            self._written, self._written_reserved = last, reserved
            self._bytes += sum(map(stored_size, fresh)) - sum(size for _, size in done)
        self._sync_wake.set()

    def release_reservation(self) -> None:
        """At a clean stop, with every accepted message committed: the sequences reserved
        and never used are given back, so the next start continues without a gap."""
        with self._transaction():
            self._db.execute("UPDATE meta SET value=? WHERE key='reserved'", (self._written,))
            self._written_reserved = self._written
        self._sync_now()

    def _sync(self) -> None:
        """The sync thread: after each append, one fsync of the WAL makes every append
        written before it durable; appends written meanwhile wait for the next."""
        while not self._closing:
            self._sync_wake.wait()
            time.sleep(self.SYNC_PERIOD_S)
            self._sync_wake.clear()
            if not self._sync_now():
                time.sleep(0.1)
                self._sync_wake.set()

    def _sync_now(self) -> bool:
        """Makes what is written durable; False (logged once) if the fsync failed."""
        with self._sync_lock:  # one at a time: the durable marks never move back
            return self._sync_written()

    def _sync_written(self) -> bool:
        with self._lock:
            written = self._written, self._written_reserved
            if written == (self._committed, self._reserved):
                return True
        try:
            descriptor = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            descriptor = None  # checkpointed whole and removed: nothing left to make durable
        except OSError as err:
            return self._sync_failed(err)
        if descriptor is not None:
            try:
                os.fsync(descriptor)
            except OSError as err:
                return self._sync_failed(err)
            finally:
                os.close(descriptor)
        with self._lock:
            self._committed, self._reserved = written
        if self._sync_failing:
            self._sync_failing = False
            log.info("spool: fsync works again")
        self._wake.set()  # confirmations waiting for this commit can go now
        self._on_durable()
        return True

    def _sync_failed(self, err: OSError) -> bool:
        if not self._sync_failing:
            self._sync_failing = True
            log.error("spool: cannot fsync %r: %s; trying again", str(self._wal), err)
        return False

    def _write_domains(self, domains: DomainChanges) -> None:
        for backend, (changed, removed) in domains.items():
            self._db.executemany(
                "INSERT OR REPLACE INTO domains VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (backend, uuid, r.name, int(r.persistent), r.state.state,
                     r.state.reason, r.state.state_code, r.state.reason_code, r.seq)
                    for uuid, r in changed.items()
                ],
            )  # fmt: skip
            self._db.executemany(
                "DELETE FROM domains WHERE backend = ? AND uuid = ?",
                [(backend, uuid) for uuid in removed],
            )

    def drop_oldest(self, after: int, need: int) -> list[DroppedRange]:
        """Deletes the oldest messages following `after` until `need` bytes are free.

        `after` is the last sequence handed to the broker: messages it holds are
        not dropped, as they may yet be confirmed. Nor are earlier reports of drops
        (`KEEP_TYPE`): a consumer learns of every gap even when the outage lasts.
        """
        with self._lock:
            rows = self._db.execute(
                f"SELECT sequence, type, {_STORED_SIZE_SQL} FROM messages WHERE sequence > ?"
                " ORDER BY sequence",
                (after,),
            )
            spans: list[tuple[int, int, collections.Counter[str]]] = []
            freed = 0
            for sequence, mtype, size in rows:
                if freed >= need:
                    break
                if mtype == KEEP_TYPE:
                    continue
                if not spans or spans[-1][1] + 1 != sequence:
                    spans.append((sequence, sequence, collections.Counter()))
                first, _, types = spans[-1]
                types[mtype] += 1
                spans[-1] = (first, sequence, types)
                freed += size
            rows.close()
        dropped = [
            DroppedRange(first, last, dict(types), time.time()) for first, last, types in spans
        ]
        if not dropped:
            return []
        with self._transaction():
            self._db.executemany(
                "DELETE FROM messages WHERE sequence >= ? AND sequence <= ?",
                [(span.first, span.last) for span in dropped],
            )
            self._bytes -= freed
        return dropped

    def remove(self, messages: Iterable[OutgoingMessage]) -> None:
        """Forgets confirmed messages; returns at once (the janitor deletes them)."""
        confirmed = [(m.sequence, stored_size(m)) for m in messages]
        with self._confirmed_lock:
            self._confirmed.extend(confirmed)
        self._wake.set()

    def keep_returned(self, message: OutgoingMessage, reply_code: int, reply_text: str) -> None:
        """Keeps a message the broker returned as unroutable; returns at once (the janitor
        stores it, before it deletes the message when its ack arrives)."""
        with self._confirmed_lock:
            self._returned.append((message, reply_code, reply_text, time.time()))
        self._wake.set()

    def returned(self) -> list[tuple[OutgoingMessage, int, str]]:
        """The messages kept as returned, oldest first, with the broker's reply."""
        self._settle()
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, id, routing_key, type, timestamp, properties, body,"
                " reply_code, reply_text FROM returned ORDER BY sequence"
            ).fetchall()
        return [(_message(row[:7]), int(row[7]), str(row[8])) for row in rows]

    def _sweep(self) -> None:
        while not self._closing:
            self._wake.wait()
            time.sleep(self.JANITOR_PERIOD_S)  # let confirmations gather into one delete
            self._wake.clear()
            self._delete_confirmed()

    def _delete_confirmed(self) -> None:
        with self._janitor_lock:
            self._delete_batch()
            now = time.monotonic()
            if now - self._checkpointed_at >= self.CHECKPOINT_PERIOD_S:
                self._checkpointed_at = now
                self._checkpoint()

    def _wal_bytes(self) -> int:
        """What the WAL file takes on disk."""
        try:
            return self._wal.stat().st_size
        except OSError:
            return 0  # checkpointed whole and removed

    def _checkpoint(self) -> None:
        """Copies the WAL into the database, so the WAL starts over from its beginning.

        First on a connection of its own, without the lock: the copy and its fsyncs take
        milliseconds, and appends must not wait for them. Appends written meanwhile
        keep that checkpoint from being complete, and the WAL only starts over after a
        complete one (in a steady flood it grew by 21 MB every 25,000 messages, without
        end), so a second one copies just those, under the lock (about 1 ms here); it
        also cuts back a WAL file that outgrew WAL_SIZE_LIMIT.
        """
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            with self._lock:
                oversized = self._wal_bytes() > self.WAL_SIZE_LIMIT
                mode = "TRUNCATE" if oversized else "PASSIVE"
                self._checkpointer.execute(f"PRAGMA wal_checkpoint({mode})")
        except sqlite3.Error as err:
            self._janitor_failed("could not checkpoint", err)

    def _delete_batch(self) -> None:
        """For when no append comes to take the confirmations along."""
        if not self._confirmed and not self._returned:
            return
        try:
            with self._lock:
                confirmed, returned = self._take_settled()
                done = [(s, size) for s, size in confirmed if s <= self._committed]
                waiting = [(s, size) for s, size in confirmed if s > self._committed]
                if not done and not returned:
                    self._put_back(waiting, [])
                    return
                try:
                    self._db.execute("BEGIN")
                    self._forget(done, returned)
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._put_back(confirmed, returned)
                    raise
                finally:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                self._put_back(waiting, [])
                self._bytes -= sum(size for _, size in done)
        except sqlite3.Error as err:
            # The confirmations stay listed, and the next sweep or append tries again.
            self._janitor_failed("could not delete confirmed messages", err)
            return
        if self._janitor_failing:
            self._janitor_failing = False
            log.info("spool: deleting confirmed messages again")

    def _janitor_failed(self, what: str, err: sqlite3.Error) -> None:
        """One line when the janitor starts failing (a full disk fails every sweep)."""
        if not self._janitor_failing:
            self._janitor_failing = True
            log.warning("spool: %s: %s; trying again", what, err)

    def _take_settled(self) -> tuple[list[Confirmation], list[Returned]]:
        """What the I/O thread listed as confirmed and returned, taken whole: a transaction
        that fails (on a full disk, say) puts it back (`_put_back`), so none is lost."""
        with self._confirmed_lock:
            confirmed, self._confirmed = self._confirmed, []
            returned, self._returned = self._returned, []
        return confirmed, returned

    def _put_back(self, confirmed: list[Confirmation], returned: list[Returned]) -> None:
        with self._confirmed_lock:
            self._confirmed[:0] = confirmed
            self._returned[:0] = returned

    def _forget(self, confirmed: list[Confirmation], returned: list[Returned]) -> None:
        """In the caller's transaction: keeps what the broker returned, then deletes what it
        confirmed (returned copies first: the ack of a returned message follows its return)."""
        if returned:
            self._db.executemany(
                "INSERT OR REPLACE INTO returned VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*m[:7], code, text, at) for m, code, text, at in returned],
            )
        if confirmed:
            self._db.executemany(
                "DELETE FROM messages WHERE sequence BETWEEN ? AND ?",
                _ranges(sorted(s for s, _ in confirmed)),
            )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit (one fsync) for a whole batch."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                raise self._write_error(err) from err

    def _write_error(self, err: sqlite3.Error) -> SpoolError:
        """Rolls back the failed transaction; the error to raise, for the operator."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return SpoolDiskFullError(
                f"spool: the filesystem of {str(self.path.parent)!r} is full: {err}"
            )
        return SpoolError(f"spool: cannot write {str(self.path)!r}: {err}")

    def _settle(self) -> None:
        """Commits what is written and deletes what is confirmed, for an exact count (at
        startup, at shutdown and on a metrics scrape; never on the path of events)."""
        self._sync_now()
        self._delete_confirmed()

    def reclaim(self) -> None:
        """After a full disk: deletes what is confirmed, then checkpoints and truncates the
        WAL. Until a checkpoint the WAL only grows (into any space freed meanwhile), and
        the janitor's checkpoint waits for deletes that a full disk fails."""
        self._delete_confirmed()
        with self._janitor_lock:
            try:
                self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as err:
                self._janitor_failed("could not checkpoint", err)

    def first_sequence(self) -> int:
        """The sequence of the oldest unconfirmed message (0 when there is none)."""
        self._settle()
        with self._lock:
            row = self._db.execute("SELECT MIN(sequence) FROM messages").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        """Messages not yet confirmed by the broker."""
        self._settle()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def returned_count(self) -> int:
        self._settle()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM returned").fetchone()[0])

    def close(self) -> None:
        self._closing = True
        self._sync_wake.set()
        self._syncer.join(5)
        self._sync_now()
        self._wake.set()
        self._janitor.join(5)
        self._delete_confirmed()
        with self._lock:
            self._checkpointer.close()
            self._db.close()


def _nothing() -> None:
    """The `on_durable` callback until one is set."""


def _message(row: Sequence[Any]) -> OutgoingMessage:
    sequence, mid, key, mtype, timestamp, properties, body = row
    return OutgoingMessage(
        sequence=sequence,
        id=mid,
        routing_key=key,
        type=mtype,
        timestamp=timestamp,
        properties=bytes(properties),
        body=bytes(body),
    )


def _ranges(sequences: list[int]) -> list[tuple[int, int]]:
    """Sorted sequences as (first, last) runs: confirmations come mostly in runs, and one
    range delete costs SQLite far less than a delete per row."""
    runs: list[tuple[int, int]] = []
    for sequence in sequences:
        if runs and runs[-1][1] + 1 == sequence:
            runs[-1] = (runs[-1][0], sequence)
        else:
            runs.append((sequence, sequence))
    return runs
