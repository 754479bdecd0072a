"""Domain existence from config directories, for backends that emit no define/undefine events.

Xen's xl keeps a domain's definition in a file (`/etc/xen/<name>.cfg`) and
tells nobody when it changes; when libvirt added DEFINED/UNDEFINED in 2008,
the plan for Xen was to derive them from inotify on such directories. A file
that is there means the domain is defined. This driver turns the files of
one or more directories into `defined`/`undefined` events, and into
`ConfigRejected` for files it refuses.

Threads. watchdog's inotify observer calls `_Handler` on its own thread; it
only records the path, with when it was last touched, in a bounded map and
wakes the worker. The worker thread does all I/O: it waits until a path has
been quiet for `debounce_s` (an editor's save is several steps: vim renames
the file to `name~`, writes a new one, deletes the backup; others write
`.name.tmp` and rename it over the file), reads it, and compares what it
says with what was known. When more paths are pending than `MAX_PENDING`,
the map is dropped for a full rescan, so memory stays flat under any burst.
File contents are never kept, only a digest.

Events. Changes are computed per domain, not per file, so each logical change
is one event whatever sequence of file operations made it:
- a domain (UUID) that appears is `defined`/`added`; one that no file has any
  more is `undefined`/`removed`;
- a domain whose name changed is one `defined`/`renamed` (the tracker derives
  the old name from its record). libvirt reports a rename as `undefined` then
  `defined`; from files that would be two messages for one change, and the
  first could only name the new domain by asking;
- a domain whose file moved or whose content changed is `defined`/`updated`;
  a rename of its file carries `previous_path`. Renaming a file never changes
  the domain's name: the name is in the content.
Two files may claim one UUID for a moment (libvirt writes a renamed domain's
new file before it deletes the old one): the file that had the domain keeps
it, so the rename is one event when the old file goes. A file that turns
invalid keeps its domain as it was until it is fixed or removed: a botched
edit is reported as `config.invalid`, not as an undefine. An xl file without
a UUID is identified by its name (a UUID derived from host and name, flagged
`identity: "name"`); renaming such a domain removes one and adds another.

Blind spots. watchdog swallows the kernel's inotify queue overflow
(IN_Q_OVERFLOW): 7.1 only logs a warning on `watchdog.observers.inotify_c`.
A filter on that logger turns the warning into a rescan. The logger is held
at WARNING or below so the warning is made whatever level the operator
chose (the filter then hides it from handlers below that level); watchdog
versions that do not log it leave the periodic rescan (`rescan_interval`)
to catch up. A rescan compares every file with
what is known and emits the differences.

Directories. A watched directory that does not exist is polled for every
second. One that disappears (or is replaced) makes the backend disconnected
(`BackendChange`); its domains are kept as they were, because files missing
with their directory say nothing about the domains. When it is back, it is
rescanned silently and `BackendChange(connected=True)` makes the daemon
resync, which publishes what changed meanwhile exactly once. While any
directory is missing, `list_domains` raises DriverError as the Driver
protocol asks of a disconnected backend.

State. A config file says a domain is defined, not whether it runs, yet the
listing must give a state. It gives `shutoff` with reason `unknown`, the
state the tracker itself assumes after a `defined`. `nostate` would count as
active there: a listing would replay `started` for every domain, and an
`undefined` would leave a running transient domain behind instead of
`removed`.

Backend id: `virtpub://<host_id>/filesystem/<dir>[,<dir>...]`, the absolute
directories sorted and percent-encoded (the daemon's sources all start with
`virtpub://<host_id>/`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.driver import DriverError, Emit, Signal
from virtpub.core.event import (
    GONE,
    SHUTOFF,
    BackendChange,
    ConfigRejected,
    DomainEvent,
    DomainFacts,
    DomainRef,
    JSONValue,
)
from virtpub.drivers.files.config_files import (
    MAX_BYTES,
    Format,
    Rejection,
    is_format,
    parse,
    watched,
)

log = logging.getLogger(__name__)

ORIGIN = "filesystem"
MAX_PENDING = 4096
DIR_POLL_S = 1.0
_NAME_NAMESPACE = uuid.UUID("5a426fdb-fbd6-4cf8-9a7f-8818ecfebf2f")
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify_c"
_OVERFLOW_WARNING = "Inotify queue overflowed"
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    # No opened/closed-without-write events: the worker's own reads would wake it again.
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class Config:
    """What one valid file says. Of its bytes only a digest is kept: enough to see an edit,
    and memory does not grow with the files' sizes."""

    path: str
    format: Format
    uuid: str
    name: str
    by_name: bool
    digest: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """One file: its last valid config and, while it is refused, why."""

    config: Config | None
    rejection: Rejection | None


