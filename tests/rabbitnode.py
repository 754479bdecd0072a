"""A private, throwaway RabbitMQ node for destructive broker tests.

Restarting, killing or starving the shared broker at 127.0.0.1:5672 would disturb
whatever else runs against it (a CI run may), so tests that need to do that get a
node of their own: its own name, ports, Erlang cookie, data, logs and config, all in
one temporary directory that `cleanup()` removes together with every process.

The node runs as the `rabbitmq` user, as the packaged service does, but started
straight from /usr/lib/rabbitmq/bin: the Debian wrappers in /usr/sbin `su` to that
user with HOME=/var/lib/rabbitmq, i.e. with the shared node's cookie.
Nothing of /etc/rabbitmq is read: the shared rabbitmq-env.conf sets NODENAME and
the shared rabbitmq.conf would make the node bind 5672.

`VIRTPUB_TEST_BROKER=debian13` (or `RabbitNode(broker="debian13")`) runs Debian 13's
RabbitMQ 4.0 instead, from the cached trixie rootfs (tests/containers.py, `in_rootfs`),
with the same directory layout bound at the same path, every deprecated feature denied,
and an epmd of its own on its own port: the host's epmd and node stay untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests import containers

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_USER = "rabbitmq"
# The beam's command line does not name the node (RabbitMQ names it at boot), so an
# otherwise unused Erlang flag carries the name, to find exactly this node's process.
NODE_MARKER = "-virtpub_test_node"
# The distribution port is the AMQP port + 20000 and rabbitmqctl takes one of
# AMQP port + 30000..30010, so AMQP ports are drawn low enough for all to be valid.
PORT_RANGE = (10000, 25000)
DIST_OFFSET = 20000
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
TLS_USER = "virtpub"
BROKER_ENV = "VIRTPUB_TEST_BROKER"
BROKERS = ("host", "debian13")
# Every deprecated feature RabbitMQ 4.0 knows (`rabbitmqctl list_deprecated_features` on
# Debian 13's 4.0.5; tests/test_rabbitnode.py checks the list is whole), denied, as 4.3
# and later deny most of them by default: what virtpub does must work without any.
DEPRECATED_FEATURES_4_0 = (
    "amqp_address_v1",
    "classic_queue_mirroring",
    "global_qos",
    "management_metrics_collection",  # listed only with the management plugin enabled
    "queue_master_locator",
    "ram_node_type",
    "transient_nonexcl_queues",
)


BOOT_DENIAL_FAILURE = "failed_to_deny_deprecated_features"
# How the node logs a client's use of a deprecated feature, whether it refused it or not.
DEPRECATED_USE = re.compile(r"Deprecated features: `(\w+)`")


def selected_broker() -> str:
    """The broker the tests run against: `VIRTPUB_TEST_BROKER`, `host` unless set."""
    broker = os.environ.get(BROKER_ENV, "host")
    if broker not in BROKERS:
        raise RabbitNodeError(f"{BROKER_ENV}={broker!r}: expected one of {', '.join(BROKERS)}")
    return broker


class RabbitNodeError(RuntimeError):
    pass


def beam_pids(node_name: str) -> list[int]:
    """The pids of the Erlang VMs running `node_name` (found by the marker flag)."""
    wanted = [NODE_MARKER.encode(), node_name.encode()]
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if not argv[0].endswith(b"beam.smp"):
            continue
        if any(argv[i : i + 2] == wanted for i in range(len(argv) - 1)):
            pids.append(int(entry.name))
    return pids


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time): the start time tells a reused pid apart."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    table = _process_table()
    return {(pid, start) for pid, start in processes if table.get(pid, (0, -1))[1] == start}


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # the wildcard address clashes with any listener on it
        except OSError:
            return False
    return True


def pick_port(*, with_dist_port: bool = False, avoid: tuple[int, ...] = ()) -> int:
    """A port free now (and its distribution port, if asked), drawn from PORT_RANGE.

    Binding port 0 would give an ephemeral port (32768 and up here), whose + 20000
    is past 65535, so the port is drawn at random and checked instead.
    """
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        candidates = (port, port + DIST_OFFSET) if with_dist_port else (port,)
        if any(p in avoid for p in candidates):
            continue
        if all(_port_is_free(p) for p in candidates):
            return port
    raise RabbitNodeError(f"no free port in {PORT_RANGE}")


def _amqp_answers(port: int) -> bool:
    """Whether a broker listens on `port` and opens the AMQP handshake (Connection.Start)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(AMQP_HEADER)
            frame = b""
            while len(frame) < 11:
                chunk = sock.recv(11 - len(frame))
                if not chunk:
                    return False
                frame += chunk
    except OSError:
        return False
    # A method frame on channel 0 whose method is connection (10) . start (10).
    return frame[0] == 1 and frame[7:11] == b"\x00\x0a\x00\x0a"


OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class RabbitNode:
    """A RabbitMQ node of its own on free ports, for tests that stop, kill or starve it.

    `RabbitNode()` only prepares the directory; `start()` (or `with RabbitNode() as
    node:`) boots it. The data directory survives `stop()`, `kill()` and `restart()`,
    so durable queues and persistent messages do too; `cleanup()` ends everything.
    With `tls=True` the node also listens for amqps on `tls_port`, with a CA, server
    and client certificate made by openssl, and accepts SASL EXTERNAL logins named by
    the client certificate's CN (`virtpub`, a user created at start).
    """

    def __init__(
        self,
        *,
        tls: bool = False,
        start_timeout: float = 60.0,
        broker: str | None = None,
        refuse_deprecated_uses: bool = True,
    ) -> None:
        self.tls = tls
        self.start_timeout = start_timeout
        self.broker = broker or selected_broker()
        self.refuse_deprecated_uses = refuse_deprecated_uses
        self.name = f"virtpub-test-{secrets.token_hex(4)}@localhost"
        self.port = pick_port(with_dist_port=True)
        self.dist_port = self.port + DIST_OFFSET
        self.tls_port = pick_port(avoid=(self.port, self.dist_port)) if tls else None
        self.epmd_port: int | None = None
        self._rootfs: Path | None = None
        if self.broker == "debian13":
            self._rootfs = containers.rootfs(containers.DEBIAN13, containers.DEBIAN13_PACKAGES)
            taken = (self.port, self.dist_port, *([self.tls_port] if self.tls_port else []))
            self.epmd_port = pick_port(avoid=taken)
        self.dir = Path(tempfile.mkdtemp(prefix="virtpub-rabbitnode-"))
        self.log_file = self.dir / "log" / f"{self.name}.log"
        self.stdout_file = self.dir / "log" / "stdout.log"
        tls_dir = self.dir / "tls"
        self.ca_file = tls_dir / "ca.pem"
        self.server_cert = tls_dir / "server.pem"
        self.server_key = tls_dir / "server.key"
        self.client_cert = tls_dir / "client.pem"
        self.client_key = tls_dir / "client.key"
        self.last_start_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._processes: set[tuple[int, int]] = set()
        self._cleaned = False
        self._as_rabbitmq: dict[str, Any] = (
            {"user": RABBITMQ_USER, "group": RABBITMQ_USER, "extra_groups": []}
            if os.geteuid() == 0 and self._rootfs is None
            else {}
        )
        atexit.register(self.cleanup)  # a node must not outlive an aborted test run
        try:
            self._prepare()
        except BaseException:
            self.cleanup()
            raise

    def __repr__(self) -> str:
        return f"RabbitNode({self.name!r}, port={self.port}, tls_port={self.tls_port})"

    def __enter__(self) -> Self:
        """Starts the node; a first boot that fails is tried again as a fresh node.

        Seen in CI: a first boot that dies in RabbitMQ's prelaunch, before its log
        is open, leaving nothing to say why (a port taken between our check and the
        node's listen is the likely cause). Other names and ports then boot fine.
        """
        failures = []
        for _ in range(3):
            try:
                self.start()
                return self
            except RabbitNodeError as err:
                failures.append(str(err).splitlines()[0])
                self.cleanup()
                self.__init__(  # type: ignore[misc]
                    tls=self.tls,
                    start_timeout=self.start_timeout,
                    broker=self.broker,
                    refuse_deprecated_uses=self.refuse_deprecated_uses,
                )
        raise RabbitNodeError("three fresh nodes failed to boot: " + "; ".join(failures))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Boots the node; returns once AMQP answers and `await_startup` agrees.

        Fails (after killing what was started) with the log's tail if that takes
        longer than `start_timeout`.

        Seen once with Debian 13's RabbitMQ 4.0.5, in a fault test's restart on a loaded
        machine: the boot's check whether transient non-exclusive queues exist crashed
        (an erpc error in the log), and the node refused to boot with
        `failed_to_deny_deprecated_features`. No such queue can exist (the node refuses
        to declare one), so that boot is tried once more, with a warning.
        """
        try:
            self._boot()
        except RabbitNodeError as err:
            if BOOT_DENIAL_FAILURE not in str(err):
                raise
            warnings.warn(
                f"{self.name}: {BOOT_DENIAL_FAILURE} at boot; booting again", stacklevel=2
            )
            self._boot()

    def _boot(self) -> None:
        if self._cleaned:
            raise RabbitNodeError(f"{self.name} was cleaned up")
        if beam_pids(self.name):
            raise RabbitNodeError(f"{self.name} is already running")
        if self.tls and not self.client_key.exists():
            self._make_certificates()
        began = time.monotonic()
        deadline = began + self.start_timeout
        with self.stdout_file.open("ab") as stdout:
            self._process = subprocess.Popen(
                self._command("rabbitmq-server"),
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
                **self._as_rabbitmq,
            )
        try:
            while not _amqp_answers(self.port):
                if self._process.poll() is not None:
                    self._fail(f"exited with {self._process.returncode} while starting")
                if time.monotonic() > deadline:
                    self._fail(f"AMQP did not answer within {self.start_timeout} s")
                time.sleep(0.1)
            remaining = max(deadline - time.monotonic(), 1.0)
            result = self.ctl(
                "--timeout", str(int(remaining)), "await_startup", timeout=remaining, check=False
            )
            if result.returncode != 0:
                self._fail(f"await_startup failed: {result.stdout}{result.stderr}")
            self._processes |= self._tree()
            if self.tls:
                self.add_user(TLS_USER, secrets.token_hex(16), ".*", ".*", ".*")
        except BaseException:
            self._kill_everything()
            raise
        self.last_start_seconds = time.monotonic() - began

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the node gracefully (`rabbitmqctl stop`), waiting until its processes
        are gone; a node that does not stop in time is killed and this fails."""
        if not beam_pids(self.name):
            self._reap(timeout=5)
            return
        deadline = time.monotonic() + timeout
        self._processes |= self._tree()
        try:
            result = self.ctl("stop", timeout=timeout, check=False)
            said = f"{result.stdout}{result.stderr}"
        except subprocess.TimeoutExpired:
            said = "timed out"
        if not self._reap(timeout=max(deadline - time.monotonic(), 0.1)):
            self._kill_everything()
            raise RabbitNodeError(
                f"{self.name} did not stop within {timeout} s and was killed "
                f"(rabbitmqctl stop: {said})\n{self.log_tail()}"
            )

    def kill(self) -> None:
        """SIGKILLs this node's Erlang VM, as a crash would; its helpers go with it."""
        self._processes |= self._tree()
        for pid in beam_pids(self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._reap(timeout=15):
            self._kill_everything()

    def restart(self) -> None:
        """Stops and starts the node on the same ports and data directory."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stops the node (killing it if it will not stop) and removes its directory.

        Idempotent; also runs at interpreter exit for a node a test forgot. A Debian 13
        node whose log shows a deprecated feature used fails here, after cleaning up,
        unless made with `refuse_deprecated_uses=False`.
        """
        if self._cleaned:
            return
        self._cleaned = True
        atexit.unregister(self.cleanup)
        used: list[str] = []
        try:
            try:
                self.stop(timeout=30)
            except (RabbitNodeError, subprocess.SubprocessError):
                self._kill_everything()
            left = beam_pids(self.name) or [pid for pid, _ in _alive(self._processes)]
            if left:
                raise RabbitNodeError(f"{self.name}: processes {left} survived cleanup")
            if self._rootfs is not None and self.refuse_deprecated_uses:
                used = self.deprecated_features_used()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        if used:
            raise RabbitNodeError(f"{self.name}: clients used deprecated features {used}")

    def is_running(self) -> bool:
        return bool(beam_pids(self.name))

    # -- administration --------------------------------------------------------------

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Runs `rabbitmqctl -n <this node> args...` with this node's cookie."""
        result = subprocess.run(
            self._command("rabbitmqctl", "-n", self.name, *args),
            env=self._env(),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._as_rabbitmq,
        )
        if check and result.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} exited with {result.returncode}: "
                f"{result.stdout}{result.stderr}"
            )
        return result

    def add_user(self, name: str, password: str, configure: str, write: str, read: str) -> None:
        """Creates (or re-passwords) a user with these permissions on vhost `/`."""
        result = self.ctl("add_user", name, password, check=False)
        if result.returncode != 0:
            if "already exists" not in result.stdout + result.stderr:
                raise RabbitNodeError(f"add_user {name}: {result.stdout}{result.stderr}")
            self.ctl("change_password", name, password)
        self.ctl("set_permissions", "-p", "/", name, configure, write, read)

    def set_memory_alarm(self, on: bool, timeout: float = 30.0) -> None:
        """Raises (watermark 0) or clears (watermark 0.4) a memory alarm, and waits
        until the node reports the alarm as asked: publishers are blocked while on."""
        self.ctl("set_vm_memory_high_watermark", "0" if on else "0.4")
        deadline = time.monotonic() + timeout
        while self.memory_alarm() != on:
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"memory alarm still {not on} after {timeout} s")
            time.sleep(0.2)

    def memory_alarm(self) -> bool:
        alarms = self.ctl("eval", "rabbit_alarm:get_alarms().").stdout
        return "memory" in alarms

    def url(self, user: str = "guest", password: str = "guest") -> str:
        """The plain AMQP URL (guest may log in: the connection comes from loopback)."""
        quote = urllib.parse.quote
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/%2F"

    def tls_url(self) -> str:
        """The amqps URL, by the name the server certificate is for."""
        if self.tls_port is None:
            raise RabbitNodeError(f"{self.name} was made without tls=True")
        return f"amqps://localhost:{self.tls_port}/%2F"

    def deprecated_features_used(self) -> list[str]:
        """The deprecated features the node's log says clients used, once each, in order.

        RabbitMQ 4.0 refuses some denied features (a transient non-exclusive queue closes
        the connection) but only logs others (a global QoS is applied anyway), so the log
        is the one place that sees every use.
        """
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return []
        return list(dict.fromkeys(DEPRECATED_USE.findall(text)))

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_file, self.stdout_file):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError as err:
                text = [f"({err})"]
            parts.append(f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- internals -------------------------------------------------------------------

    def _command(self, program: str, *args: str) -> list[str]:
        """The command line for one of RabbitMQ's scripts: the host's, or run in the
        Debian 13 rootfs as its `rabbitmq` user with this node's directory bound in."""
        argv = [str(RABBITMQ_BIN / program), *args]
        if self._rootfs is None:
            return argv
        uid, gid = containers.rootfs_ids(self._rootfs, RABBITMQ_USER)
        return containers.in_rootfs(
            self._rootfs,
            argv,
            binds=[self.dir],
            read_only=["/etc/hosts"],  # `localhost` in the node's name resolves as here
            user=f"{uid}:{gid}",
            cwd=self.dir,
        )

    def _env(self) -> dict[str, str]:
        """A hermetic environment: nothing of the caller's RABBITMQ_*/ERL_* leaks in.

        HOME holds this node's own cookie; the CLI would otherwise write a fresh
        ~/.erlang.cookie into whatever HOME it sees.
        """
        d = self.dir
        system_path = "/usr/sbin:/usr/bin:/sbin:/bin"
        env = {
            "PATH": system_path if self._rootfs else os.environ.get("PATH", system_path),
            "HOME": str(d / "home"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",  # the Elixir CLI warns about (and mangles) latin1
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # ".conf" is appended
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",  # as the shared setup, should epmd be absent
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                f"-kernel inet_dist_use_interface {{127,0,0,1}} {NODE_MARKER} {self.name}"
            ),
        }
        if self.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd_port)
        return env

    def _prepare(self) -> None:
        for sub in ("home", "mnesia", "log", "tls"):
            (self.dir / sub).mkdir()
        cookie = self.dir / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (self.dir / "rabbitmq-env.conf").write_text("# deliberately empty\n")
        plugins = "[rabbitmq_auth_mechanism_ssl]." if self.tls else "[]."
        (self.dir / "enabled_plugins").write_text(plugins + "\n")
        (self.dir / "rabbitmq.conf").write_text(self._config())
        self._chown()

    def _config(self) -> str:
        lines = [
            f"listeners.tcp.default = 127.0.0.1:{self.port}",
            "vm_memory_high_watermark.relative = 0.4",
            "log.file.level = info",
            "log.console = false",
        ]
        if self._rootfs is not None:
            lines += [f"deprecated_features.permit.{f} = false" for f in DEPRECATED_FEATURES_4_0]
        if self.tls:
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {self.ca_file}",
                f"ssl_options.certfile = {self.server_cert}",
                f"ssl_options.keyfile = {self.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
                "auth_mechanisms.1 = PLAIN",
                "auth_mechanisms.2 = AMQPLAIN",
                "auth_mechanisms.3 = EXTERNAL",
                "ssl_cert_login_from = common_name",
            ]
        return "\n".join(lines) + "\n"

    def _make_certificates(self) -> None:
        """A CA, a server certificate for localhost/127.0.0.1 and a client one, CN virtpub.

        P-256 keys: generated in milliseconds, and both Erlang and Python take them.
        """
        tls_dir = self.dir / "tls"
        config = tls_dir / "openssl.cnf"
        config.write_text(OPENSSL_CONFIG)
        ca_key = tls_dir / "ca.key"

        def openssl(*args: str | Path) -> None:
            result = subprocess.run(
                ["openssl", *map(str, args)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise RabbitNodeError(f"openssl {args[0]} failed: {result.stderr}")

        def key(path: Path) -> None:
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", path)  # fmt: skip

        key(ca_key)
        openssl("req", "-new", "-x509", "-config", config, "-extensions", "ca", "-key", ca_key,
                "-subj", "/CN=virtpub-test-ca", "-days", "7", "-out", self.ca_file)  # fmt: skip
        for cn, cert, private, section in (
            ("localhost", self.server_cert, self.server_key, "server"),
            (TLS_USER, self.client_cert, self.client_key, "client"),
        ):
            key(private)
            csr = tls_dir / f"{section}.csr"
            openssl("req", "-new", "-config", config, "-key", private, "-subj", f"/CN={cn}",
                    "-out", csr)  # fmt: skip
            openssl("x509", "-req", "-in", csr, "-CA", self.ca_file, "-CAkey", ca_key,
                    "-set_serial", str(secrets.randbits(63)), "-days", "7",
                    "-extfile", config, "-extensions", section, "-out", cert)  # fmt: skip
        for path in tls_dir.iterdir():
            path.chmod(0o600 if path.suffix == ".key" else 0o644)
        self._chown()  # the broker reads server.key as the rabbitmq user

    def _chown(self) -> None:
        """The broker's user owns the directory: the host's, or the rootfs's own ids."""
        if os.geteuid() != 0:
            return
        if self._rootfs is None:
            uid, gid = pwd.getpwnam(RABBITMQ_USER).pw_uid, grp.getgrnam(RABBITMQ_USER).gr_gid
        else:
            uid, gid = containers.rootfs_ids(self._rootfs, RABBITMQ_USER)
        for path in (self.dir, *self.dir.rglob("*")):
            os.chown(path, uid, gid)

    def _tree(self) -> set[tuple[int, int]]:
        """The node's VM and its descendants (erl_child_setup, inet_gethost, the disk
        monitor): each makes its own session, so only parentage ties them to it."""
        table = _process_table()
        found = {pid for pid in beam_pids(self.name) if pid in table}
        frontier = set(found)
        while frontier:
            frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
            found |= frontier
        return {(pid, table[pid][1]) for pid in found}

    def _reap(self, timeout: float) -> bool:
        """Waits until the VM, its helpers and the start script are gone."""
        deadline = time.monotonic() + timeout
        while beam_pids(self.name) or _alive(self._processes):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        if self._process is not None:
            try:
                self._process.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                return False
            self._process = None
        self._processes.clear()
        return True

    def _kill_everything(self) -> None:
        """SIGKILLs the VM, its helpers and the start script, each by its own pid."""
        self._processes |= self._tree()
        targets = set(beam_pids(self.name)) | {pid for pid, _ in _alive(self._processes)}
        if self._process is not None and self._process.poll() is None:
            targets.add(self._process.pid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._reap(timeout=15):
            raise RabbitNodeError(f"{self.name}: processes survived SIGKILL")

    def _fail(self, why: str) -> None:
        raise RabbitNodeError(f"{self.name} on port {self.port}: {why}\n{self.log_tail()}")
