"""Three private RabbitMQ nodes joined into one cluster, for failover tests.

Built from RabbitNode, so each node keeps its own name, ports, data and logs in a
temporary directory of its own and never touches the shared broker at 5672. The
only thing the nodes share is the Erlang cookie: Erlang distribution (node to node,
and rabbitmqctl to node) is refused between VMs whose cookies differ.

The cluster is formed the way an operator forms one: every node boots on its own,
then each other node's application is stopped (`stop_app`), the node reset, joined
to the first node (`join_cluster`) and its application started again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Self, TypeVar

from tests.rabbitnode import RabbitNode, RabbitNodeError, beam_pids

SIZE = 3
BOOT_ATTEMPTS = 3
RETRY_PAUSE_S = 0.5

T = TypeVar("T")


class ClusterNode(RabbitNode):
    """A RabbitNode with a cookie given to it, the same for every node of a cluster.

    Booted by RabbitCluster, not by `with`: RabbitNode's retrying `__enter__` makes
    itself anew without the cookie.
    """

    def __init__(self, cookie: str, *, start_timeout: float) -> None:
        self.cookie = cookie  # read by _prepare, which RabbitNode.__init__ calls
        super().__init__(start_timeout=start_timeout)

    def _prepare(self) -> None:
        super()._prepare()
        path = self.dir / "home" / ".erlang.cookie"
        path.chmod(0o600)
        path.write_text(self.cookie)
        path.chmod(0o400)  # Erlang refuses a cookie others can read

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the node gracefully by SIGTERM to its VM, which RabbitMQ handles as it
        does `rabbitmqctl stop`; a node that does not stop in time is killed and this fails.

        The CLI is an Erlang VM of its own: on a loaded machine it takes a second or
        more to boot before it asks the node to stop, and a test that stops a node
        during a burst of a few seconds needs it gone when it says so.
        """
        pids = beam_pids(self.name)
        if not pids:
            self._reap(timeout=5)  # what a failed start may have left
            return
        self._processes |= self._tree()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not self._reap(timeout=timeout):
            self._kill_everything()
            raise RabbitNodeError(
                f"{self.name} did not stop within {timeout} s of SIGTERM and was killed\n"
                f"{self.log_tail()}"
            )


