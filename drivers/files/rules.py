"""The filesystem driver's rules, with no I/O: what a set of config files says about the
host's domains, and which events a change of that set is.

Pure, so that each rule (who owns a UUID that two files claim, what a rename is, in which
order changes go out) is tested on values, without a directory or a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from virtpub.core.event import SHUTOFF, DomainEvent, DomainFacts, DomainRef, JSONValue
from virtpub.drivers.files.config_files import Format, Rejection

ORIGIN = "filesystem"


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


def facts(config: Config) -> DomainFacts:
    """A config file says a domain is defined, not whether it runs: `shutoff` (see driver.py)."""
    return DomainFacts(config.uuid, config.name, None, True, SHUTOFF)
