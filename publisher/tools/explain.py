"""`virtpub capabilities --explain`: the event type by source matrix of a connection, here.

An operator asks what a host's backends can emit before trusting a consumer to
rely on events; this answers from the connection alone, no broker involved.
"""

from __future__ import annotations

from virtpub.core.capabilities import BackendCapabilities

_ORDER = {"native": 0, "derived": 1, "polled": 2, "filesystem": 3, "unsupported": 4}


def explain(capabilities: BackendCapabilities) -> str:
    """One block per backend: a heading, then one line per event type."""
    bases = sorted({support.basis for support in capabilities.events.values()})
    heading = (
        f"{capabilities.uri}: {capabilities.hypervisor_type or capabilities.driver} driver,"
        f" libvirt {capabilities.libvirt_version or 'n/a'}; basis {', '.join(bases)}"
    )
    width = max(len(name) for name in capabilities.events)
    lines = [heading, f"  {'event type':<{width}}  {'source':<11}  notes"]
    ordered = sorted(
        capabilities.events.items(), key=lambda item: (_ORDER[item[1].status], item[0])
    )
    for name, support in ordered:
        notes = []
        if support.interval_s is not None:
            notes.append(f"every {support.interval_s:g} s")
        if support.reason:
            notes.append(support.reason)
        if support.details:
            notes.append(f"details: {', '.join(support.details)}")
        lines.append(f"  {name:<{width}}  {support.status:<11}  {'; '.join(notes)}".rstrip())
    counts = {status: 0 for status in _ORDER}
    for support in capabilities.events.values():
        counts[support.status] += 1
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    lines.append(f"  ({summary})")
    return "\n".join(lines)
