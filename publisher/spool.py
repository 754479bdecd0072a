"""A durable FIFO of accepted messages: in it before publishing, out of it after the broker's ack.

Beside the messages it keeps what virtpub last published about each domain, in
the same transaction: after a crash or restart the two always agree, so the
resync compares libvirt's listing with exactly what consumers were told.

SQLite in WAL mode with `synchronous=FULL`: a committed append survives a kill
and a power cut. Appends come in batches, one transaction (one fsync) each, so
durability does not cost an fsync per event. The spool also keeps the last
sequence number handed out, so a restarted publisher continues without a gap.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
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
    headers     TEXT NOT NULL,
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

DomainChanges = Mapping[str, tuple[Mapping[str, Record], AbstractSet[str]]]
"""Per backend: the records that changed and the UUIDs that no longer exist."""


class SpoolError(Exception):
    """The spool cannot be opened or written; one line for the operator."""


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise SpoolError(f"spool: cannot open {str(path)!r}: {err}") from err

    def last_sequence(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='sequence'").fetchone()
        return int(row[0]) if row else 0

    def pending(self) -> list[OutgoingMessage]:
        """Everything accepted but not yet confirmed, in original order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, id, routing_key, type, timestamp, headers, body"
                " FROM messages ORDER BY sequence"
            ).fetchall()
        return [
            OutgoingMessage(
                sequence=seq,
                id=mid,
                routing_key=key,
                type=mtype,
                timestamp=ts,
                headers=json.loads(headers),
                body=bytes(body),
            )
            for seq, mid, key, mtype, ts, headers, body in rows
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
                        json.dumps(dict(m.headers)),
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
        with self._transaction():
            self._db.executemany(
                "DELETE FROM messages WHERE sequence = ?", [(s,) for s in sequences]
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
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise SpoolError(f"spool: cannot write {str(self.path)!r}: {err}") from err

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
