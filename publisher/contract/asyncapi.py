"""The exchange as an AsyncAPI 3.0 document, generated from `schemas/`.

Consumers' tools (code generators, catalogues, contract tests) read AsyncAPI, not the
README. Generating the document from the schema files, and checking the committed copy
(`schemas/asyncapi.json`) against a fresh render, keeps it from drifting from the contract.

Each schema's description names its routing keys (`v1.<host_id>.publisher.snapshot.begin`,
`v1.<host_id>.domain.<event>[.<detail>]`); every distinct key pattern becomes a channel, and
`<name>` segments become channel parameters. A description that names none is an error.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from virtpub import __version__
from virtpub.contract import schemas
from virtpub.contract.envelope import APP_ID, CONTENT_TYPE, TYPE_PREFIX
from virtpub.contract.messages import MESSAGES, Message
from virtpub.contract.routing import DEFAULT_EXCHANGE, RoutingKey
from virtpub.contract.routing import FORMAT as ROUTING_FORMAT

ASYNCAPI_VERSION = "3.0.0"
FILE_NAME = "asyncapi.json"
AMQP_BINDING_VERSION = "0.3.0"

# The reference parser validates payloads only in the formats it knows: AsyncAPI schema and
# JSON Schema draft-07. A 2020-12 schemaFormat is accepted unchecked, so the payloads are
# embedded as draft-07 renditions of the 2020-12 files instead (see draft07()).
SCHEMA_FORMAT = "application/schema+json;version=draft-07"
DRAFT_07 = "http://json-schema.org/draft-07/schema#"

# 2020-12 keywords that draft-07 lacks or reads differently: a schema using one cannot be
# embedded as draft-07 without changing what it accepts.
_NOT_IN_DRAFT_07 = frozenset(
    {
        "$anchor",
        "$dynamicAnchor",
        "$dynamicRef",
        "$recursiveAnchor",
        "$recursiveRef",
        "$vocabulary",
        "dependentRequired",
        "dependentSchemas",
        "maxContains",
        "minContains",
        "prefixItems",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
_NAMED_SCHEMAS = frozenset({"properties", "patternProperties"})  # keys are names, not keywords
_INSTANCE_VALUES = frozenset({"const", "enum", "default", "examples"})  # data, not schemas

_SEGMENT = r"<[a-z_]+>|[a-z0-9_]+"
_ROUTE = re.compile(
    rf"\bv(?P<major>[0-9]+)\.<host_id>\.(?P<entity>[a-z_]+)\.(?P<event>{_SEGMENT})"
    rf"(?:\.(?P<detail>{_SEGMENT})|\[\.(?P<optional>{_SEGMENT})\])?"
)
_PARAMETER = re.compile(r"\{([a-z_]+)\}")
_PLACEHOLDER = re.compile(r"<([a-z_]+)>")


@dataclass(frozen=True, slots=True)
class Route:
    """One routing-key pattern; `<name>` segments are filled in per message."""

    major: int
    entity: str
    event: str
    detail: str | None

    @property
    def address(self) -> str:
        key = str(RoutingKey(self.major, "<host_id>", self.entity, self.event, self.detail))
        return _PLACEHOLDER.sub(r"{\1}", key)

    @property
    def channel_id(self) -> str:
        return _PARAMETER.sub(r"\1", self.address.replace("{host_id}.", ""))

    def binding(self, host: str = "*") -> str:
        """The queue binding that receives exactly this pattern's messages."""
        return _PARAMETER.sub("*", self.address.replace("{host_id}", host, 1))

    def parameters(self) -> dict[str, str]:
        """Each parameter's AMQP header: the envelope repeats every segment in one."""
        located = {"host_id": "host_id"}
        for header, segment in (("event", self.event), ("detail", self.detail)):
            if segment is not None and segment.startswith("<"):
                located[segment.strip("<>")] = header
        return located


