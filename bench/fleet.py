"""A fleet on one broker: many virtpub processes publishing at once, as a cluster of hosts would.

    python bench/fleet.py [--hosts 50] [--rate 100] [--events 1000] [--plot fleet.png]

Each host is a real `virtpub run` process with the synthetic backend (its own
state directory and host id), all publishing to one exchange on one broker.
One consumer reads everything from a queue bound to `#` and times each message
from its CloudEvents `time` (when virtpub received the signal) to its arrival.
It prints the aggregate throughput, per-host p99 latency (median and worst
host) and the queue's depth over time, and ends with one line:
`hosts=<n> messages=<n> msgs_per_s=<r> p99_ms_median=<ms> p99_ms_worst=<ms> max_depth=<n>`.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pika

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
DOMAINS = 20


class Reader(threading.Thread):
    """Consumes the fleet's queue; per host, the latency of every message."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(name="fleet-reader", daemon=True)
        self.url, self.queue = url, queue
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.received = 0
        self.events = 0
        """Messages of the synthetic backend's own events (not startup snapshots)."""
        self.stop = threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2000)
        for method, _props, body in channel.consume(self.queue, inactivity_timeout=0.2):
            if self.stop.is_set():
                break
            if method is None:
                continue
            now = time.time()
            message = json.loads(body)
            sent = datetime.fromisoformat(message["time"].replace("Z", "+00:00")).timestamp()
            self.latencies[method.routing_key.split(".")[1]].append((now - sent) * 1000)
            self.received += 1
            self.events += message["data"].get("origin") == "libvirt"
            channel.basic_ack(method.delivery_tag)
        connection.close()


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    exchange = f"bench-fleet-{uuid.uuid4().hex[:8]}"
    admin = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = admin.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(exchange, durable=True)
    channel.queue_bind(exchange, exchange, "#")
    reader = Reader(args.amqp_url, exchange)
    reader.start()
    uri = f"synthetic:///?domains={DOMAINS}&rate={args.rate}&count={args.events}"
    processes: list[subprocess.Popen[bytes]] = []
    depths: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory() as state:
        started = time.monotonic()
        for n in range(args.hosts):
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "publisher",
                        "run",
                        "--libvirt-uri",
                        uri,
                        "--amqp-url",
                        args.amqp_url,
                        "--exchange",
                        exchange,
                        "--host-id",
                        f"fleet-{n:03d}",
                        "--state-dir",
                        f"{state}/{n}",
                        "--log-level",
                        "warning",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        expected = args.hosts * args.events
        deadline = time.monotonic() + args.timeout
        while reader.events < expected and time.monotonic() < deadline:
            depths.append((time.monotonic() - started, depth(channel, exchange)))
            admin.sleep(0.5)
        elapsed = time.monotonic() - started
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
    reader.stop.set()
    reader.join(10)
    channel.queue_delete(exchange)
    channel.queue_delete(f"{exchange}.unroutable")
    channel.exchange_delete(exchange)
    channel.exchange_delete(f"{exchange}.unroutable")
    admin.close()
    per_host = {host: percentile(values, 0.99) for host, values in reader.latencies.items()}
    return {
        "hosts": len(per_host),
        "messages": reader.received,
        "events": reader.events,
        "expected": expected,
        "msgs_per_s": reader.received / elapsed,
        "p99_ms_median": percentile(list(per_host.values()), 0.5) if per_host else 0.0,
        "p99_ms_worst": max(per_host.values(), default=0.0),
        "per_host_p99_ms": per_host,
        "depths": depths,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415 - only the plot needs it (pip install '.[bench]')

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - as above
    except ImportError:
        print("no plot: install the bench extra (pip install '.[bench]') for matplotlib")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    times, depths = zip(*result["depths"], strict=True) if result["depths"] else ((), ())
    top.plot(times, depths, color="#3b6ea8")
    top.set_xlabel("seconds since the first host started")
    top.set_ylabel("messages in the queue")
    top.set_title(f"{result['hosts']} virtpub hosts on one broker")
    hosts = sorted(result["per_host_p99_ms"])
    bottom.bar(range(len(hosts)), [result["per_host_p99_ms"][h] for h in hosts], color="#c0392b")
    bottom.set_xlabel("host")
    bottom.set_ylabel("p99 latency (ms), signal to consumer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0, help="events/s per host")
    parser.add_argument("--events", type=int, default=1000, help="events per host")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--plot", type=Path, help="write depth and per-host p99 as PNG here")
    args = parser.parse_args()
    result = run(args)
    print(f"hosts:      {result['hosts']} (of {args.hosts}), {args.rate:g} events/s each")
    print(f"messages:   {result['messages']:,}, of which {result['events']:,} of"
          f" {result['expected']:,} synthetic events")  # fmt: skip
    print(f"throughput: {result['msgs_per_s']:,.0f} msg/s, all hosts together")
    print(f"p99 latency per host: median {result['p99_ms_median']:.1f} ms,"
          f" worst {result['p99_ms_worst']:.1f} ms")  # fmt: skip
    print(f"queue depth: max {max((d for _, d in result['depths']), default=0):,}")
    if args.plot:
        plot(result, args.plot)
    print(
        f"hosts={result['hosts']} messages={result['messages']}"
        f" msgs_per_s={result['msgs_per_s']:.0f} p99_ms_median={result['p99_ms_median']:.1f}"
        f" p99_ms_worst={result['p99_ms_worst']:.1f}"
        f" max_depth={max((d for _, d in result['depths']), default=0)}"
    )


if __name__ == "__main__":
    main()