class RabbitCluster:
    """Three nodes of one RabbitMQ cluster; `with RabbitCluster() as cluster:` forms it.

    Node 0 is the one the others joined, but after forming it is a member like any
    other: any node may be stopped and started again, and rejoins by itself (its data
    directory remembers the cluster). Leaving the `with` block, or `cleanup()`, ends
    every node's processes and removes their directories, even if forming failed.
    """

    def __init__(self, *, start_timeout: float = 90.0, join_timeout: float = 90.0) -> None:
        self.start_timeout = start_timeout
        self.join_timeout = join_timeout
        self.cookie = secrets.token_hex(16).upper()
        self.nodes: list[ClusterNode] = []

    def __repr__(self) -> str:
        return f"RabbitCluster({self.nodes!r})"

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Boots the three nodes side by side, then joins nodes 1 and 2 to node 0.

        The nodes boot in parallel (a boot is mostly waiting) but join one at a time:
        two nodes joining the same seed at once may race on its schema.
        """
        for _ in range(SIZE):
            self.nodes.append(self._new_node())
        with ThreadPoolExecutor(SIZE) as pool:
            for future in [pool.submit(self._boot, index) for index in range(SIZE)]:
                future.result()
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            self._join(node, seed)
        self.await_running(range(SIZE))

    def stop_node(self, index: int) -> None:
        """Stops one node's Erlang VM gracefully; its clients lose their connections."""
        self.nodes[index].stop()

    def start_node(self, index: int) -> None:
        """Starts a stopped node again; returns once the others see it running."""
        self.nodes[index].start()
        self.await_running([i for i, node in enumerate(self.nodes) if node.is_running()])

    def cleanup(self) -> None:
        """Ends every node, side by side; raises the first failure after trying them all."""
        if not self.nodes:
            return
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            futures = [pool.submit(node.cleanup) for node in self.nodes]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise RabbitNodeError(f"cluster cleanup failed: {errors}") from errors[0]

    # -- inspection ------------------------------------------------------------------

    def urls(self) -> list[str]:
        return [node.url() for node in self.nodes]

    def running_members(self) -> set[str]:
        """The nodes the cluster counts as running, by any node still up."""
        status = json.loads(self._ctl_any("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def await_running(self, indexes: Iterable[int]) -> None:
        """Waits until the cluster reports exactly these nodes as running."""
        wanted = {self.nodes[i].name for i in indexes}
        _retry(lambda: self._check_running(wanted), self.join_timeout, "cluster_status")

    def node_of_connection(self, connection_name: str, timeout: float = 30.0) -> int:
        """Which node holds the client connection named `connection_name` (the client's
        `connection_name` property), waiting for it to appear: a client may still be
        opening it. The connection's server port is the AMQP port of its node."""
        ports = {node.port: index for index, node in enumerate(self.nodes)}

        def find() -> int:
            command = ("list_connections", "port", "client_properties", "--formatter", "json")
            listed = json.loads(self._ctl_any(*command))
            for connection in listed:
                if _client_property(connection, "connection_name") == connection_name:
                    return ports[connection["port"]]
            raise RabbitNodeError(f"no connection named {connection_name!r}: {listed}")

        return _retry(find, timeout, f"connection {connection_name!r}")

    # -- internals -------------------------------------------------------------------

    def _new_node(self) -> ClusterNode:
        return ClusterNode(self.cookie, start_timeout=self.start_timeout)

    def _boot(self, index: int) -> None:
        """Boots node `index`; a first boot that fails is retried as a fresh node (other
        name and ports), as RabbitNode's own `with` does: a port taken between the check
        and the node's listen is the likely cause of such failures."""
        failures = []
        for attempt in range(BOOT_ATTEMPTS):
            if attempt:
                self.nodes[index] = self._new_node()
            node = self.nodes[index]
            try:
                node.start()
                return
            except RabbitNodeError as err:
                failures.append(str(err).splitlines()[0])
                node.cleanup()
        raise RabbitNodeError(f"{BOOT_ATTEMPTS} fresh nodes failed to boot: {failures}")

    def _join(self, node: ClusterNode, seed: ClusterNode) -> None:
        """Joins `node` to `seed`'s cluster, from the top again on a transient failure
        (a peer not yet reachable, a timed-out CLI call on a loaded machine)."""

        def join() -> None:
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", seed.name)
            node.ctl("start_app")

        _retry(join, self.join_timeout, f"{node.name} joining {seed.name}")

    def _check_running(self, wanted: set[str]) -> None:
        running = self.running_members()
        if running != wanted:
            raise RabbitNodeError(f"running {sorted(running)}, expected {sorted(wanted)}")

    def _ctl_any(self, *args: str) -> str:
        """rabbitmqctl's output from the first running node that answers."""
        failures = []
        for node in self.nodes:
            if not node.is_running():
                continue
            result = node.ctl(*args, check=False)
            if result.returncode == 0:
                return result.stdout
            failures.append(f"{node.name}: {result.stdout}{result.stderr}")
        raise RabbitNodeError(f"rabbitmqctl {' '.join(args)} failed on every node: {failures}")


def _client_property(connection: dict[str, Any], key: str) -> Any:
    """One client property of a connection as `--formatter json` lists it: the
    properties come as [name, AMQP type, value] triples."""
    for name, _type, value in connection["client_properties"]:
        if name == key:
            return value
    return None


def _retry(attempt: Callable[[], T], timeout: float, what: str) -> T:
    """`attempt()`'s result, trying again while it fails (the broker or the CLI said no,
    or the CLI timed out) until `timeout` is over."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return attempt()
        except (RabbitNodeError, subprocess.SubprocessError) as err:
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"{what}: gave up after {timeout} s: {err}") from err
        time.sleep(RETRY_PAUSE_S)