def routes(info: schemas.SchemaInfo) -> list[Route]:
    """The routing-key patterns a schema's description names as its own.

    A description may mention other schemas' keys (the snapshot bracket names the
    `domain.snapshot` messages inside it); the schema's `type` pattern tells them apart.
    """
    document = info.load()
    type_pattern = document["properties"]["type"]["pattern"]
    found: list[Route] = []
    for match in _ROUTE.finditer(document["description"]):
        entity, event = match["entity"], match["event"]
        if not re.search(type_pattern, f"{TYPE_PREFIX}{entity}.{event.strip('<>')}"):
            continue
        if int(match["major"]) != info.major:
            raise ValueError(f"{info.path}: {match[0]} does not start with v{info.major}")
        details = [None, match["optional"]] if match["optional"] else [match["detail"]]
        for detail in details:
            route = Route(info.major, entity, event, detail)
            if route not in found:
                found.append(route)
    if not found:
        raise ValueError(
            f"{info.path}: its description names no routing key of its own"
            f" (v{info.major}.<host_id>.<entity>.<event>[.<detail>])"
        )
    return found


def draft07(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A self-contained draft-07 schema accepting exactly what the 2020-12 `schema` accepts.

    Embedded in the document, `#/$defs/...` would resolve against the document's root, so
    references are inlined. Every keyword left means the same in both drafts.
    """
    defs = schema.get("$defs", {})
    body = {key: value for key, value in schema.items() if key not in {"$schema", "$id", "$defs"}}
    return {"$schema": DRAFT_07, **_inline(body, defs, ())}


def _inline(node: Any, defs: Mapping[str, Any], via: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, via) for item in node]
    if not isinstance(node, dict):
        return node
    if clash := sorted(_NOT_IN_DRAFT_07.intersection(node)):
        raise ValueError(f"{', '.join(clash)} has no draft-07 equivalent")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _INSTANCE_VALUES:
            out[key] = value
        elif key in _NAMED_SCHEMAS:
            out[key] = {name: _inline(sub, defs, via) for name, sub in value.items()}
        elif key != "$ref":
            out[key] = _inline(value, defs, via)
    if "$ref" not in node:
        return out
    target = _definition(node["$ref"], defs, via)
    # draft-07 ignores a $ref's sibling keywords; 2020-12 applies them, as allOf does.
    return {**out, "allOf": [target, *out.get("allOf", [])]} if out else target


def _definition(ref: str, defs: Mapping[str, Any], via: tuple[str, ...]) -> Any:
    name = ref.removeprefix("#/$defs/")
    if name == ref or name not in defs:
        raise ValueError(f"cannot inline $ref {ref!r}: only #/$defs/<name> is supported")
    if name in via:
        raise ValueError(f"cannot inline $ref {ref!r}: it refers to itself")
    return _inline(defs[name], defs, (*via, name))


def document() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for message_class in MESSAGES:
        info = _schema_of(message_class)
        own = routes(info)
        payload = draft07(info.load())
        messages[message_class.SCHEMA] = _message(message_class, info, own, payload)
        for route in own:
            if route.channel_id in channels:
                raise ValueError(f"two schemas claim routing key {route.address}")
            channels[route.channel_id] = _channel(info, route, own, payload)
            operations[f"send.{route.channel_id}"] = _operation(info, route)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "virtpub",
            "version": __version__,
            "description": _description(),
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "rabbitmq": {
                "host": "{host}:{port}",
                "protocol": "amqp",
                "protocolVersion": "0-9-1",
                "description": "The RabbitMQ broker (or cluster node) the publishers are given"
                " with --amqp-url; amqps:// on port 5671 with TLS.",
                "variables": {
                    "host": {"default": "localhost", "description": "The broker's host name."},
                    "port": {
                        "default": "5672",
                        "examples": ["5672", "5671"],
                        "description": "5672 for amqp://, 5671 for amqps://.",
                    },
                },
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def _description() -> str:
    exchange = DEFAULT_EXCHANGE
    return (
        "A virtpub publisher runs on each hypervisor host and publishes every libvirt domain"
        " event of the host, and its own announcements, on one RabbitMQ topic exchange"
        f" (`{exchange}` unless started with --exchange; durable, no arguments, so consumers"
        " may declare it too; an alternate-exchange policy sends what no binding matched to"
        f" `{exchange}.unroutable`).\n\n"
        "Every message is a CloudEvent 1.0 in structured mode: the AMQP body is one JSON"
        f" object, content type `{CONTENT_TYPE}`. Its `dataschema`"
        " (`urn:virtpub:schema:<schema>:<version>`) names the JSON Schema it follows; a minor"
        " version only adds, a major version changes the routing-key prefix.\n\n"
        f"Routing keys: `{ROUTING_FORMAT}`, each part one topic segment. Bind queues with"
        " topic patterns (`*` one segment, `#` any number): `v1.*.domain.#` for every domain"
        " event of every host, `v1.*.domain.stopped.#` for every stop, `v1.node07.#` for one"
        " host, `v1.*.publisher.#` for the publishers' announcements.\n\n"
        "Delivery is at least once: persistent messages (delivery mode 2) with publisher"
        " confirms, spooled on disk until confirmed. A resend keeps the CloudEvents `id`"
        " (also the AMQP message_id), so consumers deduplicate on it; `sequence` increases"
        " strictly per publisher, so a gap is a missed message. AMQP properties: message_id,"
        f" timestamp, type (the CloudEvents type), content_type and app_id `{APP_ID}`."
    )


def _channel(
    info: schemas.SchemaInfo, route: Route, own: list[Route], payload: Mapping[str, Any]
) -> dict[str, Any]:
    description = (
        f"{payload['title']}. Bind `{route.binding()}` to receive these from every host,"
        f" `{route.binding('<host_id>')}` from one."
    )
    if len(own) > 1:
        description += f" `{_common_binding(own)}` receives every `{info.name}` message."
    return {
        "address": route.address,
        "description": description,
        "parameters": {
            parameter: _parameter(parameter, header, _data_fields(payload))
            for parameter, header in route.parameters().items()
        },
        "messages": {info.name: {"$ref": f"#/components/messages/{info.name}"}},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": DEFAULT_EXCHANGE,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _common_binding(own: Iterable[Route]) -> str:
    """The binding for all of a schema's patterns: their shared literal segments, then `#`."""
    literal = [
        [*segments[:2], *itertools.takewhile(lambda s: s != "*", segments[2:])]
        for segments in (route.binding().split(".") for route in own)
    ]
    shared = itertools.takewhile(lambda column: len(set(column)) == 1, zip(*literal, strict=False))
    return ".".join([*(column[0] for column in shared), "#"])


def _data_fields(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The fields of the CloudEvent's `data`: where a routing-key segment's values are told."""
    fields: Mapping[str, Any] = payload["properties"]["data"].get("properties", {})
    return fields


def _parameter(name: str, header: str, data: Mapping[str, Any]) -> dict[str, Any]:
    if name == "host_id":
        parameter: dict[str, Any] = {
            "description": "The publisher's --host-id (default: the short host name), made one"
            " topic segment: dots and other separators become `-`."
        }
    else:
        field = data.get(name, {})
        parameter = {"description": field.get("description", f"The `{header}` header.")}
        if "enum" in field:
            parameter["enum"] = field["enum"]
    parameter["location"] = f"$message.header#/{header}"
    return parameter


def _schema_of(message_class: type[Message]) -> schemas.SchemaInfo:
    """The schema file of a message class, refused when the two disagree on the version."""
    info = schemas.info(message_class.SCHEMA)
    if info.version != message_class.VERSION:
        raise ValueError(
            f"{message_class.__name__} is version {message_class.VERSION},"
            f" its schema {info.path} is {info.version}"
        )
    return info


def _operation(info: schemas.SchemaInfo, route: Route) -> dict[str, Any]:
    return {
        "action": "send",
        "title": f"Publish {route.address}",
        "channel": {"$ref": f"#/channels/{route.channel_id}"},
        "messages": [{"$ref": f"#/channels/{route.channel_id}/messages/{info.name}"}],
        "bindings": {
            "amqp": {
                "deliveryMode": 2,
                "mandatory": True,
                "timestamp": True,
                "bindingVersion": AMQP_BINDING_VERSION,
            }
        },
    }


def _message(
    message_class: type[Message],
    info: schemas.SchemaInfo,
    own: list[Route],
    payload: dict[str, Any],
) -> dict[str, Any]:
    name, version = message_class.SCHEMA, message_class.VERSION
    message: dict[str, Any] = {
        "name": name,
        "title": payload["title"],
        "summary": f"Schema {name} {version}: dataschema {info.uri}.",
        "description": payload["description"],
        "headers": _headers(info, own, _data_fields(payload)),
        "payload": {"schemaFormat": SCHEMA_FORMAT, "schema": payload},
        "examples": [
            {"name": sample.stem, "payload": json.loads(sample.read_text(encoding="utf-8"))}
            for sample in sorted((info.path.parent / "samples").glob("*.json"))
        ],
    }
    types = {f"{TYPE_PREFIX}{route.entity}.{route.event}" for route in own}
    if len(types) == 1 and "<" not in (ce_type := types.pop()):
        message["bindings"] = {
            "amqp": {"messageType": ce_type, "bindingVersion": AMQP_BINDING_VERSION}
        }
    return message


def _headers(info: schemas.SchemaInfo, own: list[Route], data: Mapping[str, Any]) -> dict[str, Any]:
    """The AMQP application headers the envelope sets, for filtering without the body."""
    properties: dict[str, Any] = {
        "host_id": {"type": "string", "description": "The routing key's host segment."},
        "entity": {"enum": sorted({route.entity for route in own})},
        "event": _segment_values([route.event for route in own], data),
        "schema": {"const": info.name},
        "schema_version": {"const": info.version},
    }
    required = ["host_id", "entity", "event", "schema", "schema_version"]
    details = [route.detail for route in own if route.detail is not None]
    if details:
        properties["detail"] = {
            **_segment_values(details, data),
            "description": "Present exactly when the routing key has a detail segment.",
        }
        if len(details) == len(own):
            required.append("detail")
    return {"type": "object", "required": required, "properties": properties}


def _segment_values(segments: list[str], data: Mapping[str, Any]) -> dict[str, Any]:
    values: set[str] = set()
    for segment in segments:
        if not segment.startswith("<"):
            values.add(segment)
        elif "enum" in (field := data.get(segment.strip("<>"), {})):
            values.update(field["enum"])
        else:
            return {"type": "string"}
    return {"enum": sorted(values)}


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def committed_path() -> Path:
    return schemas.schema_dir() / FILE_NAME


@click.command("asyncapi")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Write the document to this file (the repository keeps it in schemas/{FILE_NAME}).",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing; exit 1 if --output's file differs from what would be written.",
)
def asyncapi_command(output: Path | None, check: bool) -> None:
    """Print the AsyncAPI 3.0 document of the exchange: servers, one channel per
    routing-key pattern with its AMQP bindings, and each message's JSON Schema and samples,
    generated from the schemas this virtpub publishes.

    Exit codes: 0 done (or, with --check, up to date), 1 the file is stale or missing,
    2 bad usage.
    """
    text = render()
    if check:
        if output is None:
            raise click.UsageError("--check needs --output FILE: the file to compare")
        try:
            current = output.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            state = "is missing" if current is None else "is out of date"
            click.echo(
                f"virtpub: {output} {state}; run: virtpub asyncapi --output {output}", err=True
            )
            sys.exit(1)
    elif output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
