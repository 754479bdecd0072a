"""Settings: defaults, then a TOML file, then VIRTPUB_* variables, then flags; validated whole.

Everything is checked before anything connects, and every invalid value is
reported as one line naming its key, so an operator fixes them all in one go.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pika.exceptions

from virtpub.contract.routing import DEFAULT_EXCHANGE
from virtpub.core.redact import redact_url

ENV_PREFIX = "VIRTPUB_"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SPOOL_FULL_POLICIES = ("block", "drop-oldest")
MULTI_VALUED = frozenset({"libvirt_uri", "amqp_url", "watch"})
TLS_KEYS = ("amqp_ca_file", "amqp_cert_file", "amqp_key_file")
WATCH_FORMATS = ("libvirt-xml", "xl")
WATCH_DEFINES = ("fallback", "always")
DEFAULT_LIBVIRT_URI = "qemu:///system"

DEFAULTS: Mapping[str, object] = {
    "libvirt_uri": None,
    "watch": (),
    "watch_defines": "fallback",
    "rescan_interval": 300.0,
    "amqp_url": ("amqp://guest:guest@localhost:5672/%2F",),
    "exchange": DEFAULT_EXCHANGE,
    "host_id": None,
    "state_dir": "/var/lib/virtpub",
    "log_level": "info",
    "log_format": "text",
    "poll_interval": 10.0,
    "amqp_ca_file": None,
    "amqp_cert_file": None,
    "amqp_key_file": None,
    "metrics_listen": None,
    "spool_max_bytes": "1GiB",
    "spool_full_policy": "block",
}

_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
_NOT_IN_SEGMENT = re.compile(r"[^A-Za-z0-9_-]+")
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(i?B?)\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_SPOOL_BYTES = 1 << 20


class ConfigError(Exception):
    """One or more invalid settings; `problems` holds one `key: what is wrong` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The broker part of the settings: all the tools (tail, archive, inventory, ...) need.

    Resolved like `Settings`, from the same file and variables, but validated only as far as
    connecting needs, so an operator's tool never fails over the daemon's state directory.
    """

    amqp_urls: tuple[str, ...]
    exchange: str
    amqp_ca_file: Path | None = None
    amqp_cert_file: Path | None = None
    amqp_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    libvirt_uris: tuple[str, ...]
    amqp_urls: tuple[str, ...]
    exchange: str
    host_id: str
    state_dir: Path
    log_level: str
    log_format: str
    poll_interval: float = 10.0
    """Seconds between two listings of a backend that cannot emit some lifecycle events."""
    amqp_ca_file: Path | None = None
    """CAs to verify an amqps:// broker by; None: the system's."""
    amqp_cert_file: Path | None = None
    """A client certificate for amqps://; without a password in the URL it logs in by EXTERNAL."""
    amqp_key_file: Path | None = None
    metrics_listen: tuple[str, int] | None = None
    """Where to serve /metrics and /healthz; None: not at all."""
    spool_max_bytes: int = 1 << 30
    """What the spool's unconfirmed messages may take on disk."""
    watches: tuple[tuple[Path, str], ...] = ()
    """Config directories to watch, each with its format (libvirt-xml or xl)."""
    watch_defines: str = "fallback"
    """`fallback`: files give defined/undefined only where no libvirt backend emits them."""
    rescan_interval: float = 300.0
    """Seconds between two full rescans of the watched directories."""
    spool_full_policy: str = "block"
    """`block`: stop taking events (drivers' threads never wait: a bounded queue, then counted
    drops); `drop-oldest`: make room by dropping the oldest messages not yet handed out."""

    @property
    def unroutable_exchange(self) -> str:
        """The alternate exchange that keeps what no binding matched."""
        return f"{self.exchange}.unroutable"


def sanitize_host_id(raw: str) -> str:
    """One topic segment: dots would split the routing key, `*`/`#` would be wildcards."""
    return _NOT_IN_SEGMENT.sub("-", raw).strip("-")


