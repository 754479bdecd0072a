"""The reference consumer: the fleet's domains (host, domain, state, persistent) rebuilt from
messages alone, the proof that a consumer never needs to poll libvirt.

Every domain message carries the domain's name, state and persistence after the event, so
the view is a table keyed by (host, domain UUID) that each message overwrites and `removed`
deletes. A queue only sees messages published after it exists; the publisher's snapshot (at
startup and on each reconnect to libvirt) fills the table in, and its mark and sweep drops the rows
of domains that vanished while nobody was listening. A gap in a host's `sequence` means the table
may be wrong about that host: in --watch, the inventory then asks that host's publisher for a
snapshot (`virtpub snapshot`'s request), whose bracket marks and sweeps it consistent again.

The rules (`Inventory`, pure, testable message by message) and `follow`, which feeds them from
RabbitMQ, are the public `virtpub.consumer`; here is the `virtpub inventory` command line.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from typing import Any

import click

from virtpub.amqp.connection import BrokerError
from virtpub.config import BrokerSettings
from virtpub.consumer import Inventory, follow
from virtpub.tools.options import EXIT_FAILURE, amqp_options, stop_on_signals

# -- rendering ---------------------------------------------------------------------------------

_HEADERS = ("HOST", "DOMAIN", "UUID", "STATE", "PERSISTENT", "LAST EVENT")
_COUNTERS = ("messages", "gaps", "duplicates", "rejected", "ignored")


def render_table(inventory: Inventory) -> str:
    """Aligned plain-text columns, then one line of counters (gaps mean missed messages)."""
    rows = inventory.rows()
    lines = [_HEADERS] + [
        (r.host, r.name, r.uuid, r.state, "yes" if r.persistent else "no", r.last_event)
        for r in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(_HEADERS))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    counters = ", ".join(f"{name} {getattr(inventory, name)}" for name in _COUNTERS)
    hosts = len({row.host for row in rows})
    text.append(f"domains {len(rows)}, hosts {hosts}, {counters}")
    return "\n".join(text)


def to_json(inventory: Inventory) -> dict[str, Any]:
    result: dict[str, Any] = {"rows": [dataclasses.asdict(row) for row in inventory.rows()]}
    result.update((name, getattr(inventory, name)) for name in _COUNTERS)
    return result


# -- command line ------------------------------------------------------------------------------


@click.command("inventory")
@amqp_options
@click.option(
    "--queue",
    help="Read this existing queue instead of a temporary one bound to --exchange. Messages"
    " are removed from it as they are applied, so give the inventory a queue of its own.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (one object per line with --watch)."
)
@click.option(
    "--watch",
    is_flag=True,
    help="Stay live and reprint on every change until Ctrl-C; on a gap in a host's sequence,"
    " ask that host for a snapshot.",
)
@click.option(
    "--idle",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Without --watch: print once no message has come for this many seconds.",
)
def inventory_command(
    *,
    broker: BrokerSettings,
    queue: str | None,
    as_json: bool,
    watch: bool,
    idle: float,
) -> None:
    """Show every domain of the fleet (host, name, UUID, state, persistence, last event),
    rebuilt from the publishers' messages alone, without asking any host.

    A temporary queue only receives what is published after it exists, so the table fills
    in with each publisher's next snapshot, which a publisher sends when it starts and
    whenever it reconnects to its hypervisor; until then it shows only domains that had an event.
    To start from a complete table, keep a durable queue bound to the exchange with
    `v1.*.domain.#`, `v1.*.publisher.#` and `v1.*.config.#` and read it with --queue.

    The last line counts messages, gaps (missed messages: the table may be stale until the
    next snapshot), duplicates (resends, skipped), rejected (unreadable) and ignored ones.
    With --watch, a gap in a host's sequence asks that host's publisher for a snapshot at
    once (as `virtpub snapshot --host` does, at most every 10 s per host; one line on
    stderr says so), and its bracket makes the table consistent again.

    Exit codes: 0 done, 1 invalid broker settings, broker unreachable, login refused, a
    certificate that does not verify, or queue or exchange missing.
    """
    stop = threading.Event()

    def show(inventory: Inventory) -> None:
        if as_json:
            click.echo(json.dumps(to_json(inventory), separators=(",", ":")))
        else:
            click.clear()
            click.echo(render_table(inventory))

    def report(line: str) -> None:
        click.echo(f"virtpub inventory: {line}", err=True)

    try:
        with stop_on_signals(stop):
            inventory = follow(
                broker,
                show if watch else lambda _inventory: None,
                queue=queue,
                request_snapshots=watch,
                idle_timeout=None if watch else idle,
                stop=stop,
                on_snapshot_request=report,
            )
    except BrokerError as err:
        click.echo(f"virtpub inventory: {err}", err=True)
        sys.exit(EXIT_FAILURE)
    if watch:
        return
    if as_json:
        click.echo(json.dumps(to_json(inventory), indent=2))
    else:
        click.echo(render_table(inventory))
    if inventory.messages == 0 and queue is None:
        click.echo(
            f"virtpub inventory: no message within {idle:g} s; the table fills in with each"
            " publisher's next snapshot (at its start or reconnect), or use --queue",
            err=True,
        )
