"""How close virtpub's whole path comes to the fastest a Python AMQP client publishes.

    python bench/publish.py [--amqp-url URL] [--messages N] [--plot latency.png]

In one run against one broker, each part in a process of its own:

- limit: a minimal pika SelectConnection publisher, pipelined confirms with a
  window of 1,000, persistent ~300-byte messages to a durable queue;
- virtpub: the synthetic driver's events through the whole path (hand-off,
  model, envelope, spool with its fsyncs, publish, confirm), as fast as it goes;
- latency: the same path at a fixed 1,000 events/s, from the driver's hand-off
  to the broker's ack, p50 and p99; and virtpub's peak RSS.

It ends with one line: ratio=<r> virtpub=<msg/s> limit=<msg/s> p99_ms=<ms> rss_mb=<mb>
Targets on the 2-core machine kind: ratio >= 0.8, p99 < 5 ms, RSS < 80 MB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pika

from virtpub.config import Settings
from virtpub.contract.envelope import Envelope, OutgoingMessage
from virtpub.core.event import GONE
from virtpub.core.tracker import Tracker
from virtpub.daemon.assembly import assemble
from virtpub.drivers.synthetic import SyntheticDriver, SyntheticOptions

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY = json.dumps({"pad": "x" * 270}).encode()  # ~300 bytes, like a domain event


class Drainer:
    """A consumer emptying the queue, as an orchestrator would: latency is measured with the
    broker in a steady state, not behind a backlog that grows for the whole phase (a
    growing persistent backlog alone takes a lone pika publisher's p99 from 3 to 15 ms).
    A process of its own, as a consumer is: a thread would take its share of the
    publisher's GIL."""

    def __init__(self, url: str, queue: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready, self.stop = context.Event(), context.Event()
        self.process = context.Process(
            target=_drain, args=(url, queue, self.ready, self.stop), name="drainer", daemon=True
        )

    def __enter__(self) -> Drainer:
        self.process.start()
        if not self.ready.wait(30):
            raise TimeoutError("the draining consumer did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.process.join(10)


def _drain(url: str, queue: str, ready: Any, stop: Any) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1000)
    ready.set()
    for _ in channel.consume(queue, auto_ack=True, inactivity_timeout=0.1):
        if stop.is_set():
            break
    connection.close()


def limit_latency(url: str, seconds: float, rate: float = 1000.0) -> dict[str, float]:
    """The reference latency: the same minimal publisher, one message every 1/rate s."""
    exchange = f"bench-limit-latency-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange)
    total = int(rate * seconds)
    sent: dict[int, float] = {}
    latencies: list[float] = []
    state: dict[str, Any] = {"next": 0}

    def tick() -> None:
        n = state["next"]
        if n >= total:
            return
        state["next"] = n + 1
        sent[n + 1] = time.perf_counter()
        state["channel"].basic_publish(
            exchange, "bench", BODY, pika.BasicProperties(delivery_mode=2), mandatory=True
        )
        due = state["begun"] + (n + 1) / rate - time.perf_counter()
        state["connection"].ioloop.call_later(max(due, 0.0), tick)

    def on_confirm(frame: Any) -> None:
        now, tag = time.perf_counter(), frame.method.delivery_tag
        for t in [t for t in sent if t <= tag] if frame.method.multiple else [tag]:
            latencies.append((now - sent.pop(t)) * 1000)
        if len(latencies) >= total:
            state["connection"].close()

    def on_channel(channel: Any) -> None:
        state["channel"] = channel

        def go(_frame: Any) -> None:
            state["begun"] = time.perf_counter()
            tick()

        channel.confirm_delivery(on_confirm, callback=go)

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _r: c.ioloop.stop(),
    )
    state["connection"] = connection
    with Drainer(url, exchange):
        connection.ioloop.start()
    _cleanup(url, exchange, queue=exchange)
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
    }


def virtpub_shape() -> tuple[bytes, pika.BasicProperties]:
    """The body and AMQP properties of one of virtpub's messages for the synthetic events:
    the same limit publishing these tells what the broker makes of the message contract."""
    driver = SyntheticDriver("synthetic:///", "bench", SyntheticOptions(domains=1))
    tracker = Tracker("synthetic:///")
    publication = tracker.apply(driver.emit_one(), lambda _uuid: GONE)[-1]
    message = Envelope("bench").domain_event(publication, 1)
    properties = pika.BasicProperties()
    properties.decode(message.properties)
    return message.body, properties


