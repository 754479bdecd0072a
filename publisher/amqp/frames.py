"""The publish fast path: basic.publish frames encoded here and written through pika.

pika's `basic_publish` builds six frame objects per message, and encoding them was most
of the I/O thread's time; virtpub encodes the frames itself (AMQP 0-9-1, sections 4.2.3
and 4.2.6) and writes a whole batch at once. That write, and the abort of a connection
whose clean close never completes, use pika's private API: this module is the only place
that does, so a pika upgrade has one module to check.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

import pika.exceptions

from virtpub.contract.envelope import OutgoingMessage, short_string

FRAMING_BYTES = 8
"""A frame's type, channel and size before its payload, and its end octet after."""
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # basic.publish, reserved ticket
_MANDATORY = b"\x01"
_FRAME_END = b"\xce"
_BASIC_CLASS = 60
_short_string_cached = functools.lru_cache(maxsize=4096)(short_string)


def publish_frames(
    channel: int, exchange: str, message: OutgoingMessage, body_frame_max: int
) -> bytes:
    """The AMQP frames of one mandatory basic.publish: method, content header, body.

    `body_frame_max` is the negotiated frame size less the framing; a larger body is
    split over several body frames.
    """
    method = (
        _PUBLISH
        + _short_string_cached(exchange)
        + _short_string_cached(message.routing_key)
        + _MANDATORY
    )
    body = message.body
    header = struct.pack(">HHQ", _BASIC_CLASS, 0, len(body)) + message.properties
    parts = [
        struct.pack(">BHI", 1, channel, len(method)), method, _FRAME_END,
        struct.pack(">BHI", 2, channel, len(header)), header, _FRAME_END,
    ]  # fmt: skip
    for start in range(0, len(body), body_frame_max):
        chunk = body[start : start + body_frame_max]
        parts += [struct.pack(">BHI", 3, channel, len(chunk)), chunk, _FRAME_END]
    return b"".join(parts)


def write_publishes(
    connection: Any, channel: int, exchange: str, batch: Sequence[OutgoingMessage]
) -> None:
    """Writes the batch's frames in one write, keeping pika's byte and frame counters true."""
    body_max = connection.params.frame_max - FRAMING_BYTES
    data = b"".join(publish_frames(channel, exchange, message, body_max) for message in batch)
    connection.bytes_sent += len(data)
    connection.frames_sent += 3 * len(batch)
    connection._adapter_emit_data(data)


def abort(connection: Any, why: str) -> None:
    """Drops the connection's stream at once, as if the network had failed: for a broker
    that does not answer a clean close."""
    connection._terminate_stream(pika.exceptions.StreamLostError(why))
