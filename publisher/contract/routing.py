"""Routing keys: built and parsed by one type, so every producer and tool agree on them.

A key is `v<major>.<host_id>.<entity>.<event>[.<detail>]`. The host id, entity and event
are single topic segments; the detail may hold dots of its own (an unknown libvirt code
is `unknown_<n>`, but nothing forbids a dotted detail), so it takes the rest of the key.
"""

from __future__ import annotations

from typing import NamedTuple

FORMAT = "v<major>.<host_id>.<entity>.<event>[.<detail>]"
DEFAULT_EXCHANGE = "virt.events"
_MIN_SEGMENTS = 4


class RoutingKey(NamedTuple):
    major: int
    host_id: str
    entity: str
    event: str
    detail: str | None = None

    def __str__(self) -> str:
        head = f"v{self.major}.{self.host_id}.{self.entity}.{self.event}"
        return f"{head}.{self.detail}" if self.detail else head

    @classmethod
    def parse(cls, key: str) -> RoutingKey | None:
        """The key's parts, or None when it is not a virtpub key (a tool skips and counts it)."""
        parts = key.split(".")
        if len(parts) < _MIN_SEGMENTS or not all(parts[1:_MIN_SEGMENTS]):
            return None
        version = parts[0]
        if not (version.startswith("v") and version[1:].isdigit()):
            return None
        return cls(
            major=int(version[1:]),
            host_id=parts[1],
            entity=parts[2],
            event=parts[3],
            detail=".".join(parts[4:]) or None,
        )