def read_config_file(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"config: file {str(path)!r} does not exist"]) from None
    except OSError as err:
        raise ConfigError([f"config: cannot read {str(path)!r}: {err.strerror}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"config: {str(path)!r} is not valid TOML: {err}"]) from None
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(
            [
                f"config: unknown key {key!r} in {str(path)!r} (known: {', '.join(DEFAULTS)})"
                for key in unknown
            ]
        )
    return data


def from_environment(env: Mapping[str, str]) -> dict[str, object]:
    """VIRTPUB_AMQP_URL etc.; multi-valued settings take several values separated by spaces."""
    values: dict[str, object] = {}
    for key in DEFAULTS:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is None or raw == "":
            continue
        values[key] = tuple(raw.replace(",", " ").split()) if key in MULTI_VALUED else raw
    return values


def resolve(
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    file_values: Mapping[str, object] | None = None,
) -> Settings:
    """Merges the layers (later wins) and validates the result."""
    return validate(merge(flags, env, file_values))


def resolve_broker(
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    file_values: Mapping[str, object] | None = None,
) -> BrokerSettings:
    """The broker settings alone, from the same layers as `resolve`; settings of the daemon
    in the file or the environment (state_dir, libvirt_uri, ...) are left unchecked."""
    read = _Reader(merge(flags, env, file_values))
    broker = read.broker()
    if read.problems or broker is None:
        raise ConfigError(read.problems)
    return broker


def merge(
    flags: Mapping[str, object | None],
    env: Mapping[str, str],
    file_values: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Defaults, then the file, then the environment, then the flags given (later wins)."""
    merged: dict[str, object] = dict(DEFAULTS)
    for layer in (file_values or {}, from_environment(env)):
        merged.update(layer)
    merged.update({k: v for k, v in flags.items() if v is not None and v != ()})
    return merged


class _Reader:
    """Reads typed values out of the merged layers, noting one problem per bad value."""

    def __init__(self, values: Mapping[str, object]) -> None:
        self.values = values
        self.problems: list[str] = []

    def text(self, key: str) -> str | None:
        value = self.values.get(key)
        if not isinstance(value, str):
            self.problems.append(f"{key}: must be a string, got {type(value).__name__}")
            return None
        if not value:
            self.problems.append(f"{key}: must not be empty")
            return None
        return value

    def many(self, key: str) -> tuple[str, ...]:
        value = self.values.get(key)
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            self.problems.append(f"{key}: must be a string or a list of strings")
            return ()
        if not items:
            self.problems.append(f"{key}: at least one value is required")
        return tuple(items)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        value = self.text(key)
        if value is None:
            return None
        if value.lower() not in allowed:
            self.problems.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
            return None
        return value.lower()

    def seconds(self, key: str, low: float, high: float) -> float | None:
        value = self.values.get(key)
        try:
            number = float(value) if isinstance(value, str | int | float) else None
        except ValueError:
            number = None
        if number is None or isinstance(value, bool) or not low <= number <= high:
            self.problems.append(
                f"{key}: {value!r} is not a number of seconds from {low} to {high}"
            )
            return None
        return number

    def size(self, key: str, low: int) -> int | None:
        """Bytes, as a number or with a binary unit: 512MiB, 2G, 1073741824."""
        value = self.values.get(key)
        match = _SIZE.fullmatch(value) if isinstance(value, str) else None
        if isinstance(value, int) and not isinstance(value, bool):
            number: int | None = value
        elif match is not None:
            number = int(match[1]) * _SIZE_UNITS[match[2].upper()]
        else:
            number = None
        if number is None or number < low:
            self.problems.append(
                f"{key}: {value!r} is not a size of at least {low} bytes (e.g. 512MiB, 2GiB)"
            )
            return None
        return number

    def watches(self) -> tuple[tuple[Path, str], ...]:
        """`DIR[:FORMAT]`, FORMAT libvirt-xml (the default) or xl."""
        if not self.values.get("watch"):
            return ()
        result: list[tuple[Path, str]] = []
        for item in self.many("watch"):
            directory, _, fmt = item.rpartition(":")
            if not directory or fmt not in WATCH_FORMATS:
                directory, fmt = item, "libvirt-xml"
            path = Path(directory)
            if not path.is_absolute():
                path = Path.cwd() / path
            if path.exists() and not path.is_dir():
                self.problems.append(f"watch: {item!r} is not a directory")
            elif any(existing == path for existing, _ in result):
                self.problems.append(f"watch: {str(path)!r} is given twice")
            else:
                result.append((path, fmt))
        return tuple(result)

    def listen_address(self, key: str) -> tuple[str, int] | None:
        """`[HOST:]PORT`, the host 127.0.0.1 when left out."""
        value = self.values.get(key)
        if value is None or value == "":
            return None
        host, _, port = str(value).rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            self.problems.append(f"{key}: {value!r} is not [HOST:]PORT (e.g. 127.0.0.1:9477)")
            return None
        return (host.strip("[]") or "127.0.0.1", int(port))

    def readable_file(self, key: str) -> Path | None:
        value = self.values.get(key)
        if value is None:
            return None
        path = Path(str(value))
        if not path.is_file() or not os.access(path, os.R_OK):
            self.problems.append(f"{key}: {str(path)!r} is not a readable file")
        return path

    def broker(self) -> BrokerSettings | None:
        """URLs, exchange and TLS files, each checked (problems noted); None when no URL or
        exchange could be read at all."""
        amqp_urls = self.many("amqp_url")
        for url in amqp_urls:
            problem = amqp_url_problem(url)
            if problem:
                self.problems.append(
                    f"amqp_url: {redact_url(url)!r} is an invalid AMQP URL: it {problem}"
                )
        exchange = self.exchange()
        tls_files = {key: self.readable_file(key) for key in TLS_KEYS}
        if (self.values.get("amqp_cert_file") is None) != (
            self.values.get("amqp_key_file") is None
        ):
            self.problems.append("amqp_cert_file: a client certificate needs its amqp_key_file")
        if exchange is None or not amqp_urls:
            return None
        return BrokerSettings(amqp_urls=amqp_urls, exchange=exchange, **tls_files)

    def exchange(self) -> str | None:
        exchange = self.text("exchange")
        if exchange is None:
            return None
        if not _EXCHANGE_NAME.fullmatch(exchange):
            self.problems.append(
                f"exchange: {exchange!r} must be 1-200 letters, digits or '_', '-', '.', ':'"
            )
        elif exchange.startswith("amq."):
            self.problems.append(f"exchange: {exchange!r} is reserved by the broker (amq.* names)")
        return exchange

    def host_id(self) -> str:
        raw = self.values.get("host_id")
        source = socket.gethostname().split(".")[0] if raw is None else raw
        if not isinstance(source, str):
            self.problems.append("host_id: must be a string")
            return ""
        host_id = sanitize_host_id(source)
        if not host_id:
            self.problems.append(f"host_id: {source!r} has no letters or digits to use")
        return host_id


def validate(values: Mapping[str, object]) -> Settings:
    read = _Reader(values)
    watches = read.watches()
    if values.get("libvirt_uri") is None:
        # A host watched through its config files alone may have no libvirt at all.
        libvirt_uris: tuple[str, ...] = () if watches else (DEFAULT_LIBVIRT_URI,)
    else:
        libvirt_uris = read.many("libvirt_uri")
    for uri in libvirt_uris:
        if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", uri):
            read.problems.append(
                f"libvirt_uri: {redact_url(uri)!r} is not a URI (e.g. qemu:///system)"
            )
    broker = read.broker()
    host_id = read.host_id()
    state_dir = read.text("state_dir")
    problem = writable_dir_problem(Path(state_dir)) if state_dir is not None else None
    if problem:
        read.problems.append(f"state_dir: {state_dir!r} {problem}")
    log_level = read.choice("log_level", LOG_LEVELS)
    log_format = read.choice("log_format", LOG_FORMATS)
    poll_interval = read.seconds("poll_interval", 0.1, 3600.0)
    watch_defines = read.choice("watch_defines", WATCH_DEFINES)
    rescan_interval = read.seconds("rescan_interval", 1.0, 86400.0)
    metrics_listen = read.listen_address("metrics_listen")
    spool_max_bytes = read.size("spool_max_bytes", MIN_SPOOL_BYTES)
    spool_full_policy = read.choice("spool_full_policy", SPOOL_FULL_POLICIES)

    if read.problems:
        raise ConfigError(read.problems)
    assert broker and state_dir and log_level and log_format and poll_interval  # for mypy
    assert spool_max_bytes and spool_full_policy and watch_defines and rescan_interval
    return Settings(
        libvirt_uris=libvirt_uris,
        amqp_urls=broker.amqp_urls,
        exchange=broker.exchange,
        host_id=host_id,
        state_dir=Path(state_dir),
        log_level=log_level,
        log_format=log_format,
        poll_interval=poll_interval,
        watches=watches,
        watch_defines=watch_defines,
        rescan_interval=rescan_interval,
        metrics_listen=metrics_listen,
        spool_max_bytes=spool_max_bytes,
        spool_full_policy=spool_full_policy,
        amqp_ca_file=broker.amqp_ca_file,
        amqp_cert_file=broker.amqp_cert_file,
        amqp_key_file=broker.amqp_key_file,
    )


def amqp_url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        # The parser's message may quote the password; say what to check instead.
        return (
            "does not parse (check the port, and percent-encode '/', '?', '#', '@' in a password)"
        )
    if parts.scheme not in ("amqp", "amqps"):
        return f"must start with amqp:// or amqps://, not {parts.scheme or 'nothing'}"
    if not parts.hostname:
        return "names no host"
    if parts.username is not None and parts.password is None:
        return "names a user but no password (amqp://user:password@host/; for EXTERNAL, no user)"
    try:
        pika.URLParameters(url)
    except (ValueError, TypeError, pika.exceptions.AMQPError) as err:
        return f"has an invalid option: {' '.join(str(err).split())}"
    return None


def writable_dir_problem(path: Path) -> str | None:
    """Whether virtpub could create (if needed) and write `path`, checked without creating it."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return "cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"cannot be created: {str(probe)!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"is not writable ({str(probe)!r} denies write access)"
    return None
