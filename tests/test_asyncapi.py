"""The AsyncAPI document of the exchange (publisher/contract/asyncapi.py, schemas/asyncapi.json).

Consumers generate code and docs from the committed document, so it must equal a fresh
render of schemas/, describe every message real publishers send, and be accepted by the
AsyncAPI initiative's own parser (.ci/asyncapi/validate.mjs, run with Node.js; never
skipped: without node and npm these tests fail).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jsonschema import Draft7Validator, FormatChecker

from virtpub import __version__
from virtpub.contract import asyncapi, messages, schemas
from virtpub.contract.envelope import Envelope, OutgoingMessage
from virtpub.core.event import ConfigRejected, DomainEvent, DomainRef, DomainState
from virtpub.core.tracker import Publication

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / ".ci" / "asyncapi"
COMMITTED = ROOT / "schemas" / asyncapi.FILE_NAME
REGENERATE = (
    "regenerate it: virtpub asyncapi --output schemas/asyncapi.json (or, without that"
    " command: python -c 'from publisher import asyncapi;"
    ' asyncapi.committed_path().write_text(asyncapi.render(), encoding="utf-8")\')'
)
# Quiet, and without install scripts: the parser needs none (one dependency's is telemetry).
NPM_CI = (
    "npm",
    "ci",
    "--ignore-scripts",
    "--no-audit",
    "--no-fund",
    "--loglevel=error",
    "--prefix",
)
HOST = "hv01"
RECEIVED_AT = 1_700_000_000.5
SAMPLES = sorted((ROOT / "schemas").glob("*/samples/*.json"))


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return asyncapi.document()


def message_of(document: dict[str, Any], name: str) -> dict[str, Any]:
    message: dict[str, Any] = document["components"]["messages"][name]
    return message


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the committed file -----------------------------------------------------------------------


def test_committed_document_is_a_fresh_render() -> None:
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; {REGENERATE}"
    assert COMMITTED.read_text(encoding="utf-8") == asyncapi.render(), (
        f"{COMMITTED} is stale (schemas/ or the version changed); {REGENERATE}"
    )


def test_render_is_sorted_two_space_json_with_a_final_newline() -> None:
    text = asyncapi.render()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# --- what it describes ------------------------------------------------------------------------


def test_info_server_and_content_type(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["title"] == "virtpub"
    assert document["info"]["version"] == __version__
    assert document["defaultContentType"] == "application/cloudevents+json"
    assert document["servers"]["rabbitmq"]["protocol"] == "amqp"
    assert "{host}" in document["servers"]["rabbitmq"]["host"]


@pytest.mark.parametrize("name", schemas.ALL)
def test_every_schema_is_a_message_with_its_version(document: dict[str, Any], name: str) -> None:
    info = schemas.info(name)
    message = message_of(document, name)
    payload = message["payload"]
    assert payload["schemaFormat"] == asyncapi.SCHEMA_FORMAT
    assert payload["schema"][schemas.VERSION_KEY] == info.version
    assert message["headers"]["properties"]["schema_version"] == {"const": info.version}
    assert info.uri in message["summary"]
    assert [example["name"] for example in message["examples"]] == sorted(
        path.stem for path in (info.path.parent / "samples").glob("*.json")
    )


@pytest.mark.parametrize("name", schemas.ALL)
def test_every_message_is_sent_on_a_channel(document: dict[str, Any], name: str) -> None:
    channels = [
        channel_id
        for channel_id, channel in document["channels"].items()
        if name in channel["messages"]
    ]
    assert channels, f"no channel carries {name}"
    for channel_id in channels:
        operation = document["operations"][f"send.{channel_id}"]
        assert operation["action"] == "send"
        assert operation["channel"] == {"$ref": f"#/channels/{channel_id}"}
        amqp = document["channels"][channel_id]["bindings"]["amqp"]
        assert amqp["is"] == "routingKey"
        assert amqp["exchange"] == {
            "name": "virt.events",
            "type": "topic",
            "durable": True,
            "autoDelete": False,
            "vhost": "/",
        }


def test_channels_are_the_routing_key_patterns_of_the_readme(document: dict[str, Any]) -> None:
    assert sorted(channel["address"] for channel in document["channels"].values()) == [
        "v1.{host_id}.config.invalid",
        "v1.{host_id}.domain.{event}",
        "v1.{host_id}.domain.{event}.{detail}",
        "v1.{host_id}.publisher.backend.connected",
        "v1.{host_id}.publisher.backend.disconnected",
        "v1.{host_id}.publisher.capabilities",
        "v1.{host_id}.publisher.dropped.{reason}",
        "v1.{host_id}.publisher.snapshot.begin",
        "v1.{host_id}.publisher.snapshot.end",
    ]
    domain = document["channels"]["v1.domain.event.detail"]["description"]
    assert "`v1.*.domain.*.*`" in domain
    assert "`v1.*.domain.#`" in domain


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_sample_validates_against_its_message_payload(
    document: dict[str, Any], path: Path
) -> None:
    schema = message_of(document, path.parent.parent.name)["payload"]["schema"]
    Draft7Validator.check_schema(schema)
    Draft7Validator(schema, format_checker=FormatChecker()).validate(load(path))


@pytest.mark.parametrize("name", schemas.ALL)
def test_payloads_are_self_contained(document: dict[str, Any], name: str) -> None:
    """A `#/$defs/...` left in would resolve against the AsyncAPI document's root."""
    assert "$ref" not in json.dumps(message_of(document, name)["payload"])


