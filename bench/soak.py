"""Memory over a million events: does anything grow with the number of messages?

    python bench/soak.py [--amqp-url URL] [--events 1000000] [--rate 0]

A daemon with the synthetic driver (100 domains) runs in this process and publishes
`--events` events through the whole path (hand-off, model, envelope, spool, publish,
confirm) to a durable queue that a consumer in a process of its own empties. The driver
paces itself so at most 20,000 events wait unconfirmed: a soak measures what stays, not
the size of a backlog. Every 100,000 confirmed events it prints the RSS (VmRSS) and the
spool file's size.

It ends with one line: events=<n> rss_mb_at_100k=<mb> rss_mb_last=<mb> rss_mb_max=<mb>
growth=<max / at 100k>. Target: growth <= 1.10 (flat within 10%).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from publish import (  # bench/ is the script's path
    AMQP_URL,
    Drainer,
    _bind_queue,
    _cleanup,
    synthetic_daemon,
)

from virtpub.contract.envelope import OutgoingMessage

STEP = 100_000
BACKLOG = 20_000


def rss_mb() -> float:
    """The resident set now (not the peak: a soak asks whether memory comes back)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(url: str, events: int, rate: float) -> list[tuple[int, float, float]]:
    """(confirmed events, RSS MB, spool MB) at every STEP."""
    exchange = f"bench-soak-{uuid.uuid4().hex[:8]}"
    _bind_queue(url, exchange, "classic")
    confirmed = [0]

    def on_confirmed(messages: list[OutgoingMessage]) -> None:
        confirmed[0] += len(messages)

    readings: list[tuple[int, float, float]] = []
    with tempfile.TemporaryDirectory() as state_dir:
        daemon, driver, runner, stop = synthetic_daemon(url, exchange, state_dir, on_confirmed)
        spool_file = Path(state_dir) / "spool.sqlite3"
        with Drainer(url, exchange):
            runner.start()
            daemon.started.wait(30)
            startup = daemon.broker.confirmed
            begun = time.perf_counter()
            next_reading = STEP
            for n in range(events):
                while n - (confirmed[0] - startup) > BACKLOG:
                    time.sleep(0.001)
                if rate:
                    delay = begun + n / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                driver.emit_one()
                done = confirmed[0] - startup
                if done >= next_reading:
                    readings.append((next_reading, rss_mb(), _size_mb(spool_file)))
                    print(f"{next_reading:>9,} confirmed  RSS {readings[-1][1]:6.1f} MB"
                          f"  spool {readings[-1][2]:6.1f} MB", flush=True)  # fmt: skip
                    next_reading += STEP
            while confirmed[0] - startup < events:
                time.sleep(0.01)
            if next_reading <= events:
                readings.append((events, rss_mb(), _size_mb(spool_file)))
                print(f"{events:>9,} confirmed  RSS {readings[-1][1]:6.1f} MB"
                      f"  spool {readings[-1][2]:6.1f} MB")  # fmt: skip
            seconds = time.perf_counter() - begun
            stop.set()
            runner.join(30)
    _cleanup(url, exchange, queue=exchange)
    print(f"{events:,} events in {seconds:.1f} s ({events / seconds:,.0f}/s)")
    return readings


def _size_mb(path: Path) -> float:
    """The spool's database and its WAL."""
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", default=AMQP_URL)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0: as fast as it goes")
    args = parser.parse_args()
    readings = soak(args.amqp_url, args.events, args.rate)
    first = readings[0][1]
    peak = max(r for _, r, _ in readings)
    print(
        f"events={args.events} rss_mb_at_100k={first:.1f} rss_mb_last={readings[-1][1]:.1f}"
        f" rss_mb_max={peak:.1f} growth={peak / first:.2f}"
    )


if __name__ == "__main__":
    main()
