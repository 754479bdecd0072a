"""What every tool's command line shares: the broker options, read as `virtpub run` reads
them, a clean stop on SIGINT and SIGTERM, and the exit code of a tool that cannot go on."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click

from virtpub.config import (
    DEFAULTS,
    TLS_KEYS,
    BrokerSettings,
    ConfigError,
    read_config_file,
    resolve_broker,
)

# Exit code of a tool that cannot go on (broker, configuration).
EXIT_FAILURE = 1

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

CONNECTION_OPTIONS: list[Decorator] = [
    click.option(
        "--amqp-url",
        "amqp_url",
        multiple=True,
        metavar="URL",
        help="RabbitMQ URL, amqp:// or amqps://; repeat for cluster nodes, tried in turn."
        f" [default: {DEFAULTS['amqp_url'][0]}]",  # type: ignore[index]
    ),
    click.option(
        "--amqp-ca-file",
        "amqp_ca_file",
        metavar="FILE",
        help="CA certificates to verify an amqps:// broker by (the host name is always"
        " verified). [default: the system's CAs]",
    ),
    click.option(
        "--amqp-cert-file",
        "amqp_cert_file",
        metavar="FILE",
        help="Client certificate for amqps://; with no password in --amqp-url, virtpub"
        " logs in by SASL EXTERNAL (the broker takes the user from the certificate).",
    ),
    click.option(
        "--amqp-key-file",
        "amqp_key_file",
        metavar="FILE",
        help="The client certificate's private key.",
    ),
]
"""How every command reaches the broker, `virtpub run` included: one definition each."""

_BROKER_OPTIONS: list[Decorator] = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="VIRTPUB_CONFIG",
        help="TOML file with the broker settings below (amqp_url, amqp_ca_file, amqp_cert_file,"
        " amqp_key_file, exchange); the daemon's file will do, its other settings are ignored."
        " Each can also be a VIRTPUB_<NAME> variable (VIRTPUB_AMQP_URL: several separated by"
        " spaces); flags win over the environment, which wins over the file.",
    ),
    *CONNECTION_OPTIONS,
    click.option(
        "--exchange",
        help="The publishers' topic exchange; it must exist (publishers declare it)."
        f" [default: {DEFAULTS['exchange']}]",
    ),
]
_BROKER_KEYS = ("amqp_url", *TLS_KEYS, "exchange")


def amqp_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The broker options of every command that talks to the publishers' broker: --config,
    --amqp-url (repeatable), the TLS files and --exchange, from the same TOML file and
    VIRTPUB_* variables as `virtpub run`, with the same precedence and checks.

    The command receives them as one argument, `broker` (a BrokerSettings). Invalid ones
    end the command before it connects, one line each, exit code 1. A group whose
    subcommand runs instead (`archive verify`) receives None: its subcommands need no broker.
    """

    @functools.wraps(func)
    def with_broker(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        flags = {key: kwargs.pop(key) for key in _BROKER_KEYS}
        context = click.get_current_context()
        broker = None if context.invoked_subcommand else _broker_settings(config_path, flags)
        return func(*args, broker=broker, **kwargs)

    command: Callable[..., Any] = with_broker
    for option in reversed(_BROKER_OPTIONS):
        command = option(command)
    return command


def _broker_settings(config_path: Path | None, flags: dict[str, Any]) -> BrokerSettings:
    try:
        file_values = read_config_file(config_path) if config_path else None
        return resolve_broker(flags, os.environ, file_values)
    except ConfigError as err:
        command = click.get_current_context().command.name
        for problem in err.problems:
            click.echo(f"virtpub {command}: invalid configuration: {problem}", err=True)
        sys.exit(EXIT_FAILURE)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM end the command cleanly (exit 0), not with a traceback."""

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
