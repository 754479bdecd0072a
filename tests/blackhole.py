"""A TCP proxy on loopback that can stop forwarding without closing anything.

A silent partition, as a dropped route or a dead switch makes it: both ends keep
their sockets open and hear nothing more. While partitioned, the proxy reads nothing
from either side, so what was sent waits in the kernel's buffers; `heal` forwards
again. Each connection is two threads, one per direction, polling at 50 ms.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

POLL_S = 0.05


class BlackHoleProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._partitioned = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._spawn(self._accept)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()

    def partition(self) -> None:
        self._partitioned.set()

    def heal(self) -> None:
        self._partitioned.clear()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _spawn(self, target: Callable[..., None], *args: socket.socket) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            readable, _, _ = select.select([self._listener], [], [], POLL_S)
            if not readable or self._closed.is_set():
                continue
            client, _ = self._listener.accept()
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._forward, client, server)
            self._spawn(self._forward, server, client)

    def _forward(self, source: socket.socket, sink: socket.socket) -> None:
        """Copies one direction until either side closes; reads nothing while partitioned."""
        while not self._closed.is_set():
            if self._partitioned.is_set():
                self._closed.wait(POLL_S)
                continue
            try:
                readable, _, _ = select.select([source], [], [], POLL_S)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