# --- real messages match their channel --------------------------------------------------------


def domain_message(event: str, detail: str | None) -> OutgoingMessage:
    shutoff = DomainState("shutoff", "destroyed", 5, 2)
    domain_event = DomainEvent(
        backend=f"virtpub://{HOST}/libvirt/qemu%3A%2F%2F%2Fsystem",
        event=event,
        detail=detail,
        domain=DomainRef(uuid="6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11", name="web-01"),
        codes=None,
        origin="resync",
        received_at=RECEIVED_AT,
    )
    return Envelope(HOST).domain_event(Publication(domain_event, True, shutoff, 4), 9)


def publisher_messages() -> list[OutgoingMessage]:
    """What the envelope builds for every publisher channel, with a sample's data."""
    built = []
    for channel in asyncapi.document()["channels"].values():
        _major, _host, entity, event, *detail = channel["address"].split(".")
        if entity != "publisher":
            continue
        (name,) = channel["messages"]
        sample = load(sorted((schemas.info(name).path.parent / "samples").glob("*.json"))[0])
        details: list[str | None] = [*detail] or [None]
        if detail and detail[0].startswith("{"):
            details = channel["parameters"][detail[0].strip("{}")]["enum"]
        message = messages.for_schema(name).from_data(sample["data"])
        assert message.event_name == event
        for value in details:
            variant = with_detail(message, value)
            assert variant.detail == value
            built.append(Envelope(HOST).publisher_message(variant, 3, 1.0))
    return built


def with_detail(message: messages.Message, detail: str | None) -> messages.Message:
    """The sample turned into the variant whose routing detail is `detail`."""
    if detail is None:
        return message
    field = {"snapshot": "phase", "dropped": "reason", "backend": "connected"}[message.event_name]
    changes: dict[str, object] = {field: detail == "connected" if field == "connected" else detail}
    if detail == "end":
        changes["domains"] = 0  # an end bracket counts the domains it carried
    return dataclasses.replace(message, **changes)


def real_messages() -> list[OutgoingMessage]:
    rejected = ConfigRejected(f"virtpub://{HOST}/files", "/etc/xen/a.cfg", "binary", "binary", 1.0)
    return [
        domain_message("stopped", "destroyed"),
        domain_message("reboot", None),
        Envelope(HOST).config_invalid(rejected, 7),
        *publisher_messages(),
    ]


@pytest.mark.parametrize("message", real_messages(), ids=lambda m: m.routing_key)
def test_real_message_matches_a_channel_and_its_message(
    document: dict[str, Any], message: OutgoingMessage
) -> None:
    matching = [
        channel
        for channel in document["channels"].values()
        if re.fullmatch(
            re.sub(r"\\\{[a-z_]+\\\}", "[^.]+", re.escape(channel["address"])),
            message.routing_key,
        )
    ]
    assert len(matching) == 1, f"{message.routing_key}: channels {matching}"
    headers = message.basic_properties().headers
    (name,) = matching[0]["messages"]
    assert headers["schema"] == name
    message_schema = message_of(document, name)
    Draft7Validator(message_schema["headers"]).validate(headers)
    payload = message_schema["payload"]["schema"]
    Draft7Validator(payload, format_checker=FormatChecker()).validate(json.loads(message.body))


# --- the generator refuses what it cannot describe faithfully ---------------------------------


