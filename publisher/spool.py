"""A durable FIFO of accepted messages: in it before publishing, out of it after the broker's ack.

Beside the messages it keeps what virtpub last published about each domain, in
the same transaction: after a crash or restart the two always agree, so the
resync compares libvirt's listing with exactly what consumers were told.

SQLite in WAL mode with `synchronous=FULL`: a committed append survives a kill
and a power cut. Appends come in batches, one transaction (one fsync) each, so
durability does not cost an fsync per event. The spool also keeps the last
sequence number handed out, so a restarted publisher continues without a gap.

Confirmed messages are deleted by a janitor thread of the spool's own, in
batches and without fsync: the AMQP I/O thread never waits for the disk, and a
delete lost to a power cut only means a resend (with the same id) of a message
the broker already had, which at-least-once allows. One connection serves both
threads under a lock: two connections would contend for SQLite's write lock,
whose busy handler sleeps for up to tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path

from publisher.envelope import OutgoingMessage
from publisher.event import DomainState
from publisher.model import Record

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

DomainChanges = Mapping[str, tuple[Mapping[str, Record], AbstractSet[str]]]
"""Per backend: the records that changed and the UUIDs that no longer exist."""


class SpoolError(Exception):
    """The spool cannot be opened or written; one line for the operator."""


class Spool:
    JANITOR_PERIOD_S = 0.02
    CHECKPOINT_EVERY = 5_000
    """Confirmed messages between two WAL checkpoints, which keep the WAL file small."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._confirmed: list[int] = []
        self._confirmed_lock = threading.Lock()
        self._janitor_lock = threading.Lock()
        self._deleted = 0
        self._wake = threading.Event()
        self._closing = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._connect("FULL")
            # Checkpoints copy the WAL into the database and fsync it: the janitor runs them,
            # so no append waits for one.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise SpoolError(f"spool: cannot open {str(path)!r}: {err}") from err
        self._janitor = threading.Thread(target=self._sweep, name="spool-janitor", daemon=True)
        self._janitor.start()

    def _connect(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        return db

    def last_sequence(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()
        return int(row[0]) if row else 0

    def after(self, sequence: int, limit: int) -> list[OutgoingMessage]:
        """Up to `limit` unconfirmed messages that follow `sequence`, in original order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, id, routing_key, type, timestamp, properties, body"
                " FROM messages WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            ).fetchall()
        return [
            OutgoingMessage(
                sequence=seq,
                id=mid,
                routing_key=key,
                type=mtype,
                timestamp=ts,
                properties=bytes(properties),
                body=bytes(body),
            )
            for seq, mid, key, mtype, ts, properties, body in rows
        ]

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
        self, messages: Sequence[OutgoingMessage], domains: DomainChanges | None = None
    ) -> None:
        if not messages:
            return
        with self._transaction():
            for backend, (changed, removed) in (domains or {}).items():
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
            self._db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        m.sequence,
                        m.id,
                        m.routing_key,
                        m.type,
                        m.timestamp,
                        m.properties,
                        m.body,
                    )
                    for m in messages
                ],
            )
            self._db.execute(
                "INSERT INTO meta VALUES ('sequence', ?)"
                " ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (messages[-1].sequence,),
            )

    def remove(self, sequences: Iterable[int]) -> None:
        """Forgets confirmed messages; returns at once (the janitor deletes them)."""
        with self._confirmed_lock:
            self._confirmed.extend(sequences)
        self._wake.set()

    def _sweep(self) -> None:
        while not self._closing:
            self._wake.wait()
            time.sleep(self.JANITOR_PERIOD_S)  # let confirmations gather into one delete
            self._wake.clear()
            self._delete_confirmed()

    def _delete_confirmed(self) -> None:
        with self._janitor_lock:
            self._delete_batch()

    def _delete_batch(self) -> None:
        with self._confirmed_lock:
            batch, self._confirmed = self._confirmed, []
        if not batch:
            return
        try:
            with self._lock:
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    self._db.execute("BEGIN")
                    self._db.executemany(
                        "DELETE FROM messages WHERE sequence = ?", [(s,) for s in batch]
                    )
                    self._db.execute("COMMIT")
                finally:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._db.execute("PRAGMA synchronous=FULL")
            self._deleted += len(batch)
            if self._deleted >= self.CHECKPOINT_EVERY:
                self._deleted = 0
                with self._lock:
                    self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as err:
            # Kept rows are only resent (same ids) at the next start.
            log.error("spool: could not delete %d confirmed message(s): %s", len(batch), err)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit (one fsync) for a whole batch."""
        with self._lock:
            try:
                self._db.execute("BEGIN")
                yield
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SpoolError(f"spool: cannot write {str(self.path)!r}: {err}") from err

    def first_sequence(self) -> int:
        """The sequence of the oldest unconfirmed message (0 when there is none)."""
        self._delete_confirmed()
        with self._lock:
            row = self._db.execute("SELECT MIN(sequence) FROM messages").fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        """Messages not yet confirmed by the broker."""
        self._delete_confirmed()
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._janitor.join(5)
        self._delete_confirmed()
        with self._lock:
            self._db.close()
