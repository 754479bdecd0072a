"""Domain existence from config directories, for backends that emit no define/undefine events.

Xen's xl keeps a domain's definition in a file (`/etc/xen/<name>.cfg`) and
tells nobody when it changes; when libvirt added DEFINED/UNDEFINED in 2008,
the plan for Xen was to derive them from inotify on such directories. A file
that is there means the domain is defined. This driver turns the files of
one or more directories into `defined`/`undefined` events, and into
`ConfigRejected` for files it refuses.

Threads, one class each. watchdog's inotify observer calls `watcher.PathNotes`
on its own thread; it only records the path, with when it was last touched, in
a bounded map and wakes the worker. The worker thread (`scanner.Scanner`) does
all I/O (`reading`) and applies the pure rules (`rules`) to the state it shares
with the daemon thread (`state.KnownFiles`). It waits until a path has
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

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.driver import DriverError, Emit
from virtpub.core.event import DomainFacts
from virtpub.drivers.files.config_files import Format, is_format
from virtpub.drivers.files.scanner import Scanner
from virtpub.drivers.files.state import KnownFiles
from virtpub.drivers.files.watcher import OverflowFilter, PathNotes

log = logging.getLogger(__name__)


class FilesystemDriver:
    """The facade the daemon sees (the Driver protocol): it checks the configuration,
    wires the watcher, the worker and the shared state, and answers the daemon thread."""

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
        self._notes = PathNotes(self._dirs, self.uri, debounce_s, rescan_interval)
        self._overflow_filter = OverflowFilter(self._notes.overflowed)
        self._known = KnownFiles(self.uri)
        self._scanner: Scanner | None = None
        self._stopped = False

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def polled(self) -> frozenset[str]:
        return frozenset()

    @property
    def poll_interval(self) -> float:
        return self._rescan_interval

    @property
    def rejected(self) -> int:
        """Files refused, each reported once per reason."""
        return self._scanner.rejected if self._scanner is not None else 0

    @property
    def rescans(self) -> int:
        return self._scanner.rescans if self._scanner is not None else 0

    @property
    def overflows(self) -> int:
        """Rescans after the kernel's or our own pending-paths queue overflowed."""
        return self._notes.overflows

    @property
    def failures(self) -> int:
        """Failures on watchdog's thread and the worker's, each logged."""
        return self._notes.failures + (self._scanner.failures if self._scanner is not None else 0)

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

    def start(self, emit: Emit) -> None:
        """Watches and reads every directory there is before returning, so the daemon's first
        listing is complete; a directory still to come is waited for."""
        if self._scanner is not None or self._stopped:
            raise DriverError(f"filesystem {self._backend}: already started")
        for directory in self._dirs:
            if os.path.lexists(directory) and not os.path.isdir(directory):
                raise DriverError(f"filesystem: {directory} is not a directory")
        self._overflow_filter.listen()
        try:
            self._scanner = Scanner(
                dirs=self._dirs,
                backend=self._backend,
                uri=self.uri,
                host_id=self._host_id,
                notes=self._notes,
                known=self._known,
                emit=emit,
            )
            self._scanner.start()
        except OSError as err:
            self.stop()
            raise DriverError(f"filesystem: cannot watch: {err.strerror or err}") from err

    def request_rescan(self) -> None:
        """Compares every file with the known state once changes have been quiet for the
        debounce, and publishes the differences. Safe on any thread."""
        self._notes.request_rescan()

    def list_domains(self) -> list[DomainFacts]:
        return self._known.list_domains()

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        return self._known.lookup(uuid)

    def stop(self) -> None:
        if self._scanner is not None:
            self._scanner.stop()
        self._overflow_filter.deafen()
        if not self._stopped and (self.rejected or self.overflows or self.failures):
            log.info(
                "filesystem %s: %d file(s) refused, %d rescan(s) after overflow, %d failure(s)",
                self.uri,
                self.rejected,
                self.overflows,
                self.failures,
            )
        self._stopped = True
