"""Unit tests for publisher/config.py: layering, parsing and whole-config validation.

The contract under test: settings come from defaults < TOML file < VIRTPUB_*
environment < flags, and every invalid value is reported as exactly one
`key: ...` line, all at once, without ever showing a password.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtpub import config
from virtpub.config import (
    DEFAULTS,
    BrokerSettings,
    ConfigError,
    Settings,
    from_environment,
    read_config_file,
    resolve,
    resolve_broker,
    sanitize_host_id,
    validate,
)


@pytest.fixture
def valid(tmp_path: Path) -> dict[str, object]:
    """A complete, valid set of values; tests override one key to make it invalid."""
    return {**DEFAULTS, "host_id": "hv01", "state_dir": str(tmp_path / "state")}


def problems_of(values: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(values)
    assert str(caught.value) == "; ".join(caught.value.problems)
    return caught.value.problems


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "virtpub.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and layering ---------------------------------------------------------------


def test_defaults_apply_when_nothing_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only state_dir is overridden: the default /var/lib/virtpub may not be writable here."""
    monkeypatch.setattr(config.socket, "gethostname", lambda: "hv07.example.org")
    settings = resolve({"state_dir": str(tmp_path)}, {})
    assert settings == Settings(
        libvirt_uris=("qemu:///system",),
        amqp_urls=("amqp://guest:guest@localhost:5672/%2F",),
        exchange="virt.events",
        host_id="hv07",
        state_dir=tmp_path,
        log_level="info",
        log_format="text",
    )
    assert settings.unroutable_exchange == "virt.events.unroutable"


def test_layers_override_in_order_file_then_env_then_flags(tmp_path: Path) -> None:
    file_values = {"exchange": "from.file", "log_level": "error", "log_format": "json"}
    env = {"VIRTPUB_EXCHANGE": "from.env", "VIRTPUB_LOG_LEVEL": "warning"}
    flags = {"exchange": "from.flag", "host_id": "hv01", "state_dir": str(tmp_path)}
    settings = resolve(flags, env, file_values)
    assert settings.exchange == "from.flag"
    assert settings.log_level == "warning"
    assert settings.log_format == "json"


def test_unset_flags_do_not_override_lower_layers(tmp_path: Path) -> None:
    """click passes None for an absent option and () for an absent multiple option."""
    env = {"VIRTPUB_EXCHANGE": "from.env", "VIRTPUB_AMQP_URL": "amqp://env-host/"}
    flags = {"exchange": None, "amqp_url": (), "host_id": "hv01", "state_dir": str(tmp_path)}
    settings = resolve(flags, env)
    assert settings.exchange == "from.env"
    assert settings.amqp_urls == ("amqp://env-host/",)


def test_toml_file_values_reach_the_settings(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'amqp_url = ["amqp://a/", "amqps://b/"]\nexchange = "hv.events"\nhost_id = "hv02"\n',
    )
    settings = resolve({"state_dir": str(tmp_path)}, {}, read_config_file(path))
    assert settings.amqp_urls == ("amqp://a/", "amqps://b/")
    assert settings.exchange == "hv.events"
    assert settings.host_id == "hv02"


def test_env_multi_valued_settings_split_on_spaces_and_commas() -> None:
    env = {
        "VIRTPUB_AMQP_URL": "amqp://a/  amqp://b/,amqp://c/, amqp://d/",
        "VIRTPUB_LIBVIRT_URI": "qemu:///system",
    }
    values = from_environment(env)
    assert values["amqp_url"] == ("amqp://a/", "amqp://b/", "amqp://c/", "amqp://d/")
    assert values["libvirt_uri"] == ("qemu:///system",)


def test_env_single_valued_settings_are_taken_whole() -> None:
    assert from_environment({"VIRTPUB_STATE_DIR": "/srv/virt pub,x"}) == {
        "state_dir": "/srv/virt pub,x"
    }


def test_env_ignores_empty_and_unprefixed_variables() -> None:
    env = {"VIRTPUB_EXCHANGE": "", "EXCHANGE": "x", "virtpub_log_level": "debug"}
    assert from_environment(env) == {}


# --- the tools' broker settings ----------------------------------------------------------------


def test_broker_settings_layer_as_the_daemons_and_ignore_its_other_settings(
    tmp_path: Path,
) -> None:
    """A tool reads the daemon's file: its state_dir (under a file here) and log level
    (invalid) are the daemon's business, and would stop `resolve` but not `resolve_broker`."""
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        path.write_text("-", encoding="utf-8")
    file_values = {"amqp_url": ["amqp://file/"], "exchange": "from.file", "amqp_ca_file": str(ca),
                   "state_dir": str(ca / "state"), "log_level": "loud"}  # fmt: skip
    env = {"VIRTPUB_EXCHANGE": "from.env", "VIRTPUB_AMQP_CERT_FILE": str(cert),
           "VIRTPUB_AMQP_KEY_FILE": str(key)}  # fmt: skip
    flags = {"amqp_url": ("amqps://flag/", "amqps://flag2/"), "exchange": None}
    assert resolve_broker(flags, env, file_values) == BrokerSettings(
        amqp_urls=("amqps://flag/", "amqps://flag2/"),
        exchange="from.env",
        amqp_ca_file=ca,
        amqp_cert_file=cert,
        amqp_key_file=key,
    )
    with pytest.raises(ConfigError) as caught:
        resolve(flags, env, file_values)
    assert [p.split(":", 1)[0] for p in caught.value.problems] == ["state_dir", "log_level"]