def limit(
    url: str, count: int, body: bytes = BODY, properties: pika.BasicProperties | None = None
) -> dict[str, float]:
    """The reference: as little code as pika needs for pipelined confirmed publishing."""
    properties = properties or pika.BasicProperties(delivery_mode=2)
    exchange = f"bench-limit-{uuid.uuid4().hex[:8]}"
    window, sent, acked = 1000, 0, 0
    started = 0.0
    done = threading.Event()
    state: dict[str, Any] = {}

    def pump() -> None:
        nonlocal sent
        channel = state["channel"]
        while sent < count and sent - acked < window:
            channel.basic_publish(exchange, "bench", body, properties, mandatory=True)
            sent += 1

    def on_confirm(frame: Any) -> None:
        nonlocal acked
        acked = frame.method.delivery_tag
        if acked >= count:
            done.set()
            state["connection"].close()
        else:
            pump()

    def on_queue_bound(_frame: Any) -> None:
        nonlocal started
        state["channel"].confirm_delivery(on_confirm)
        started = time.perf_counter()
        pump()

    def on_channel(channel: Any) -> None:
        state["channel"] = channel
        channel.exchange_declare(
            exchange,
            "topic",
            durable=True,
            callback=lambda _f: channel.queue_declare(
                exchange,
                durable=True,
                callback=lambda _q: channel.queue_bind(
                    exchange, exchange, "#", callback=on_queue_bound
                ),
            ),
        )

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _r: c.ioloop.stop(),
    )
    state["connection"] = connection
    connection.ioloop.start()
    elapsed = time.perf_counter() - started
    _cleanup(url, exchange, queue=exchange)
    return {"msgs_per_s": count / elapsed}


