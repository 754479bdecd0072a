"""The one place that knows CloudEvents attributes, routing keys and AMQP properties.

Messages are CloudEvents 1.0 in structured mode: the whole event, attributes and
data, is one JSON body with content type `application/cloudevents+json`.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

import orjson
import pika
import pika.data
import pika.spec

from virtpub.contract import messages, schemas
from virtpub.contract.routing import RoutingKey
from virtpub.core.driver import Signal
from virtpub.core.event import BackendChange, ConfigRejected, JSONValue
from virtpub.core.tracker import Publication

CONTENT_TYPE = "application/cloudevents+json"
TYPE_PREFIX = "org.virtpub."
APP_ID = "virtpub"


class OutgoingMessage(NamedTuple):
    """A message ready for the broker; resends reuse it whole, so `id` never changes.

    `properties` are the AMQP basic properties already encoded: pika encodes a
    headers table in pure Python, which cost more than the rest of a publish.
    The headers of a routing key never change, so their encoding is cached.
    A named tuple, not a frozen dataclass: one is built per message, and a frozen
    dataclass's `__init__` costs several times a tuple's.
    """

    sequence: int
    id: str
    routing_key: str
    type: str
    timestamp: int
    properties: bytes
    body: bytes
    received_at: float = 0.0
    """When virtpub received the signal, for the latency metric; 0 when read back from the
    spool (the spool does not keep it)."""

    def basic_properties(self) -> pika.spec.BasicProperties:
        """The properties as pika reads them (for tests and tools; publishing sends the bytes)."""
        decoded = pika.spec.BasicProperties()
        decoded.decode(self.properties)
        return decoded


_FLAGS = struct.pack(
    ">H",
    pika.spec.BasicProperties.FLAG_CONTENT_TYPE
    | pika.spec.BasicProperties.FLAG_HEADERS
    | pika.spec.BasicProperties.FLAG_DELIVERY_MODE
    | pika.spec.BasicProperties.FLAG_MESSAGE_ID
    | pika.spec.BasicProperties.FLAG_TIMESTAMP
    | pika.spec.BasicProperties.FLAG_TYPE
    | pika.spec.BasicProperties.FLAG_APP_ID,
)
_PERSISTENT = bytes([pika.DeliveryMode.Persistent.value])


def short_string(value: str) -> bytes:
    """An AMQP short string: a length octet, then the UTF-8 bytes."""
    encoded = value.encode()
    return bytes([len(encoded)]) + encoded


def _properties_around(message_type: str, headers: Mapping[str, str]) -> tuple[bytes, bytes]:
    """What comes before the message id and after the timestamp: the same for every message
    of one kind, so computed once per kind."""
    table: list[bytes] = []
    pika.data.encode_table(table, dict(headers))
    head = b"".join((_FLAGS, short_string(CONTENT_TYPE), *table, _PERSISTENT))
    return head, short_string(message_type) + short_string(APP_ID)


def encode_properties(
    message_id: str, timestamp: int, message_type: str, headers: Mapping[str, str]
) -> bytes:
    """AMQP basic properties in wire order: content type, headers, delivery mode 2 (persistent),
    message id, timestamp, type and app id (AMQP 0-9-1, section 4.2.6.1)."""
    head, tail = _properties_around(message_type, headers)
    return _properties(head, message_id, timestamp, tail)


def _properties(head: bytes, message_id: str, timestamp: int, tail: bytes) -> bytes:
    return b"".join((head, short_string(message_id), struct.pack(">Q", timestamp), tail))


def _right_sized(encoded: bytes) -> bytes:
    """A copy of exactly its length: orjson (3.12 and later) returns bytes that keep a buffer
    of at least 4 KiB, six times a domain event's size, and messages wait in memory by
    the thousand (a first start's snapshot of 10,000 domains held 160 MB of slack)."""
    return b"".join((encoded, b""))


class _Kind(NamedTuple):
    """Everything of a message that follows from its schema, entity, event and detail."""

    ce_type: str
    routing_key: str
    properties_head: bytes
    properties_tail: bytes


def rfc3339(epoch: float) -> str:
    """RFC 3339 UTC with microseconds; the date and time are formatted once a second."""
    second, micro = divmod(round(epoch * 1_000_000), 1_000_000)
    return f"{_utc_second(second)}.{micro:06d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


class MessageIds:
    """Random (version 4) UUIDs, drawn from the OS's random source 256 at a time.

    `uuid.uuid4()` costs a system call and a UUID object per message: half of
    what building an envelope cost. These ids are as random; only the draws are batched.
    """

    BATCH = 256

    def __init__(self) -> None:
        self._pool: list[str] = []

    def next(self) -> str:
        if not self._pool:
            self._pool = self._draw()
        return self._pool.pop()

    def _draw(self) -> list[str]:
        raw = bytearray(os.urandom(16 * self.BATCH))
        raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
        raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
        h = raw.hex()
        return [
            f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
            f"{h[i + 20 : i + 32]}"
            for i in range(0, len(h), 32)
        ]


def signal_type(signal: Signal) -> str:
    """The CloudEvents type the signal is published as (or would have been, when dropped)."""
    if isinstance(signal, BackendChange):
        return f"{TYPE_PREFIX}publisher.backend"
    if isinstance(signal, ConfigRejected):
        return f"{TYPE_PREFIX}config.invalid"
    return f"{TYPE_PREFIX}domain.{signal.event}"


class Envelope:
    """Builds the messages of one publisher (one host id)."""

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.publisher_source = f"virtpub://{host_id}/publisher"
        self._ids = MessageIds()
        self._kinds: dict[tuple[str, str, str, str | None], _Kind] = {}

    def domain_event(self, publication: Publication, sequence: int) -> OutgoingMessage:
        event = publication.event
        running_id = event.domain.id if publication.state.active else None
        rename = publication.rename
        message = messages.DomainEventMessage(
            domain=messages.DomainPart(event.domain.uuid, event.domain.name, running_id),
            event=event.event,
            event_detail=event.detail,
            origin=event.origin,
            persistent=publication.persistent,
            state=publication.state,
            seq=publication.seq,
            info=event.info,
            codes=event.codes,
            rename=None if rename is None else messages.Rename(*rename),
        )
        return self._message(
            message,
            source=event.backend,
            subject=event.domain.uuid,
            sequence=sequence,
            received_at=event.received_at,
        )

    def publisher_message(
        self, message: messages.Message, sequence: int, received_at: float
    ) -> OutgoingMessage:
        """A message about the publisher itself: its source and subject are this host's."""
        return self._message(
            message,
            source=self.publisher_source,
            subject=self.host_id,
            sequence=sequence,
            received_at=received_at,
        )

    def config_invalid(self, rejected: ConfigRejected, sequence: int) -> OutgoingMessage:
        message = messages.ConfigInvalid(
            backend=rejected.backend,
            path=rejected.path,
            reason=rejected.reason,
            message=rejected.message,
        )
        return self._message(
            message,
            source=rejected.backend,
            subject=rejected.path,
            sequence=sequence,
            received_at=rejected.received_at,
        )

    def _message(
        self,
        message: messages.Message,
        *,
        source: str,
        subject: str,
        sequence: int,
        received_at: float,
    ) -> OutgoingMessage:
        return self._compose(
            schemas.info(message.SCHEMA),
            (message.ENTITY, message.event_name, message.detail),
            message.data(),
            source=source,
            subject=subject,
            sequence=sequence,
            received_at=received_at,
        )

    def _compose(
        self,
        schema: schemas.SchemaInfo,
        route: tuple[str, str, str | None],
        data: dict[str, JSONValue],
        *,
        source: str,
        subject: str,
        sequence: int,
        received_at: float,
    ) -> OutgoingMessage:
        """The CloudEvent of `data`; `route` is its entity, event and detail."""
        message_id = self._ids.next()
        kind = self._kind(schema, *route)
        ce_type = kind.ce_type
        body = {
            "specversion": "1.0",
            "id": message_id,
            "source": source,
            "type": ce_type,
            "subject": subject,
            "time": rfc3339(received_at),
            "datacontenttype": "application/json",
            "dataschema": schema.uri,
            "sequence": sequence,
            "data": data,
        }
        timestamp = int(received_at)
        return OutgoingMessage(
            sequence=sequence,
            id=message_id,
            routing_key=kind.routing_key,
            type=ce_type,
            timestamp=timestamp,
            properties=_properties(
                kind.properties_head, message_id, timestamp, kind.properties_tail
            ),
            body=_right_sized(orjson.dumps(body)),
            received_at=received_at,
        )

    def _kind(
        self, schema: schemas.SchemaInfo, entity: str, event: str, detail: str | None
    ) -> _Kind:
        key = (schema.name, entity, event, detail)
        kind = self._kinds.get(key)
        if kind is None:
            ce_type = f"{TYPE_PREFIX}{entity}.{event}"
            headers = {
                "host_id": self.host_id,
                "entity": entity,
                "event": event,
                "schema": schema.name,
                "schema_version": schema.version,
            }
            if detail:
                headers["detail"] = detail
            head, tail = _properties_around(ce_type, headers)
            route = str(RoutingKey(schema.major, self.host_id, entity, event, detail))
            kind = self._kinds[key] = _Kind(ce_type, route, head, tail)
        return kind
