"""The worker-thread role: all of the filesystem driver's I/O.

The worker takes the paths `watcher.PathNotes` collected once they have been quiet for
the debounce, reads them (`reading`), brings `state.KnownFiles` in line and emits the
domain changes that makes (`rules`). It also checks the watched directories (gone,
replaced, back) every DIR_POLL_S, and runs the full rescans. It outlives any one failure:
the next rescan repairs what a failed round missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from watchdog.observers.api import ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from virtpub.core.driver import Emit, Signal
from virtpub.core.event import BackendChange, ConfigRejected
from virtpub.drivers.files.config_files import Format, Rejection, watched
from virtpub.drivers.files.reading import examine, inspect_directory
from virtpub.drivers.files.rules import Entry, domain_event
from virtpub.drivers.files.state import KnownFiles
from virtpub.drivers.files.watcher import EVENT_FILTER, PathNotes

log = logging.getLogger(__name__)

DIR_POLL_S = 1.0


@dataclass(frozen=True, slots=True)
class _Watch:
    observed: ObservedWatch
    key: tuple[int, int]
    """The directory's (device, inode) when it was watched: a replaced directory differs."""


class Scanner:
    def __init__(
        self,
        *,
        dirs: Mapping[str, Format],
        backend: str,
        uri: str,
        host_id: str,
        notes: PathNotes,
        known: KnownFiles,
        emit: Emit,
    ) -> None:
        self._dirs = dirs
        self._backend = backend
        self._uri = uri
        self._host_id = host_id
        self._notes = notes
        self._known = known
        self._emit = emit
        self._observer = InotifyObserver()
        self._watches: dict[str, _Watch] = {}
        self._next_dir_check = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"filesystem {uri}", daemon=True)
        self.rejected = 0
        self.rescans = 0
        self.failures = 0

    def start(self) -> None:
        """Watches and reads every directory there is before returning, so the daemon's first
        listing is complete; a directory still to come is waited for. Raises OSError."""
        now = time.monotonic()
        self._notes.begin(now)
        self._next_dir_check = now + DIR_POLL_S
        self._observer.start()
        for directory in self._dirs:
            found = inspect_directory(directory)
            if isinstance(found, str):
                self._lose(directory, found)
                continue
            self._watch(directory, found)
            self._apply(self._paths_in(directory), announce=False)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._notes.wake.set()
        if self._thread.ident is not None:
            self._thread.join(5)
        self._observer.stop()
        if self._observer.ident is not None:
            self._observer.join(5)

    # -- the worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        wake = self._notes.wake
        while not self._stopping.is_set():
            wake.clear()
            try:
                timeout = self._step()
            except Exception:  # the worker outlives any one failure; the next rescan repairs
                self.failures += 1
                log.exception("filesystem %s: processing changes failed", self._uri)
                timeout = DIR_POLL_S
            wake.wait(timeout)

    def _step(self) -> float:
        """One round of work; returns how long to sleep unless woken."""
        now = time.monotonic()
        roots, due, next_due = self._notes.take_due(now)
        if roots or now >= self._next_dir_check:
            self._check_dirs(dead=roots)
            self._next_dir_check = now + DIR_POLL_S
        if self._notes.take_rescan(now):
            self._rescan()
        elif due:
            self._apply(self._still_watched(due), announce=True)
        wake_at = min(self._next_dir_check, self._notes.rescan_at(), next_due)
        return max(0.0, wake_at - time.monotonic())

    def _still_watched(self, paths: set[str]) -> set[str]:
        """The paths whose directory is still the one watched. Files that vanish with their
        directory (`rm -r`) say nothing about their domains; the directory check reports it."""
        intact = {d for d, watch in self._watches.items() if inspect_directory(d) == watch.key}
        if len(intact) < len(self._watches):
            self._next_dir_check = 0.0
        return {p for p in paths if os.path.dirname(p) in intact}

    def _check_dirs(self, dead: set[str]) -> None:
        for directory in self._dirs:
            found = inspect_directory(directory)
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
        return paths | self._known.known_paths(directory)

    def _watch(self, directory: str, key: tuple[int, int]) -> None:
        observed = self._observer.schedule(self._notes, directory, event_filter=EVENT_FILTER)
        self._watches[directory] = _Watch(observed, key)

    def _unwatch(self, directory: str) -> None:
        current = self._watches.pop(directory, None)
        if current is None:
            return
        try:
            self._observer.unschedule(current.observed)
        except (KeyError, OSError) as err:  # its emitter may have ended with the directory
            log.debug("filesystem: unwatching %s: %r", directory, err)

    def _lose(self, directory: str, reason: str) -> None:
        first = self._known.lose(directory, reason)
        log.warning("filesystem: %s; its domains stay as they were until it is back", reason)
        if first:
            self._send(BackendChange(self._backend, False, reason, time.time()))

    def _regain(self, directory: str) -> None:
        back = self._known.regain(directory)
        if back is None:
            return
        log.info("filesystem: watching %s again", directory)
        if back:
            self._send(BackendChange(self._backend, True, None, time.time()))

    def _apply(self, paths: Iterable[str], *, announce: bool) -> None:
        """Reads the paths and brings the known state in line; `announce` publishes the
        domain changes, which a silent scan leaves to the daemon's resync."""
        before = {path: self._known.entry(path) for path in sorted(paths)}
        updates = {
            path: examine(path, self._dirs[os.path.dirname(path)], entry, self._host_id)
            for path, entry in before.items()
        }
        received_at = time.time()
        found = self._known.update(updates)
        for path, entry in updates.items():
            if entry is not None and entry.rejection is not None:
                self._reject(path, entry.rejection, before[path], received_at)
        if announce:
            for change in found:
                self._send(domain_event(self._backend, change, received_at))

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
        self._emit(signal)