def test_broker_settings_report_each_problem_on_its_own_line(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("-", encoding="utf-8")
    flags = {"amqp_url": ("http://u:secret@mq/",), "amqp_cert_file": str(cert)}
    with pytest.raises(ConfigError) as caught:
        resolve_broker(flags, {"VIRTPUB_AMQP_CA_FILE": str(tmp_path / "missing.pem")})
    problems = caught.value.problems
    assert [p.split(":", 1)[0] for p in problems] == ["amqp_url", "amqp_ca_file", "amqp_cert_file"]
    assert "is an invalid AMQP URL" in problems[0] and "secret" not in problems[0]
    assert "not a readable file" in problems[1] and "amqp_key_file" in problems[2]


def test_log_level_and_format_are_case_insensitive(valid: dict[str, object]) -> None:
    settings = validate({**valid, "log_level": "DEBUG", "log_format": "Json"})
    assert (settings.log_level, settings.log_format) == ("debug", "json")


# --- reading the TOML file -----------------------------------------------------------------


def test_missing_config_file_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert len(caught.value.problems) == 1
    assert str(path) in caught.value.problems[0]
    assert "does not exist" in caught.value.problems[0]


def test_invalid_toml_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'exchange = "unterminated\n')
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert len(caught.value.problems) == 1
    assert str(path) in caught.value.problems[0]
    assert "not valid TOML" in caught.value.problems[0]


def test_unknown_key_in_config_file_names_the_key_and_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'exchange = "x"\nexchnage = "typo"\n')
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    assert len(caught.value.problems) == 1
    assert "'exchnage'" in caught.value.problems[0]
    assert str(path) in caught.value.problems[0]


def test_each_unknown_key_in_config_file_is_its_own_problem(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "a = 1\nb = 2\nexchange = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(path)
    first, second = caught.value.problems
    assert "'a'" in first
    assert "'b'" in second


# --- one problem line per invalid value ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("amqp_url", "http://guest:guest@localhost/"),
        ("amqp_url", "amqp:///%2F"),
        ("amqp_url", "amqp://localhost:99999/"),
        ("amqp_url", "amqp://localhost:port/"),
        ("amqp_url", "amqp://localhost/?heartbeat=abc"),
        ("amqp_url", "amqp://localhost/?no_such_option=1"),
        ("amqp_url", []),
        ("amqp_url", 5),
        ("exchange", "virt events"),
        ("exchange", "amq.topic"),
        ("exchange", "x" * 201),
        ("exchange", 5),
        ("log_level", "verbose"),
        ("log_format", "xml"),
        ("libvirt_uri", "/var/run/libvirt/libvirt-sock"),
        ("libvirt_uri", ["qemu:///system", "system"]),
        ("host_id", "*.#"),
        ("host_id", 7),
        ("spool_max_bytes", "lots"),
        ("spool_max_bytes", "1MB5"),
        ("spool_max_bytes", "512KiB"),
        ("spool_max_bytes", 0),
        ("spool_max_bytes", True),
        ("spool_max_bytes", 1.5),
        ("spool_full_policy", "drop-newest"),
    ],
)
def test_invalid_value_gives_exactly_one_problem_naming_its_key(
    valid: dict[str, object], key: str, value: object
) -> None:
    problems = problems_of({**valid, key: value})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("1GiB", 1 << 30),
        ("512MiB", 512 << 20),
        ("2g", 2 << 30),
        ("3 M", 3 << 20),
        ("1048576", 1 << 20),
        (5 << 20, 5 << 20),
        ("1TB", 1 << 40),
    ],
)
def test_spool_max_bytes_takes_binary_units(
    valid: dict[str, object], value: object, size: int
) -> None:
    assert validate({**valid, "spool_max_bytes": value}).spool_max_bytes == size


def test_spool_defaults_bound_the_spool_and_block(valid: dict[str, object]) -> None:
    settings = validate(valid)
    assert (settings.spool_max_bytes, settings.spool_full_policy) == (1 << 30, "block")
    settings = validate({**valid, "spool_full_policy": "Drop-Oldest"})
    assert settings.spool_full_policy == "drop-oldest"


