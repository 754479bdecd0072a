"""What the filesystem driver knows, shared by its worker thread and the daemon thread.

The worker is the only writer; the daemon thread reads the listing and looks domains up.
One lock guards the three tables, so a listing never sees half of an update.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Literal

from virtpub.core.driver import DriverError
from virtpub.core.event import GONE, DomainFacts
from virtpub.drivers.files.rules import Change, Config, Entry, changes, facts, owners


class KnownFiles:
    def __init__(self, uri: str) -> None:
        self._uri = uri
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        """Path -> its last valid config and, while refused, why."""
        self._owners: dict[str, Config] = {}
        """Domain UUID -> the config that speaks for it."""
        self._missing: dict[str, str] = {}
        """Directory -> why it is not watched now."""

    # -- the worker thread ----------------------------------------------------------------------

    def entry(self, path: str) -> Entry | None:
        return self._entries.get(path)

    def known_paths(self, directory: str) -> set[str]:
        return {p for p in self._entries if os.path.dirname(p) == directory}

    def update(self, updates: Mapping[str, Entry | None]) -> list[Change]:
        """Brings the files in line with `updates` (None: the file is gone) and returns the
        domain changes that makes."""
        with self._lock:
            for path, entry in updates.items():
                if entry is None:
                    self._entries.pop(path, None)
                else:
                    self._entries[path] = entry
            configs = (e.config for e in self._entries.values() if e.config is not None)
            owners_now = owners(configs, self._owners)
            found = changes(self._owners, owners_now)
            self._owners = owners_now
        return found

    def lose(self, directory: str, reason: str) -> bool:
        """Marks `directory` missing; True if it is the first one missing."""
        with self._lock:
            first = not self._missing
            self._missing[directory] = reason
        return first

    def regain(self, directory: str) -> bool | None:
        """Marks `directory` watched again: True if no directory is missing any more, False if
        others still are, None if it was not missing."""
        with self._lock:
            if self._missing.pop(directory, None) is None:
                return None
            return not self._missing

    # -- the daemon thread ----------------------------------------------------------------------

    def list_domains(self) -> list[DomainFacts]:
        with self._lock:
            if self._missing:
                reason = "; ".join(self._missing[d] for d in sorted(self._missing))
                raise DriverError(f"filesystem {self._uri}: {reason}")
            return [facts(config) for config in self._owners.values()]

    def lookup(self, uuid: str) -> DomainFacts | Literal["gone"] | None:
        """None while a directory is missing: the domain may be described there."""
        with self._lock:
            config = self._owners.get(uuid)
            if self._missing and (config is None or os.path.dirname(config.path) in self._missing):
                return None
        return GONE if config is None else facts(config)
