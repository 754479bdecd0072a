"""The `virtpub` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from virtpub import __version__
from virtpub.amqp.connection import BrokerError
from virtpub.cli.demo import ConfirmedPrinter, Workload
from virtpub.config import (
    DEFAULTS,
    BrokerSettings,
    ConfigError,
    Settings,
    read_config_file,
    resolve,
)
from virtpub.contract.asyncapi import asyncapi_command
from virtpub.contract.envelope import OutgoingMessage
from virtpub.core.driver import Driver, DriverError
from virtpub.daemon.assembly import assemble
from virtpub.daemon.logs import setup_logging
from virtpub.daemon.service import Daemon
from virtpub.daemon.systemd import Notifier
from virtpub.drivers import synthetic
from virtpub.drivers.fallback import FallbackWatch
from virtpub.drivers.files.driver import FilesystemDriver
from virtpub.drivers.libvirt.domain import LibvirtDomainDriver
from virtpub.tools.archive import archive_group
from virtpub.tools.ask import ask, snapshot_command
from virtpub.tools.ask import table as capability_table
from virtpub.tools.explain import explain as explain_backend
from virtpub.tools.inventory import inventory_command
from virtpub.tools.options import CONNECTION_OPTIONS, EXIT_FAILURE, amqp_options
from virtpub.tools.tail import tail_command

EXIT_CONFIG = 2

_OPTIONS: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="VIRTPUB_CONFIG",
        help="TOML file with any of the settings below (keys in snake_case, e.g. amqp_url).",
    ),
    click.option(
        "--libvirt-uri",
        "libvirt_uri",
        multiple=True,
        help="libvirt connection to watch; repeat for several. [default: qemu:///system,"
        " or none when --watch is given]",
    ),
    click.option(
        "--watch",
        "watch",
        multiple=True,
        metavar="DIR[:FORMAT]",
        help="A directory of domain config files to turn into defined/undefined events,"
        " for backends that emit none (e.g. /etc/xen:xl); FORMAT is libvirt-xml (*.xml,"
        " the default) or xl (*.cfg). Repeat for several. A directory that does not"
        " exist yet is waited for.",
    ),
    click.option(
        "--watch-defines",
        "watch_defines",
        help="fallback: config files give defined/undefined only when no libvirt backend of"
        " this host emits them itself (the duplicates are counted, not published); always:"
        " publish them regardless. [default: fallback]",
    ),
    click.option(
        "--rescan-interval",
        "rescan_interval",
        help="Seconds between two full rescans of the watched directories (inotify can"
        " overflow). [default: 300]",
    ),
    *CONNECTION_OPTIONS,
    click.option(
        "--exchange",
        help="Topic exchange to publish to; created durable if missing."
        f" [default: {DEFAULTS['exchange']}]",
    ),
    click.option(
        "--host-id",
        "host_id",
        help="This host's name in routing keys and sources; made one topic segment"
        " (characters other than letters, digits, '_' and '-' become '-')."
        " [default: short hostname]",
    ),
    click.option(
        "--state-dir",
        "state_dir",
        help=f"Where virtpub keeps its durable spool and state. [default: {DEFAULTS['state_dir']}]",
    ),
    click.option(
        "--poll-interval",
        "poll_interval",
        help="Seconds between two listings of a backend that cannot emit some lifecycle"
        " events (one listing call each time; capabilities mark those events polled)."
        " [default: 10]",
    ),
    click.option(
        "--spool-max-bytes",
        "spool_max_bytes",
        help="Disk the spool of unconfirmed messages may take (bytes, or with a unit:"
        " 512MiB, 2GiB); it fills while the broker is away. [default: 1GiB]",
    ),
    click.option(
        "--spool-full-policy",
        "spool_full_policy",
        help="When the spool is full: block (take no more events until the broker confirms"
        " some; events arriving meanwhile are held in a bounded queue, then dropped) or"
        " drop-oldest (drop the oldest messages not yet sent). Every drop is counted and"
        " published as publisher.dropped. [default: block]",
    ),
    click.option(
        "--metrics-listen",
        "metrics_listen",
        metavar="[HOST:]PORT",
        help="Serve Prometheus /metrics and /healthz here (HOST defaults to 127.0.0.1; keep"
        " it on loopback and let the local agent scrape it). [default: off]",
    ),
    click.option(
        "--log-level",
        "log_level",
        help="debug, info, warning or error. [default: info]",
    ),
    click.option(
        "--log-format",
        "log_format",
        help="text for people, json for log collectors. [default: text]",
    ),
]

_SETTINGS_HELP = """
Every option can also be set in the --config TOML file or as a VIRTPUB_<NAME>
environment variable (VIRTPUB_AMQP_URL, VIRTPUB_LIBVIRT_URI, ...; several values
separated by spaces); flags win over the environment, which wins over the file.
"""


def publisher_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        func = option(func)
    return func


def load_settings(config_path: Path | None, flags: dict[str, Any]) -> Settings:
    """Resolves settings or exits 2 with one line per invalid value."""
    try:
        file_values = read_config_file(config_path) if config_path else None
        return resolve(flags, os.environ, file_values)
    except ConfigError as err:
        for problem in err.problems:
            click.echo(f"virtpub: invalid configuration: {problem}", err=True)
        sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="virtpub")
def main() -> None:
    """virtpub publishes what a hypervisor host does as versioned CloudEvents on a
    RabbitMQ topic exchange: every libvirt domain event, routed by event type
    (v1.<host_id>.domain.<event>[.<detail>]), after a capabilities message that says
    what each backend of the host can emit.

    \b
    Start here:
      virtpub demo              watch events flow from libvirt's built-in test driver
      virtpub run               the daemon (see: virtpub run --help)
      virtpub inventory         every host's domains, rebuilt from the exchange alone
      virtpub capabilities      what every running publisher's backends emit, and from where
      virtpub snapshot          ask the running publishers for a fresh snapshot, now
      virtpub tail              watch the exchange live, one line per event
      virtpub archive           an audit archive of everything, with a gap check
    """


@main.command(epilog=_SETTINGS_HELP)
@publisher_options
def run(config_path: Path | None, **flags: Any) -> None:
    """Run the publisher daemon until SIGTERM or SIGINT.

    It validates its configuration, connects to the broker (retrying while the broker
    is unreachable, giving up at once on refused credentials), opens each libvirt
    connection and subscribes to every domain event it accepts, announces the
    capabilities message, then publishes each event with publisher confirms. Stopping
    drains what is in flight; anything unconfirmed stays in the spool for the next start.

    Exit codes: 0 stopped cleanly, 1 could not run (broker, libvirt, spool), 2 invalid
    configuration.
    """
    settings = load_settings(config_path, flags)
    sys.exit(_serve(settings))


@main.command(epilog=_SETTINGS_HELP)
@publisher_options
@click.option(
    "--cycles",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="How many workload cycles to run before stopping; 0 runs until Ctrl-C.",
)
@click.option(
    "--pause",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Seconds between two workload operations.",
)
def demo(config_path: Path | None, cycles: int, pause: float, **flags: Any) -> None:
    """Publish a demo workload from libvirt's built-in test driver and print every
    message the broker confirms.

    Runs the real publisher on test:///default (an in-process hypervisor, no daemon
    needed) while a workload defines, starts, pauses, resumes, destroys and undefines
    domains on it, and creates and destroys a transient one. Needs a RabbitMQ broker
    (default: the local one, guest/guest). Bind a queue to the exchange with
    `v1.#` to see the same messages from another program.
    """
    if not flags["libvirt_uri"]:
        flags["libvirt_uri"] = ("test:///default",)
    settings = load_settings(config_path, flags)
    printer = ConfirmedPrinter()
    printer.start()
    sys.exit(
        _serve(
            settings,
            on_confirmed=printer.on_confirmed,
            workload=lambda daemon, stop: Workload(daemon, cycles, pause, stop),
        )
    )


main.add_command(inventory_command)
main.add_command(asyncapi_command)
main.add_command(tail_command)
main.add_command(archive_group)
main.add_command(snapshot_command)


@main.command()
@click.option(
    "--explain",
    is_flag=True,
    help="Describe this host's backends from their libvirt connections (no broker needed).",
)
@click.option(
    "--libvirt-uri",
    "libvirt_uris",
    multiple=True,
    default=("qemu:///system",),
    show_default=True,
    help="With --explain: a libvirt connection to describe; repeat for several.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=10.0,
    show_default=True,
    help="With --explain: the polling interval to report for event types that are polled.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Ask this host's publisher; repeat for several. [default: every publisher]",
)
@amqp_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=300),
    default=2.0,
    show_default=True,
    help="Seconds to wait for answers.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the capabilities messages as JSON.")
def capabilities(
    *,
    explain: bool,
    libvirt_uris: tuple[str, ...],
    poll_interval: float,
    hosts: tuple[str, ...],
    broker: BrokerSettings,
    timeout: float,
    as_json: bool,
) -> None:
    """Which event types each backend provides, and where they come from.

    By default, asks the running publishers over the broker (each answers with its
    latest capabilities message, at any time) and prints event type by host:
    native (the libvirt driver emits it, per virtpub's map of libvirt's drivers),
    derived (virtpub computes it), polled (virtpub lists the domains every poll
    interval: one listing call each time), files (a watched config directory) or
    - (unsupported). With --explain, describes this host's connections instead,
    with the basis of each answer: map:<libvirt version>, or probe for drivers
    and versions the map does not cover.

    Exit codes: 0 answered, 1 nothing answered, a connection failed or invalid broker
    settings, 2 bad usage.
    """
    if explain:
        sys.exit(_explain(libvirt_uris, poll_interval))
    try:
        answers = ask(broker, hosts, timeout)
    except BrokerError as err:
        click.echo(f"virtpub: {err}", err=True)
        sys.exit(EXIT_FAILURE)
    missing = sorted(set(hosts) - {a["data"]["host_id"] for a in answers})
    for host in missing:
        click.echo(f"virtpub: no answer from host {host!r} within {timeout:g} s", err=True)
    if not answers:
        if not hosts:
            click.echo(f"virtpub: no publisher answered within {timeout:g} s", err=True)
        sys.exit(EXIT_FAILURE)
    if as_json:
        for answer in answers:
            click.echo(json.dumps(answer, sort_keys=True))
    else:
        click.echo(capability_table(answers))
    sys.exit(EXIT_FAILURE if missing else 0)


def _explain(libvirt_uris: tuple[str, ...], poll_interval: float) -> int:
    setup_logging("warning", "text")
    failed = False
    for uri in libvirt_uris:
        driver = LibvirtDomainDriver(uri, "localhost", poll_interval=poll_interval)
        try:
            driver.start(lambda _signal: None)
            click.echo(explain_backend(driver.capabilities()))
        except DriverError as err:
            click.echo(f"virtpub: {err}", err=True)
            failed = True
        finally:
            driver.stop()
    return EXIT_FAILURE if failed else 0


def make_drivers(settings: Settings) -> list[Driver]:
    """libvirt for every libvirt URI (`synthetic:///?...` for benchmarks and fault tests), then
    the watched directories, which start last: whether they are used depends on the others."""
    drivers: list[Driver] = [
        synthetic.SyntheticDriver(uri, settings.host_id)
        if uri.startswith(f"{synthetic.SCHEME}:")
        else LibvirtDomainDriver(uri, settings.host_id, poll_interval=settings.poll_interval)
        for uri in settings.libvirt_uris
    ]
    if settings.watches:
        watcher = FilesystemDriver(
            settings.watches, settings.host_id, rescan_interval=settings.rescan_interval
        )
        drivers.append(FallbackWatch(watcher, list(drivers), settings.watch_defines))
    return drivers


def _serve(
    settings: Settings,
    on_confirmed: Callable[[list[OutgoingMessage]], None] | None = None,
    workload: Callable[[Daemon, threading.Event], threading.Thread] | None = None,
) -> int:
    setup_logging(settings.log_level, settings.log_format)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    drivers = make_drivers(settings)
    daemon = assemble(
        settings, drivers, on_confirmed=on_confirmed, notifier=Notifier.from_environment()
    )
    if daemon is None:
        return EXIT_FAILURE
    if workload is not None:
        workload(daemon, stop).start()
    return daemon.run(stop)