def virtpub(url: str, count: int, latency_seconds: float) -> dict[str, Any]:
    """The whole path, in this process: a daemon with the synthetic driver."""
    exchange = f"bench-virtpub-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange)
    confirmed: list[tuple[int, float]] = []
    lock = threading.Lock()

    def on_confirmed(messages: list[OutgoingMessage]) -> None:
        now = time.perf_counter()
        with lock:
            confirmed.extend((m.sequence, now) for m in messages)

    with tempfile.TemporaryDirectory() as state_dir:
        settings = Settings(
            libvirt_uris=("synthetic:///",),
            amqp_urls=(url,),
            exchange=exchange,
            host_id="bench",
            state_dir=Path(state_dir),
            log_level="warning",
            log_format="text",
        )
        driver = SyntheticDriver("synthetic:///", "bench", SyntheticOptions(domains=100))
        daemon = assemble(settings, [driver], on_confirmed=on_confirmed)
        if daemon is None:
            raise SystemExit("bench: the publisher could not be assembled (see the log)")
        stop = threading.Event()
        # A daemon thread: a run that fails (a timeout below) must still end the process.
        runner = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
        runner.start()
        daemon.started.wait(30)
        # The startup messages (capabilities, snapshot; handed over in one batch) confirmed.
        _wait_for(lambda: daemon.broker.confirmed > 0 and daemon.broker.unconfirmed() == 0)
        with lock:
            base, startup = max(s for s, _ in confirmed), len(confirmed)

        # Throughput: hand everything off at once, as an evacuation would.
        started = time.perf_counter()
        for _ in range(count):
            driver.emit_one()
        _wait_for(lambda: len(confirmed) >= startup + count)
        throughput = count / (time.perf_counter() - started)
        _purge(url, exchange)
        time.sleep(2.0)  # let the spool's janitor and the broker's disk catch up

        # Latency at a fixed rate: hand-off to ack, per message, the queue being consumed.
        handoffs: list[float] = []
        first = base + count + 1
        rate = 1000.0
        with Drainer(url, exchange):
            begun = time.perf_counter()
            for n in range(int(rate * latency_seconds)):
                delay = begun + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                handoffs.append(time.perf_counter())
                driver.emit_one()
            _wait_for(lambda: len(confirmed) >= startup + count + len(handoffs))
        stop.set()
        runner.join(30)
    _cleanup(url, exchange, queue=exchange)
    acks = dict(confirmed)
    latencies = sorted((acks[first + i] - handoff) * 1000 for i, handoff in enumerate(handoffs))
    return {
        "msgs_per_s": throughput,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[int(len(latencies) * 0.99)],
        "latencies_ms": latencies,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _wait_for(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the broker did not confirm in time")
        time.sleep(0.005)


def _bind_queue(url: str, exchange: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(exchange, durable=True)
    channel.queue_bind(exchange, exchange, "#")
    connection.close()


def _purge(url: str, queue: str) -> None:
    """Empties the bench queue, so the latency phase starts on an idle broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    connection.channel().queue_purge(queue)
    connection.close()


def _cleanup(url: str, exchange: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    for name in (queue, f"{exchange}.unroutable"):
        channel.queue_delete(name)
    for name in (exchange, f"{exchange}.unroutable"):
        channel.exchange_delete(name)
    connection.close()


def _child(part: str, url: str, count: int, seconds: float) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--part", part, "--amqp-url", url,
         "--messages", str(count), "--latency-seconds", str(seconds)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(json.loads(output.strip().splitlines()[-1]))


def _plot(latencies: list[float], path: Path, p50: float, p99: float) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - only the plot needs it (pip install '.[bench]')

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("no plot: install the bench extra (pip install '.[bench]') for matplotlib")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(latencies, bins=100, color="#3b6ea8")
    ax.axvline(p50, color="black", linestyle="--", label=f"p50 {p50:.2f} ms")
    ax.axvline(p99, color="#c0392b", linestyle="--", label=f"p99 {p99:.2f} ms")
    ax.set_xlabel("hand-off to broker ack (ms), at 1,000 events/s")
    ax.set_ylabel("events")
    ax.set_title("virtpub publish latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--plot", type=Path, help="write the latency histogram as PNG here")
    parser.add_argument("--part", choices=["limit", "virtpub"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "limit":
        reference = limit(args.amqp_url, args.messages)
        body, properties = virtpub_shape()
        shaped = limit(args.amqp_url, args.messages, body, properties)
        reference.update(shaped_msgs_per_s=shaped["msgs_per_s"], shaped_body_bytes=len(body))
        reference.update(limit_latency(args.amqp_url, args.latency_seconds))
        print(json.dumps(reference))
        return
    if args.part == "virtpub":
        print(json.dumps(virtpub(args.amqp_url, args.messages, args.latency_seconds)))
        return
    ref = _child("limit", args.amqp_url, args.messages, args.latency_seconds)
    ours = _child("virtpub", args.amqp_url, args.messages, args.latency_seconds)
    ratio = ours["msgs_per_s"] / ref["msgs_per_s"]
    print(f"limit:   {ref['msgs_per_s']:>9,.0f} msg/s  (pika, pipelined confirms, window 1000)")
    print(f"virtpub: {ours['msgs_per_s']:>9,.0f} msg/s  (synthetic driver, whole path)")
    print(f"ratio:   {ratio:.2f}   (target >= 0.8)")
    shaped = ref["shaped_msgs_per_s"]
    print(f"  the limit sending virtpub's message shape ({ref['shaped_body_bytes']}-byte body,"
          f" its AMQP properties): {shaped:,.0f} msg/s, {shaped / ref['msgs_per_s']:.2f} of"
          f" the limit; virtpub reaches {ours['msgs_per_s'] / shaped:.2f} of it")  # fmt: skip
    print(f"latency at 1,000 ev/s: p50 {ours['p50_ms']:.2f} ms, p99 {ours['p99_ms']:.2f} ms"
          " (target p99 < 5 ms)")  # fmt: skip
    print(f"  the limit's own, publish to ack: p50 {ref['p50_ms']:.2f} ms,"
          f" p99 {ref['p99_ms']:.2f} ms")  # fmt: skip
    print(f"peak RSS: {ours['rss_mb']:.1f} MB (target < 80 MB)")
    if args.plot:
        _plot(ours["latencies_ms"], args.plot, ours["p50_ms"], ours["p99_ms"])
    print(
        f"ratio={ratio:.2f} virtpub={ours['msgs_per_s']:.0f} limit={ref['msgs_per_s']:.0f}"
        f" p99_ms={ours['p99_ms']:.2f} rss_mb={ours['rss_mb']:.1f}"
    )


if __name__ == "__main__":
    main()