@dataclass(frozen=True, slots=True)
class Change:
    event: Literal["defined", "undefined"]
    detail: Literal["added", "updated", "renamed", "removed"]
    config: Config
    previous: Config | None


def owners(configs: Iterable[Config], previous: Mapping[str, Config]) -> dict[str, Config]:
    """The config that speaks for each domain (UUID) when several files claim it.

    The file that spoke for it before keeps it, so a copy changes nothing and a
    rename written new-file-first is seen once, when the old file goes; among
    new claims the first path wins, so the outcome never depends on read order.
    """
    claims: dict[str, list[Config]] = {}
    for config in configs:
        claims.setdefault(config.uuid, []).append(config)
    chosen: dict[str, Config] = {}
    for domain, candidates in claims.items():
        before = previous.get(domain)
        kept = [c for c in candidates if before is not None and c.path == before.path]
        chosen[domain] = kept[0] if kept else min(candidates, key=lambda c: c.path)
    return chosen


def changes(before: Mapping[str, Config], after: Mapping[str, Config]) -> list[Change]:
    """One change per domain that differs: removals first, so a reused name ends before it
    starts again, then updates and renames, then additions; each group by path."""
    removed = [
        Change("undefined", "removed", before[d], None) for d in before.keys() - after.keys()
    ]
    updated: list[Change] = []
    for domain in before.keys() & after.keys():
        old, new = before[domain], after[domain]
        if old.name != new.name:
            updated.append(Change("defined", "renamed", new, old))
        elif old.path != new.path or old.digest != new.digest:
            updated.append(Change("defined", "updated", new, old))
    added = [Change("defined", "added", after[d], None) for d in after.keys() - before.keys()]
    return [
        change
        for group in (removed, updated, added)
        for change in sorted(group, key=lambda c: c.config.path)
    ]


def domain_event(backend: str, change: Change, received_at: float) -> DomainEvent:
    config = change.config
    info: dict[str, JSONValue] = {"path": config.path, "format": config.format}
    if config.by_name:
        info["identity"] = "name"
    if change.previous is not None and change.previous.path != config.path:
        info["previous_path"] = change.previous.path
    return DomainEvent(
        backend=backend,
        event=change.event,
        detail=change.detail,
        domain=DomainRef(config.uuid, config.name, None),
        codes=None,
        origin=ORIGIN,
        received_at=received_at,
        info=info,
    )


def read_config(path: str) -> bytes | Rejection | None:
    """The file's bytes, a Rejection, or None when it does not exist.

    Symbolic links are refused, not followed: inotify on this directory would
    not see their target change, and a link can point anywhere (a FIFO, a
    device, a huge file). O_NONBLOCK keeps a FIFO from blocking the open.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Rejection("symlink", "a symbolic link; only regular files are read")
        return Rejection("unreadable", f"cannot open: {os.strerror(err.errno or 0)}")
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return Rejection("not_regular", "not a regular file")
        if info.st_size > MAX_BYTES:
            return Rejection("too_large", f"larger than {MAX_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_BYTES:
            return Rejection("too_large", f"larger than {MAX_BYTES} bytes")
        return b"".join(chunks)
    except OSError as err:
        return Rejection("unreadable", f"cannot read: {os.strerror(err.errno or 0)}")
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _Watch:
    observed: ObservedWatch
    key: tuple[int, int]
    """The directory's (device, inode) when it was watched: a replaced directory differs."""


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's observer thread: hands the paths over and returns."""

    def __init__(self, note: Callable[[FileSystemEvent], None]) -> None:
        super().__init__()
        self._note = note

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._note(event)