def test_draft07_inlines_references_and_keeps_sibling_keywords() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:example",
        "properties": {"a": {"$ref": "#/$defs/n", "maximum": 3}, "b": {"$ref": "#/$defs/n"}},
        "$defs": {"n": {"type": "integer"}},
    }
    assert asyncapi.draft07(schema) == {
        "$schema": asyncapi.DRAFT_07,
        "properties": {
            "a": {"maximum": 3, "allOf": [{"type": "integer"}]},
            "b": {"type": "integer"},
        },
    }


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"unevaluatedProperties": False}, "no draft-07 equivalent"),
        ({"$ref": "#/$defs/x", "$defs": {"x": {"items": {"$ref": "#/$defs/x"}}}}, "itself"),
        ({"$ref": "other.json"}, "only #/$defs/<name>"),
    ],
)
def test_draft07_refuses_what_draft07_cannot_say(schema: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        asyncapi.draft07(schema)


def test_a_schema_whose_description_names_no_routing_key_is_an_error(tmp_path: Path) -> None:
    document = copy.deepcopy(schemas.info(schemas.CONFIG_INVALID).load())
    document["description"] = "Mentions only v1.<host_id>.domain.snapshot, another schema's."
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    info = schemas.SchemaInfo(schemas.CONFIG_INVALID, "1.0", path)
    with pytest.raises(ValueError, match="names no routing key of its own"):
        asyncapi.routes(info)


def test_a_message_class_whose_version_its_schema_does_not_have_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(messages.ConfigInvalid, "VERSION", "1.1")
    with pytest.raises(ValueError, match=r"ConfigInvalid is version 1\.1"):
        asyncapi.document()


def test_every_message_of_the_document_is_a_message_class(document: dict[str, Any]) -> None:
    assert list(document["components"]["messages"]) == [cls.SCHEMA for cls in messages.MESSAGES]


# --- the command ------------------------------------------------------------------------------


def test_command_prints_writes_and_checks(tmp_path: Path) -> None:
    runner = CliRunner()
    target = tmp_path / "asyncapi.json"
    printed = runner.invoke(asyncapi.asyncapi_command, [])
    assert (printed.exit_code, printed.output) == (0, asyncapi.render())

    missing = runner.invoke(asyncapi.asyncapi_command, ["--output", str(target), "--check"])
    assert missing.exit_code == 1
    assert "is missing" in missing.output

    written = runner.invoke(asyncapi.asyncapi_command, ["--output", str(target)])
    assert (written.exit_code, written.output) == (0, "")
    assert target.read_text(encoding="utf-8") == asyncapi.render()
    fresh = runner.invoke(asyncapi.asyncapi_command, ["--output", str(target), "--check"])
    assert (fresh.exit_code, fresh.output) == (0, "")

    target.write_text("{}\n", encoding="utf-8")
    stale = runner.invoke(asyncapi.asyncapi_command, ["--output", str(target), "--check"])
    assert stale.exit_code == 1
    assert stale.output.splitlines() == [
        f"virtpub: {target} is out of date; run: virtpub asyncapi --output {target}"
    ]
    assert target.read_text(encoding="utf-8") == "{}\n"


def test_check_needs_a_file() -> None:
    result = CliRunner().invoke(asyncapi.asyncapi_command, ["--check"])
    assert result.exit_code == 2
    assert "--check needs --output" in result.output


# --- the official parser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_validator() -> list[str]:
    """`node validate.mjs`, with the pinned @asyncapi/parser installed from the lock file."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the AsyncAPI document is validated with"
            " @asyncapi/parser on Node.js (>= 18); install Node.js and npm"
            " (Debian: apt-get install nodejs npm)"
        )
    pinned = load(NODE_DIR / "package.json")["dependencies"]["@asyncapi/parser"]
    installed = NODE_DIR / "node_modules" / "@asyncapi" / "parser" / "package.json"
    if not installed.is_file() or load(installed)["version"] != pinned:
        npm = subprocess.run(
            [*NPM_CI, str(NODE_DIR)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert npm.returncode == 0, f"npm ci --prefix .ci/asyncapi failed:\n{npm.stderr}"
    return ["node", str(NODE_DIR / "validate.mjs")]


def validate(command: list[str], path: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [*command, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


def errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("error ")]


def test_official_parser_accepts_the_committed_document(node_validator: list[str]) -> None:
    code, lines = validate(node_validator, COMMITTED)
    assert (code, errors(lines)) == (0, []), "\n".join(lines)


def test_official_parser_rejects_a_broken_message_reference(
    node_validator: list[str], tmp_path: Path
) -> None:
    broken = load(COMMITTED)
    broken["channels"]["v1.domain.event"]["messages"]["domain-event"]["$ref"] = (
        "#/components/messages/no-such-message"
    )
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    code, lines = validate(node_validator, path)
    assert code == 1, "\n".join(lines)
    assert any("no-such-message" in line for line in errors(lines)), "\n".join(lines)


def test_official_parser_checks_the_payload_schemas(
    node_validator: list[str], tmp_path: Path
) -> None:
    """It would not with a schemaFormat it has no parser for, such as draft 2020-12."""
    broken = load(COMMITTED)
    payload = broken["components"]["messages"]["config-invalid"]["payload"]["schema"]
    payload["properties"]["sequence"]["minimum"] = "one"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    code, lines = validate(node_validator, path)
    assert code == 1, "\n".join(lines)
    assert any("minimum" in line for line in errors(lines)), "\n".join(lines)
