"""`virtpub capabilities`: ask the running publishers what they can emit, and tabulate it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import pika

from publisher.config import BrokerSettings
from publisher.requests import ALL_HOSTS, REPLY_PREFIX, request_key, requests_exchange
from publisher.tail import missing_means, session

MARK = {"native": "native", "derived": "derived", "polled": "polled",
        "filesystem": "files", "unsupported": "-"}  # fmt: skip


def ask(broker: BrokerSettings, hosts: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    """The capabilities messages of the publishers that answered within `timeout`.

    With no hosts named, every publisher is asked and all answers within the
    timeout are kept; with hosts named, it returns as soon as each has answered.
    Asks through the first of the broker's URLs that answers; raises BrokerError.
    """
    exchange = broker.exchange
    correlation = str(uuid.uuid4())
    replies: dict[str, dict[str, Any]] = {}
    with session(broker, "virtpub capabilities") as (connection, _where):
        channel = connection.channel()
        with missing_means(
            f"no publisher has ever served requests on exchange {exchange!r}"
            f" ({requests_exchange(exchange)} does not exist)"
        ):
            channel.exchange_declare(requests_exchange(exchange), passive=True)
        reply_to = f"{REPLY_PREFIX}{correlation}"
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, requests_exchange(exchange), reply_to)

        def on_reply(_ch: Any, _method: Any, properties: Any, body: bytes) -> None:
            if properties.correlation_id != correlation:
                return
            try:
                message = orjson.loads(body)
                replies[str(message["data"]["host_id"])] = message
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return  # not a capabilities message: ignore it

        channel.basic_consume(queue, on_reply, auto_ack=True)
        for host in hosts or [ALL_HOSTS]:
            channel.basic_publish(
                requests_exchange(exchange),
                request_key(host),
                b"",
                pika.BasicProperties(reply_to=reply_to, correlation_id=correlation),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (hosts and set(hosts) <= set(replies)):
            connection.process_data_events(time_limit=0.05)
    return [replies[host] for host in sorted(replies)]


def table(answers: Sequence[dict[str, Any]]) -> str:
    """Event type down, one column per host and backend: where each event comes from."""
    columns: list[tuple[str, dict[str, Any]]] = []
    for answer in answers:
        for backend in answer["data"]["backends"]:
            label = f"{answer['data']['host_id']}/{backend['driver']}"
            columns.append((label, backend["events"]))
    names = sorted({name for _, events in columns for name in events})
    width = max([len("event type"), *map(len, names)])
    widths = [max(len(label), 7) for label, _ in columns]
    header = "  ".join(
        [
            f"{'event type':<{width}}",
            *(f"{lbl:<{w}}" for (lbl, _), w in zip(columns, widths, strict=True)),
        ]
    )
    lines = [header.rstrip()]
    for name in names:
        cells = [
            f"{MARK.get(events.get(name, {}).get('status', 'unsupported'), '?'):<{w}}"
            for (_, events), w in zip(columns, widths, strict=True)
        ]
        lines.append("  ".join([f"{name:<{width}}", *cells]).rstrip())
    return "\n".join(lines)