class _OverflowFilter(logging.Filter):
    """Learns of an inotify queue overflow from the one place watchdog reports it: its log.

    `listen` holds watchdog's logger at WARNING or below, so an operator's `--log-level error`
    cannot stop the warning from being made; what the operator's level hides, this filter
    keeps from the handlers."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow

    def listen(self) -> None:
        logger = logging.getLogger(_WATCHDOG_INOTIFY_LOGGER)
        logger.setLevel(min(logging.WARNING, logger.getEffectiveLevel()))
        logger.addFilter(self)

    def deafen(self) -> None:
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_OVERFLOW_WARNING):
            self._on_overflow()
        return record.levelno >= logging.getLogger().getEffectiveLevel()


class FilesystemDriver:
    def __init__(
        self,
        watches: Sequence[tuple[Path, str]],
        host_id: str,
        *,
        rescan_interval: float = 300.0,
        debounce_s: float = 0.2,
    ) -> None:
        if not watches:
            raise DriverError("filesystem: no directory to watch")
        if rescan_interval <= 0 or debounce_s < 0:
            raise DriverError("filesystem: rescan_interval must be > 0 and debounce_s >= 0")
        self._dirs: dict[str, Format] = {}
        for path, fmt in watches:
            directory = os.path.abspath(path)
            if not is_format(fmt):
                raise DriverError(f"filesystem: {directory}: unknown format {fmt!r}")
            if directory in self._dirs:
                raise DriverError(f"filesystem: {directory} is given twice")
            self._dirs[directory] = fmt
        ordered = sorted(self._dirs)
        self._backend = f"virtpub://{host_id}/filesystem/" + ",".join(
            quote(d, safe="") for d in ordered
        )
        self.uri = ",".join(Path(d).as_uri() for d in ordered)
        self._host_id = host_id
        self._rescan_interval = rescan_interval
        self._debounce_s = debounce_s
        self._emit: Emit | None = None
        self._handler = _Handler(self._note)
        self._overflow_filter = _OverflowFilter(self._overflowed)
        self._observer: InotifyObserver | None = None
        self._worker: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._pending_lock = threading.Lock()
        self._pending: dict[str, float] = {}
        """Path -> when it was last touched (monotonic). Guarded by _pending_lock."""
        self._rescan_at = 0.0
        """When the next full rescan is due (monotonic). Guarded by _pending_lock."""
        self._state_lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._owners: dict[str, Config] = {}
        self._missing: dict[str, str] = {}
        """Directory -> why it is not watched now. The state is read by the daemon thread;
        only the worker (and start) writes it, under _state_lock."""
        self._watches: dict[str, _Watch] = {}
        self._next_dir_check = 0.0
        self._stopped = False
        self.rejected = 0
        self.overflows = 0
        self.rescans = 0
        self.failures = 0

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def polled(self) -> frozenset[str]:
        return frozenset()

    @property
    def poll_interval(self) -> float:
        return self._rescan_interval

    def capabilities(self) -> BackendCapabilities:
        reason = f"config files in {', '.join(sorted(self._dirs))}"
        events = {
            name: EventSupport("filesystem", reason, basis="inotify")
            for name in ("defined", "undefined")
        }
        events.update(
            {
                name: EventSupport("derived", basis="inotify")
                for name in ("added", "removed", "snapshot")
            }
        )
        return BackendCapabilities(
            driver="filesystem",
            source=self._backend,
            uri=self.uri,
            hypervisor_type=None,
            hypervisor_version=None,
            libvirt_version=None,
            events=events,
        )

    # -- starting -------------------------------------------------------------------------------

    def start(self, emit: Emit) -> None:
        """Watches and reads every directory there is before returning, so the daemon's first
        listing is complete; a directory still to come is waited for."""
        if self._observer is not None or self._stopping.is_set():
            raise DriverError(f"filesystem {self._backend}: already started")
        for directory in self._dirs:
            if os.path.lexists(directory) and not os.path.isdir(directory):
                raise DriverError(f"filesystem: {directory} is not a directory")
        self._emit = emit
        now = time.monotonic()
        self._rescan_at = now + self._rescan_interval
        self._next_dir_check = now + DIR_POLL_S
        self._overflow_filter.listen()
        try:
            self._observer = InotifyObserver()
            self._observer.start()
            for directory in self._dirs:
                found = _inspect(directory)
                if isinstance(found, str):
                    self._lose(directory, found)
                    continue
                self._watch(directory, found)
                self._apply(self._paths_in(directory), announce=False)
        except OSError as err:
            self.stop()
            raise DriverError(f"filesystem: cannot watch: {err.strerror or err}") from err
        self._worker = threading.Thread(
            target=self._run, name=f"filesystem {self.uri}", daemon=True
        )
        self._worker.start()

    # -- the observer thread --------------------------------------------------------------------

    def _note(self, event: FileSystemEvent) -> None:
        try:
            for raw in (event.src_path, event.dest_path):
                if raw:
                    self._note_path(os.fsdecode(raw))
        except Exception:  # never raise into watchdog's observer
            self.failures += 1
            log.exception("filesystem %s: dropped a watchdog event", self.uri)

    def _note_path(self, path: str) -> None:
        directory, name = os.path.split(path)
        fmt = self._dirs.get(directory)
        is_root = path in self._dirs
        if not is_root and (fmt is None or not watched(fmt, name)):
            return
        with self._pending_lock:
            first = not self._pending
            flooded = path not in self._pending and len(self._pending) >= MAX_PENDING
            if flooded:
                self._pending.clear()
                self.overflows += 1
                self._rescan_at = min(self._rescan_at, time.monotonic() + self._debounce_s)
            else:
                self._pending[path] = time.monotonic()
        if flooded:
            log.warning("filesystem %s: over %d changes pending; rescanning", self.uri, MAX_PENDING)
        if first or is_root or flooded:
            self._wake.set()  # otherwise the worker is already waiting for an earlier path

    def _overflowed(self) -> None:
        """Runs on watchdog's inotify thread, inside its logging call."""
        try:
            with self._pending_lock:
                self.overflows += 1
            self.request_rescan()
        except Exception:  # an exception here would end watchdog's inotify thread
            self.failures += 1
            log.exception("filesystem %s: could not schedule a rescan", self.uri)

    def request_rescan(self) -> None:
        """Compares every file with the known state once changes have been quiet for
        `debounce_s`, and publishes the differences. Safe on any thread."""
        with self._pending_lock:
            self._rescan_at = min(self._rescan_at, time.monotonic() + self._debounce_s)
        self._wake.set()

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                timeout = self._step()
            except Exception:  # the worker outlives any one failure; the next rescan repairs
                self.failures += 1
                log.exception("filesystem %s: processing changes failed", self.uri)
                timeout = DIR_POLL_S
            self._wake.wait(timeout)

    def _step(self) -> float:
        """One round of work; returns how long to sleep unless woken."""
        now = time.monotonic()
        roots, due, next_due = self._take_due(now)
        if roots or now >= self._next_dir_check:
            self._check_dirs(dead=roots)
            self._next_dir_check = now + DIR_POLL_S
        with self._pending_lock:
            rescan = now >= self._rescan_at
            if rescan:
                self._rescan_at = now + self._rescan_interval
        if rescan:
            self._rescan()
        elif due:
            self._apply(self._still_watched(due), announce=True)
        with self._pending_lock:
            wake_at = min(self._next_dir_check, self._rescan_at, next_due)
        return max(0.0, wake_at - time.monotonic())

    def _take_due(self, now: float) -> tuple[set[str], set[str], float]:
        """Removes and returns the watched roots touched and the paths quiet long enough,
        with when the next pending path will be."""
        roots: set[str] = set()
        due: set[str] = set()
        next_due = float("inf")
        with self._pending_lock:
            for path, touched in self._pending.items():
                if path in self._dirs:
                    roots.add(path)
                elif now - touched >= self._debounce_s:
                    due.add(path)
                else:
                    next_due = min(next_due, touched + self._debounce_s)
            for path in roots | due:
                del self._pending[path]
        return roots, due, next_due

    def _still_watched(self, paths: set[str]) -> set[str]:
        """The paths whose directory is still the one watched. Files that vanish with their
        directory (`rm -r`) say nothing about their domains; the directory check reports it."""
        intact = {d for d, watch in self._watches.items() if _inspect(d) == watch.key}
        if len(intact) < len(self._watches):
            self._next_dir_check = 0.0
        return {p for p in paths if os.path.dirname(p) in intact}

    def _check_dirs(self, dead: set[str]) -> None:
        for directory in self._dirs:
            found = _inspect(directory)
            current = self._watches.get(directory)
            if current is not None:
                if found == current.key and directory not in dead:
                    continue
                self._unwatch(directory)
                self._lose(
                    directory, found if isinstance(found, str) else f"{directory} was replaced"
                )
            if isinstance(found, str):
                continue
            try:
                self._watch(directory, found)
                paths = self._paths_in(directory)
            except OSError as err:
                log.debug("filesystem: cannot watch %s yet: %s", directory, err)
                self._unwatch(directory)
                continue
            self._apply(paths, announce=False)
            self._regain(directory)

    def _rescan(self) -> None:
        paths: set[str] = set()
        for directory in list(self._watches):
            try:
                paths |= self._paths_in(directory)
            except OSError as err:
                log.warning("filesystem: cannot list %s: %s", directory, err.strerror or err)
                self._next_dir_check = 0.0
        self._apply(paths, announce=True)
        self.rescans += 1

    def _paths_in(self, directory: str) -> set[str]:
        """The config paths a directory has now and those known to be there."""
        fmt = self._dirs[directory]
        with os.scandir(directory) as entries:
            paths = {os.path.join(directory, e.name) for e in entries if watched(fmt, e.name)}
        return paths | {p for p in self._entries if os.path.dirname(p) == directory}

    def _watch(self, directory: str, key: tuple[int, int]) -> None:
        assert self._observer is not None
        observed = self._observer.schedule(self._handler, directory, event_filter=_EVENT_FILTER)
        self._watches[directory] = _Watch(observed, key)

    def _unwatch(self, directory: str) -> None:
        current = self._watches.pop(directory, None)
        if current is None or self._observer is None:
            return
        try:
            self._observer.unschedule(current.observed)
        except (KeyError, OSError) as err:  # its emitter may have ended with the directory
            log.debug("filesystem: unwatching %s: %r", directory, err)

    def _lose(self, directory: str, reason: str) -> None:
        with self._state_lock:
            first = not self._missing
            self._missing[directory] = reason
        log.warning("filesystem: %s; its domains stay as they were until it is back", reason)
        if first:
            self._send(BackendChange(self._backend, False, reason, time.time()))

    def _regain(self, directory: str) -> None:
        with self._state_lock:
            if self._missing.pop(directory, None) is None:
                return
            back = not self._missing
        log.info("filesystem: watching %s again", directory)
        if back:
            self._send(BackendChange(self._backend, True, None, time.time()))

    def _apply(self, paths: Iterable[str], *, announce: bool) -> None:
        """Reads the paths and brings the known state in line; `announce` publishes the
        domain changes, which a silent scan leaves to the daemon's resync."""
        before = {path: self._entries.get(path) for path in sorted(paths)}
        updates = {path: self._examine(path, entry) for path, entry in before.items()}
        received_at = time.time()
        with self._state_lock:
            for path, entry in updates.items():
                if entry is None:
                    self._entries.pop(path, None)
                else:
                    self._entries[path] = entry
            configs = (e.config for e in self._entries.values() if e.config is not None)
            owners_now = owners(configs, self._owners)
            found = changes(self._owners, owners_now)
            self._owners = owners_now
        for path, entry in updates.items():
            if entry is not None and entry.rejection is not None:
                self._reject(path, entry.rejection, before[path], received_at)
        if announce:
            for change in found:
                self._send(domain_event(self._backend, change, received_at))

    def _examine(self, path: str, previous: Entry | None) -> Entry | None:
        fmt = self._dirs[os.path.dirname(path)]
        last_valid = previous.config if previous is not None else None
        data = read_config(path)
        if data is None:
            return None
        if isinstance(data, Rejection):
            return Entry(last_valid, data)
        parsed = parse(fmt, data)
        if isinstance(parsed, Rejection):
            return Entry(last_valid, parsed)
        domain = parsed.uuid or str(uuid.uuid5(_NAME_NAMESPACE, f"{self._host_id}/{parsed.name}"))
        digest = hashlib.sha256(data).digest()
        config = Config(path, fmt, domain, parsed.name, parsed.uuid is None, digest)
        return Entry(config, None)

    def _reject(
        self, path: str, rejection: Rejection, previous: Entry | None, received_at: float
    ) -> None:
        """Reports a refused file once per reason: a rescan finding it unchanged is silent."""
        known = previous.rejection if previous is not None else None
        if known is not None and known.reason == rejection.reason:
            return
        self.rejected += 1
        log.warning("filesystem: refused %r: %s (%s)", path, rejection.message, rejection.reason)
        self._send(
            ConfigRejected(self._backend, path, rejection.reason, rejection.message, received_at)
        )

    def _send(self, signal: Signal) -> None:
        if self._emit is not None:
            self._emit(signal)

    # -- the daemon thread's reads --------------------------------------------------------------

    def list_domains(self) -> list[DomainFacts]:
        with self._state_lock:
            if self._missing:
                reason = "; ".join(self._missing[d] for d in sorted(self._missing))
                raise DriverError(f"filesystem {self.uri}: {reason}")
            return [_facts(config) for config in self._owners.values()]

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        """None while a directory is missing: the domain may be described there."""
        with self._state_lock:
            config = self._owners.get(uuid)
            if self._missing and (config is None or os.path.dirname(config.path) in self._missing):
                return None
        return GONE if config is None else _facts(config)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(5)
            self._worker = None
        self._overflow_filter.deafen()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(5)
        if not self._stopped and (self.rejected or self.overflows or self.failures):
            log.info(
                "filesystem %s: %d file(s) refused, %d rescan(s) after overflow, %d failure(s)",
                self.uri,
                self.rejected,
                self.overflows,
                self.failures,
            )
        self._stopped = True


def _inspect(directory: str) -> tuple[int, int] | str:
    """The directory's identity (device, inode) if it can be watched now, else why not."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return f"{directory} does not exist"
    except OSError as err:
        return f"{directory}: {err.strerror or err}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory} is not a directory"
    return (info.st_dev, info.st_ino)


def _facts(config: Config) -> DomainFacts:
    return DomainFacts(config.uuid, config.name, None, True, SHUTOFF)
