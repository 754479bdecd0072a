"""The publish fast path (publisher/amqp/frames.py): the frames virtpub writes itself are
what pika's own decoder reads as a mandatory basic.publish."""

from __future__ import annotations

import pika
import pika.frame
import pika.spec
import pytest

from virtpub.amqp.frames import publish_frames
from virtpub.contract import messages
from virtpub.contract.envelope import Envelope


@pytest.mark.parametrize(("body_size", "frame_max"), [(300, 131_072), (0, 4096), (10_000, 4096)])
def test_publish_frames_are_what_pika_decodes_as_a_mandatory_publish(
    body_size: int, frame_max: int
) -> None:
    """virtpub writes basic.publish frames itself; pika's own decoder must read them back."""
    backend = messages.Backend(backend="b", uri="x" * body_size, connected=True, reason=None)
    message = Envelope("hv01").publisher_message(backend, 7, 1.5)
    message = message._replace(body=message.body[:body_size])
    data = publish_frames(3, "virt.events", message, frame_max - 8)
    frames = []
    while data:
        consumed, frame = pika.frame.decode_frame(data)
        assert consumed > 0, "a truncated frame"
        frames.append(frame)
        data = data[consumed:]
    method, header, *bodies = frames
    assert {f.channel_number for f in frames} == {3}
    assert isinstance(method.method, pika.spec.Basic.Publish)
    assert (method.method.exchange, method.method.routing_key) == (
        "virt.events",
        message.routing_key,
    )
    assert (method.method.mandatory, method.method.immediate) == (True, False)
    assert header.body_size == len(message.body)
    assert header.properties.message_id == message.id
    assert header.properties.headers == message.basic_properties().headers
    assert b"".join(b.fragment for b in bodies) == message.body
    assert all(len(b.fragment) <= frame_max - 8 for b in bodies)
    assert len(bodies) == -(-len(message.body) // (frame_max - 8))
