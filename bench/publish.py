"""How close virtpub's whole path comes to the fastest a Python AMQP client publishes.

    python bench/publish.py [--amqp-url URL] [--messages N] [--plot latency.png]

In one run against one broker, each part in a process of its own, on a classic queue
and then on a quorum queue (the type deploy/definitions.json gives orchestrators):

- limit: a minimal pika SelectConnection publisher, pipelined confirms with a window of
  1,000, persistent ~300-byte messages to a durable queue; then the same limit sending
  virtpub's message shape (its body and AMQP properties);
- virtpub: the synthetic driver's events through the whole path (hand-off, model,
  envelope, spool with its fsyncs, publish, confirm), as fast as it goes;
- for each: the throughput, the CPU seconds the publishing process spent per 1,000
  messages, and the latency at a fixed 1,000 events/s with the queue consumed, from
  the hand-off (the limit: the publish) to the broker's ack, p50 and p99; virtpub's
  latency split into its stages, and its peak RSS;
- virtpub's message built up one piece at a time (its body, then each AMQP property,
  then each header), with the limit's and the broker's CPU per 1,000 messages at each
  step: what each piece costs.

It ends with one line:
shape_ratio=<virtpub msg/s / same-shape limit msg/s> p99_ratio=<virtpub p99 / the limit's
p99> cpu_ratio=<virtpub CPU per message / the limit's> virtpub=<msg/s> limit=<msg/s>
p99_ms=<ms> rss_mb=<mb>, for the classic queue.
Targets on the 2-core machine kind: shape_ratio >= 0.95, p99_ratio <= 1.5, p50 within
0.5 ms of the limit's, cpu_ratio <= 2.0, RSS < 80 MB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika

from virtpub.amqp import broker as broker_module
from virtpub.config import Settings
from virtpub.contract.envelope import Envelope, OutgoingMessage
from virtpub.core.event import GONE
from virtpub.core.tracker import Tracker
from virtpub.daemon.assembly import assemble
from virtpub.daemon.service import Daemon
from virtpub.drivers.synthetic import SyntheticDriver, SyntheticOptions

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY = json.dumps({"pad": "x" * 270}).encode()  # ~300 bytes, like a domain event
RATE = 1000.0
QUEUE_TYPES = ("classic", "quorum")


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


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[int(len(ordered) * 0.99)],
    }


class LimitPublisher:
    """The reference: as little code as pika needs for pipelined confirmed publishing, either
    as fast as it goes (`flood`) or one message every 1/RATE s (`paced`)."""

    def __init__(
        self, url: str, exchange: str, body: bytes, properties: pika.BasicProperties
    ) -> None:
        self.url, self.exchange, self.body, self.properties = url, exchange, body, properties
        self.window = 1000
        self.sent: dict[int, float] = {}
        self.latencies_ms: list[float] = []
        self.total = 0
        self.paced = False
        self.begun = 0.0
        self.connection: Any = None
        self.channel: Any = None

    def run(self, total: int, *, paced: bool) -> float:
        """Publishes `total` messages; returns the seconds from the first to the last ack."""
        self.total, self.paced = total, paced
        self.sent.clear()
        self.latencies_ms.clear()
        self.connection = pika.SelectConnection(
            pika.URLParameters(self.url),
            on_open_callback=self.on_connection_open,
            on_close_callback=lambda c, _r: c.ioloop.stop(),
        )
        self.connection.ioloop.start()
        return time.perf_counter() - self.begun

    def on_connection_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self.on_channel_open)

    def on_channel_open(self, channel: Any) -> None:
        self.channel = channel
        channel.confirm_delivery(self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame: Any) -> None:
        self.begun = time.perf_counter()
        if self.paced:
            self.tick()
        else:
            self.pump()

    def publish(self) -> None:
        tag = len(self.sent) + len(self.latencies_ms) + 1  # published so far, plus this one
        self.sent[tag] = time.perf_counter()
        self.channel.basic_publish(
            self.exchange, "bench", self.body, self.properties, mandatory=True
        )

    def pump(self) -> None:
        while len(self.sent) + len(self.latencies_ms) < self.total and len(self.sent) < self.window:
            self.publish()

    def tick(self) -> None:
        n = len(self.sent) + len(self.latencies_ms)
        if n >= self.total:
            return
        self.publish()
        due = self.begun + (n + 1) / RATE - time.perf_counter()
        self.connection.ioloop.call_later(max(due, 0.0), self.tick)

    def on_confirm(self, frame: Any) -> None:
        now, tag = time.perf_counter(), frame.method.delivery_tag
        for t in [t for t in self.sent if t <= tag] if frame.method.multiple else [tag]:
            self.latencies_ms.append((now - self.sent.pop(t)) * 1000)
        if len(self.latencies_ms) >= self.total:
            self.connection.close()
        elif not self.paced:
            self.pump()


def limit(
    url: str,
    count: int,
    seconds: float,
    queue_type: str,
    *,
    shape: tuple[bytes, pika.BasicProperties] | None = None,
) -> dict[str, float]:
    """The limit's throughput, CPU per 1,000 messages and latency at RATE, on a fresh queue;
    `shape` is a body and properties to send instead of the plain ones."""
    body, properties = shape or (BODY, pika.BasicProperties(delivery_mode=2))
    exchange = f"bench-limit-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange, queue_type)
    publisher = LimitPublisher(url, exchange, body, properties)
    cpu = time.process_time()
    elapsed = publisher.run(count, paced=False)
    cpu = time.process_time() - cpu
    _purge(url, exchange)
    time.sleep(1.0)
    with Drainer(url, exchange):
        publisher.run(int(RATE * seconds), paced=True)
    _cleanup(url, exchange, queue=exchange)
    return {
        "msgs_per_s": count / elapsed,
        "cpu_ms_per_1000": cpu / count * 1e6,
        **percentiles(publisher.latencies_ms),
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


def broker_cpu_s(url: str) -> float | None:
    """CPU seconds the broker process listening on the URL's port has used, if it is local."""
    port = urlsplit(url).port or 5672
    listing = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, check=False).stdout  # fmt: skip
    match = re.search(r"pid=(\d+)", listing)
    if match is None:
        return None
    fields = Path(f"/proc/{match.group(1)}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shape_steps() -> list[tuple[str, bytes, pika.BasicProperties]]:
    """virtpub's message built up a piece at a time: the plain body, virtpub's body, then
    each AMQP property and each header added in turn, so the step after one names what
    that one piece costs; the last step is virtpub's whole shape."""
    body, full = virtpub_shape()
    steps = [
        ("300-byte body", BODY, pika.BasicProperties(delivery_mode=2)),
        (f"virtpub's {len(body)}-byte body", body, pika.BasicProperties(delivery_mode=2)),
    ]
    fields: dict[str, Any] = {"delivery_mode": 2}
    for name in ("message_id", "type", "timestamp", "app_id", "content_type"):
        fields[name] = getattr(full, name)
        steps.append((f"+ {name}", body, pika.BasicProperties(**fields)))
    headers: dict[str, Any] = {}
    for name, value in (full.headers or {}).items():
        headers[name] = value
        properties = pika.BasicProperties(**fields, headers=dict(headers))
        steps.append((f"+ header {name}", body, properties))
    return steps


def shape_costs(url: str, count: int) -> list[dict[str, Any]]:
    """The limit sending each of `shape_steps`; per step, the limit's and the broker's CPU
    per 1,000 messages and the throughput."""
    results = []
    for name, step_body, properties in shape_steps():
        exchange = f"bench-shape-{uuid.uuid4().hex[:8]}"
        _bind_queue(url, exchange, "classic")
        publisher = LimitPublisher(url, exchange, step_body, properties)
        cpu, broker = time.process_time(), broker_cpu_s(url)
        elapsed = publisher.run(count, paced=False)
        cpu, after = time.process_time() - cpu, broker_cpu_s(url)
        _cleanup(url, exchange, queue=exchange)
        results.append({
            "step": name,
            "msgs_per_s": count / elapsed,
            "cpu_ms_per_1000": cpu / count * 1e6,
            "broker_cpu_ms_per_1000": None if broker is None or after is None
            else (after - broker) / count * 1e6,
        })  # fmt: skip
    return results


class StageClock:
    """Where a message's latency goes, per sequence: virtpub's own calls wrapped, in this
    bench only, for the latency phase (each wrap costs a dict store per message)."""

    def __init__(self) -> None:
        self.submitted: dict[int, float] = {}
        self.written: dict[int, float] = {}
        self.commits_ms: list[float] = []
        self.fsyncs_ms: list[float] = []
        """The spool's sync thread: each fsync that commits what was written before it."""
        self.early = 0
        """Messages handed to the broker before their commit began."""

    def install(self, daemon: Any) -> None:
        broker, spool = daemon.broker, daemon._spool  # the bench looks inside
        submit, append, write = broker.submit, spool.append, broker_module.frames.write_publishes
        sync = spool._sync_now

        def timed_submit(messages: Any) -> None:
            batch = list(messages)
            now = time.perf_counter()
            self.submitted.update((m.sequence, now) for m in batch)
            submit(batch)

        def timed_append(messages: Any, *args: Any, **kwargs: Any) -> None:
            self.early += sum(m.sequence in self.submitted for m in messages)
            begun = time.perf_counter()
            append(messages, *args, **kwargs)
            self.commits_ms.append((time.perf_counter() - begun) * 1000)

        def timed_write(connection: Any, channel: int, exchange: str, batch: Any) -> None:
            now = time.perf_counter()
            self.written.update((m.sequence, now) for m in batch)
            write(connection, channel, exchange, batch)

        def timed_sync() -> bool:
            begun = time.perf_counter()
            synced = sync()
            self.fsyncs_ms.append((time.perf_counter() - begun) * 1000)
            return bool(synced)

        broker.submit, spool.append, spool._sync_now = timed_submit, timed_append, timed_sync
        broker_module.frames.write_publishes = timed_write  # type: ignore[assignment]

    def stages(
        self, handoffs: dict[int, float], acks: dict[int, float]
    ) -> dict[str, dict[str, float]]:
        """p50 and p99 of each stage: hand-off to submit (the daemon thread: queue, model,
        envelope), submit to socket (the I/O thread's wake-up), socket to ack (the broker);
        beside them, off that path, the spool's write (`commit`) and its fsync."""
        spans: dict[str, list[float]] = {"daemon": [], "io_wakeup": [], "broker": []}
        for sequence, handed in handoffs.items():
            submitted, written = self.submitted[sequence], self.written[sequence]
            spans["daemon"].append((submitted - handed) * 1000)
            spans["io_wakeup"].append((written - submitted) * 1000)
            spans["broker"].append((acks[sequence] - written) * 1000)
        result = {name: percentiles(values) for name, values in spans.items()}
        result["commit"] = percentiles(self.commits_ms)
        result["fsync"] = percentiles(self.fsyncs_ms)
        return result


def synthetic_daemon(
    url: str, exchange: str, state_dir: str, on_confirmed: Any
) -> tuple[Daemon, SyntheticDriver, threading.Thread, threading.Event]:
    """A daemon with the synthetic driver (100 domains) in this process, not yet started:
    its run thread is a daemon thread, so a bench that fails still ends the process."""
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
    return daemon, driver, threading.Thread(target=daemon.run, args=(stop,), daemon=True), stop


def virtpub(url: str, count: int, latency_seconds: float, queue_type: str) -> dict[str, Any]:
    """The whole path, in this process: a daemon with the synthetic driver."""
    exchange = f"bench-virtpub-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange, queue_type)
    confirmed: list[tuple[int, float]] = []
    lock = threading.Lock()

    def on_confirmed(messages: list[OutgoingMessage]) -> None:
        now = time.perf_counter()
        with lock:
            confirmed.extend((m.sequence, now) for m in messages)

    with tempfile.TemporaryDirectory() as state_dir:
        daemon, driver, runner, stop = synthetic_daemon(url, exchange, state_dir, on_confirmed)
        runner.start()
        daemon.started.wait(30)
        # The startup messages (capabilities, snapshot; handed over in one batch) confirmed.
        _wait_for(lambda: daemon.broker.confirmed > 0 and daemon.broker.unconfirmed() == 0)
        with lock:
            base, startup = max(s for s, _ in confirmed), len(confirmed)

        # Throughput: hand everything off at once, as an evacuation would.
        cpu = time.process_time()
        started = time.perf_counter()
        for _ in range(count):
            driver.emit_one()
        _wait_for(lambda: len(confirmed) >= startup + count)
        throughput = count / (time.perf_counter() - started)
        cpu = time.process_time() - cpu
        _purge(url, exchange)
        time.sleep(2.0)  # let the spool's janitor and the broker's disk catch up

        # Latency at a fixed rate: hand-off to ack, per message, the queue being consumed.
        clock = StageClock()
        clock.install(daemon)
        handoffs: dict[int, float] = {}
        first = base + count + 1
        with Drainer(url, exchange):
            begun = time.perf_counter()
            for n in range(int(RATE * latency_seconds)):
                delay = begun + n / RATE - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                handoffs[first + n] = time.perf_counter()
                driver.emit_one()
            _wait_for(lambda: len(confirmed) >= startup + count + len(handoffs))
        stop.set()
        runner.join(30)
    _cleanup(url, exchange, queue=exchange)
    acks = dict(confirmed)
    latencies = [(acks[sequence] - handed) * 1000 for sequence, handed in handoffs.items()]
    return {
        "msgs_per_s": throughput,
        "cpu_ms_per_1000": cpu / count * 1e6,
        **percentiles(latencies),
        "latencies_ms": latencies,
        "stages": clock.stages(handoffs, acks),
        "early_share": clock.early / len(handoffs),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _wait_for(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the broker did not confirm in time")
        time.sleep(0.005)


def _bind_queue(url: str, exchange: str, queue_type: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(exchange, durable=True, arguments={"x-queue-type": queue_type})
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


def _child(part: str, url: str, count: int, seconds: float, queue_type: str) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--part", part, "--amqp-url", url,
         "--messages", str(count), "--latency-seconds", str(seconds),
         "--queue-type", queue_type],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(json.loads(output.strip().splitlines()[-1]))


def _plot(latencies: list[float], path: Path, p50: float, p99: float) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - only the plot needs it (pip install '.[bench]')

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - as above
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


def report(queue_type: str, ref: dict[str, Any], ours: dict[str, Any]) -> dict[str, float]:
    """Prints one queue type's figures; returns its ratios."""
    plain, shaped = ref["plain"], ref["shaped"]
    ratios = {
        "shape_ratio": ours["msgs_per_s"] / shaped["msgs_per_s"],
        "p99_ratio": ours["p99_ms"] / plain["p99_ms"],
        "cpu_ratio": ours["cpu_ms_per_1000"] / plain["cpu_ms_per_1000"],
    }
    print(f"{queue_type} queue:")
    print("                    msg/s   CPU ms/1000 msgs   p50 ms   p99 ms  (at 1,000/s)")
    for name, figures in (("limit", plain), ("limit, our shape", shaped), ("virtpub", ours)):
        print(f"  {name:<17}{figures['msgs_per_s']:>7,.0f}   {figures['cpu_ms_per_1000']:>16.0f}"
              f"   {figures['p50_ms']:>6.2f}   {figures['p99_ms']:>6.2f}")  # fmt: skip
    stages = ours["stages"]
    print("  virtpub's stages, p50/p99 ms: "
          + ", ".join(f"{name} {v['p50_ms']:.2f}/{v['p99_ms']:.2f}" for name, v in stages.items())
          + f"; {ours['early_share']:.0%} sent before their commit")  # fmt: skip
    print(f"  shape_ratio {ratios['shape_ratio']:.2f} (>= 0.95), p99_ratio"
          f" {ratios['p99_ratio']:.2f} (<= 1.5), p50 +{ours['p50_ms'] - plain['p50_ms']:.2f} ms"
          f" (<= 0.5), cpu_ratio {ratios['cpu_ratio']:.2f} (<= 2.0),"
          f" peak RSS {ours['rss_mb']:.1f} MB (< 80)")  # fmt: skip
    return ratios


def print_shape_costs(costs: list[dict[str, Any]]) -> None:
    print("virtpub's message shape, a piece at a time (the limit, classic queue):")
    print("                                                        msg/s   limit CPU   broker CPU"
          "  (ms/1000 msgs)")  # fmt: skip
    for step in costs:
        broker = step["broker_cpu_ms_per_1000"]
        print(f"  {step['step']:<52}{step['msgs_per_s']:>7,.0f}   {step['cpu_ms_per_1000']:>9.0f}"
              f"   {'n/a' if broker is None else f'{broker:.0f}':>10}")  # fmt: skip
    print("  headers host_id, entity, event and detail repeat the routing key's segments;")
    print("  schema and schema_version repeat dataschema, type and message_id the body's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--plot", type=Path, help="write the latency histogram as PNG here")
    parser.add_argument("--part", choices=["limit", "virtpub"], help=argparse.SUPPRESS)
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    url, count, seconds = args.amqp_url, args.messages, args.latency_seconds
    if args.part == "limit":
        print(json.dumps({
            "plain": limit(url, count, seconds, args.queue_type),
            "shaped": limit(url, count, seconds, args.queue_type, shape=virtpub_shape()),
            "shape_costs": shape_costs(url, count // 2) if args.queue_type == "classic" else [],
        }))  # fmt: skip
        return
    if args.part == "virtpub":
        print(json.dumps(virtpub(url, count, seconds, args.queue_type)))
        return
    results = {}
    for queue_type in QUEUE_TYPES:
        ref = _child("limit", url, count, seconds, queue_type)
        ours = _child("virtpub", url, count, seconds, queue_type)
        results[queue_type] = (ref, ours, report(queue_type, ref, ours))
    ref, ours, ratios = results["classic"]
    print_shape_costs(ref["shape_costs"])
    if args.plot:
        _plot(ours["latencies_ms"], args.plot, ours["p50_ms"], ours["p99_ms"])
    print(
        f"shape_ratio={ratios['shape_ratio']:.2f} p99_ratio={ratios['p99_ratio']:.2f}"
        f" cpu_ratio={ratios['cpu_ratio']:.2f} virtpub={ours['msgs_per_s']:.0f}"
        f" limit={ref['plain']['msgs_per_s']:.0f} p99_ms={ours['p99_ms']:.2f}"
        f" rss_mb={ours['rss_mb']:.1f}"
    )


if __name__ == "__main__":
    main()
