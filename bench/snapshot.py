"""A snapshot of 10,000 domains: from the capabilities message to `snapshot.end`.

    python bench/snapshot.py [--amqp-url URL] [--domains 10000]

libvirt's test driver reads a node file of `--domains` running, persistent domains
(`test:///<file>`). In one run:

- bare: a process that only opens that connection and lists the domains with their
  states; its peak RSS is the baseline;
- first start: `virtpub run` with an empty state directory: the capabilities message,
  `added.discovered` for every domain, then the snapshot bracket;
- restart: the same state directory after a clean stop: the capabilities message and
  the snapshot alone;
- floor: a minimal pika publisher with pipelined confirms sending as many messages of
  the same mean size, in the same run.

Times run from the capabilities message's arrival at a consumer to `snapshot.end`'s
(virtpub publishes the capabilities message once the broker connection is ready, and
`snapshot.end` last). It ends with one line:
domains=<n> first_s=<s> first_ratio=<first / its floor> restart_s=<s>
restart_ratio=<restart / its floor> rss_above_bare_mb=<mb>.
Targets: both ratios <= 1.5, RSS above the bare connection < 80 MB.
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
from pathlib import Path
from typing import Any

import pika
from publish import AMQP_URL, LimitPublisher, _bind_queue, _cleanup  # bench/ is the script's path

NAMESPACE = uuid.UUID("1b0c5e0a-9d6f-4a43-9e53-3f8f0b5c2a10")


def node_file(path: Path, domains: int) -> Path:
    """A test-driver node file: `domains` running domains, each persistent."""
    parts = ["<node>"]
    for n in range(domains):
        parts.append(
            f"<domain type='test'><name>bench-{n:05d}</name>"
            f"<uuid>{uuid.uuid5(NAMESPACE, str(n))}</uuid><memory>65536</memory>"
            "<os><type>hvm</type></os></domain>"
        )
    parts.append("</node>")
    path.write_text("\n".join(parts))
    return path


def bare(uri: str) -> dict[str, float]:
    """A child process: open, list with states; its peak RSS and the listing's time."""
    code = (
        "import json, resource, time, libvirt\n"
        f"c = libvirt.open({uri!r}); t = time.perf_counter()\n"
        "n = len([d.state() for d in c.listAllDomains()])\n"
        "print(json.dumps({'domains': n, 'list_s': time.perf_counter() - t,"
        " 'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    return dict(json.loads(output))


class Arrivals(threading.Thread):
    """Reads the exchange's queue and notes when the capabilities message and snapshot.end
    arrive, how many messages came between them and their mean body size."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(name="arrivals", daemon=True)
        self.url, self.queue = url, queue
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.capabilities_at = 0.0
        self.ended_at = 0.0
        self.messages = 0
        self.body_bytes = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = connection.channel()
        channel.basic_qos(prefetch_count=2000)
        self.ready.set()
        for method, _props, body in channel.consume(self.queue, inactivity_timeout=0.2):
            if self._stopping.is_set():
                break
            if method is None:
                continue
            channel.basic_ack(method.delivery_tag)
            self.note(method.routing_key, body)
        connection.close()

    def note(self, routing_key: str, body: bytes) -> None:
        if ".publisher.capabilities" in routing_key:
            self.capabilities_at, self.messages, self.body_bytes = time.perf_counter(), 0, 0
        self.messages += 1
        self.body_bytes += len(body)
        if ".publisher.snapshot.end" in routing_key:
            self.ended_at = time.perf_counter()
            self.ended.set()

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


def start(url: str, uri: str, exchange: str, state_dir: Path) -> dict[str, Any]:
    """One `virtpub run` until its snapshot.end arrived: time, messages, peak RSS."""
    arrivals = Arrivals(url, exchange)
    arrivals.start()
    arrivals.ready.wait(30)
    process = subprocess.Popen(
        [sys.executable, "-m", "virtpub", "run", "--libvirt-uri", uri, "--amqp-url", url,
         "--exchange", exchange, "--state-dir", str(state_dir), "--host-id", "bench",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if not arrivals.ended.wait(600):
            raise TimeoutError("snapshot.end never arrived")
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        arrivals.stop()
    if process.returncode != 0:
        raise SystemExit(f"virtpub exited {process.returncode}: {stderr.strip()[-500:]}")
    return {
        "seconds": arrivals.ended_at - arrivals.capabilities_at,
        "messages": arrivals.messages,
        "mean_body": arrivals.body_bytes / arrivals.messages,
        "rss_mb": int(peak.split()[1]) / 1024,
    }


def floor(url: str, messages: int, body_bytes: int) -> float:
    """Seconds a minimal pipelined-confirm publisher takes for as many messages that size."""
    exchange = f"bench-floor-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange, "classic")
    body = json.dumps({"pad": "x" * max(body_bytes - 11, 0)}).encode()
    seconds = LimitPublisher(url, exchange, body, pika.BasicProperties(delivery_mode=2)).run(
        messages, paced=False
    )
    _cleanup(url, exchange, queue=exchange)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--domains", type=int, default=10_000)
    args = parser.parse_args()
    url = args.amqp_url
    with tempfile.TemporaryDirectory() as work:
        uri = f"test://{node_file(Path(work) / 'node.xml', args.domains)}"
        baseline = bare(uri)
        print(f"bare libvirt: {baseline['domains']:,} domains listed with states in"
              f" {baseline['list_s']:.2f} s, peak RSS {baseline['rss_mb']:.0f} MB")  # fmt: skip
        exchange = f"bench-snapshot-{uuid.uuid4().hex[:8]}"
        _bind_queue(url, exchange, "classic")
        state = Path(work) / "state"
        runs = {"first start": start(url, uri, exchange, state)}
        runs["restart"] = start(url, uri, exchange, state)
        _cleanup(url, exchange, queue=exchange)
    print("                messages   time s   floor s   ratio   RSS above bare MB")
    ratios = {}
    for name, run in runs.items():
        reference = floor(url, run["messages"], round(run["mean_body"]))
        ratios[name] = run["seconds"] / reference
        print(f"  {name:<13}{run['messages']:>9,}   {run['seconds']:>6.2f}   {reference:>7.2f}"
              f"   {ratios[name]:>5.2f}   {run['rss_mb'] - baseline['rss_mb']:>17.0f}")  # fmt: skip
    above = max(run["rss_mb"] for run in runs.values()) - baseline["rss_mb"]
    print(
        f"domains={args.domains} first_s={runs['first start']['seconds']:.2f}"
        f" first_ratio={ratios['first start']:.2f} restart_s={runs['restart']['seconds']:.2f}"
        f" restart_ratio={ratios['restart']:.2f} rss_above_bare_mb={above:.0f}"
    )


if __name__ == "__main__":
    main()