def test_amqp_url_problem_says_what_is_wrong(valid: dict[str, object]) -> None:
    """The line must be actionable: scheme, missing host and bad option are told apart."""
    assert "amqp://" in problems_of({**valid, "amqp_url": "http://h/"})[0]
    assert "no host" in problems_of({**valid, "amqp_url": "amqp:///%2F"})[0]
    assert "heartbeat" in problems_of({**valid, "amqp_url": "amqp://h/?heartbeat=abc"})[0]
    assert "no password" in problems_of({**valid, "amqp_url": "amqp://user@h/"})[0]


def test_state_dir_under_a_file_cannot_be_created(valid: dict[str, object], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    problems = problems_of({**valid, "state_dir": str(blocker / "state")})
    assert len(problems) == 1
    assert problems[0].startswith("state_dir: ")
    assert "not a directory" in problems[0]


def test_state_dir_is_checked_without_being_created(valid: dict[str, object]) -> None:
    state_dir = Path(str(valid["state_dir"])) / "deeper"
    assert validate({**valid, "state_dir": str(state_dir)}).state_dir == state_dir
    assert not state_dir.exists()


def test_several_invalid_values_are_all_reported_together(
    valid: dict[str, object], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    problems = problems_of(
        {
            **valid,
            "amqp_url": ("amqp://ok/", "ftp://bad/", "amqp:///nohost"),
            "exchange": "amq.direct",
            "log_level": "loud",
            "state_dir": str(blocker / "x"),
        }
    )
    assert [p.split(":", 1)[0] for p in problems] == [
        "amqp_url",
        "amqp_url",
        "exchange",
        "state_dir",
        "log_level",
    ]


def test_empty_exchange_is_rejected(valid: dict[str, object]) -> None:
    """The empty name is the broker's default exchange: routing keys would name queues."""
    problems = problems_of({**valid, "exchange": ""})
    assert problems[0].startswith("exchange: ")


@pytest.mark.parametrize("key", ["log_level", "log_format"])
def test_non_string_log_setting_gives_one_problem(valid: dict[str, object], key: str) -> None:
    assert len(problems_of({**valid, key: 3})) == 1


# --- host id -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("hv01", "hv01"),
        ("hv01.example.org", "hv01-example-org"),
        ("rack*3#a", "rack-3-a"),
        ("..edge..", "edge"),
        ("under_score-dash", "under_score-dash"),
    ],
)
def test_host_id_becomes_one_topic_segment(raw: str, clean: str) -> None:
    assert sanitize_host_id(raw) == clean


def test_explicit_host_id_is_sanitized_in_settings(valid: dict[str, object]) -> None:
    assert validate({**valid, "host_id": "hv.01*#"}).host_id == "hv-01"


def test_all_symbol_host_id_is_an_error(valid: dict[str, object]) -> None:
    problems = problems_of({**valid, "host_id": ".*#."})
    assert problems == ["host_id: '.*#.' has no letters or digits to use"]


def test_default_host_id_is_the_short_hostname(
    valid: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.socket, "gethostname", lambda: "node*9.dc1.example")
    assert validate({**valid, "host_id": None}).host_id == "node-9"


# --- passwords ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://guest:secret@localhost/",
        "amqp://guest:secret@/vhost",
        "amqp://guest:secret@localhost:99999/",
        "amqp://guest:secret@localhost:port/",
        "amqp://guest:secret@localhost/?heartbeat=abc",
        "amqp://guest:secret@localhost/?bogus=1",
        "amqp://guest:secret@[::1/",
        "amqp://guest:secret/1@localhost/",
    ],
)
def test_password_never_appears_in_a_problem(valid: dict[str, object], url: str) -> None:
    problems = problems_of({**valid, "amqp_url": url})
    assert len(problems) == 1
    assert "secret" not in problems[0]


def test_password_in_a_bad_libvirt_uri_is_hidden(valid: dict[str, object]) -> None:
    problems = problems_of({**valid, "libvirt_uri": "//admin:secret@host/system"})
    assert "secret" not in problems[0]


def test_watching_directories_drops_the_default_libvirt_uri(
    valid: dict[str, object], tmp_path: Path
) -> None:
    settings = validate({**valid, "watch": (f"{tmp_path}:xl", "/etc/libvirt/qemu")})
    assert settings.libvirt_uris == ()
    assert settings.watches == ((tmp_path, "xl"), (Path("/etc/libvirt/qemu"), "libvirt-xml"))
    assert validate(valid).libvirt_uris == ("qemu:///system",)
    explicit = validate({**valid, "watch": (str(tmp_path),), "libvirt_uri": ("qemu:///system",)})
    assert explicit.libvirt_uris == ("qemu:///system",)


def test_a_watch_that_is_a_file_or_given_twice_is_one_problem_each(
    valid: dict[str, object], tmp_path: Path
) -> None:
    a_file = tmp_path / "x.cfg"
    a_file.write_text("")
    problems = problems_of({**valid, "watch": (str(a_file), f"{tmp_path}:xl", str(tmp_path))})
    assert problems == [
        f"watch: {str(a_file)!r} is not a directory",
        f"watch: {str(tmp_path)!r} is given twice",
    ]
