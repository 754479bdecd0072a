"""Debian containers for tests: a real systemd as PID 1, or another Debian release.

This machine's PID 1 is not systemd and no container engine runs here, but systemd boots
as PID 1 under `systemd-nspawn` over a debootstrap rootfs (design notes, "A real
systemd"). Building a rootfs takes a minute or more, so each one is built once per set of
packages and kept under `CACHE`; every container boots on a throwaway copy of it, so a
test never changes the cache and never sees what an earlier test left.

Each container runs in a cgroup of its own (nspawn's `--keep-unit` puts the container's
`payload/` and `supervisor/` groups below the caller's), so two containers never collide
and cleaning up removes exactly this container's groups. `Container.__exit__` halts it
and removes its copy whatever happened: a test never leaves a container running.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

CACHE = Path(os.environ.get("VIRTPUB_ROOTFS_CACHE", "/var/cache/virtpub-test/rootfs"))
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("systemd", "dbus", "ca-certificates")
SETUP_HOST = Path(__file__).resolve().parents[1] / "deploy/setup-host.sh"


def setup_host_packages() -> tuple[str, ...]:
    """The Debian packages deploy/setup-host.sh installs (its `PACKAGES=( ... )`)."""
    match = re.search(r"^PACKAGES=\((.*?)^\)", SETUP_HOST.read_text(), re.MULTILINE | re.DOTALL)
    if match is None:
        raise ContainerError(f"no PACKAGES=( ... ) in {SETUP_HOST}")
    lines = (line.split("#", 1)[0] for line in match.group(1).splitlines())
    return tuple(name for line in lines for name in line.split())


DEBIAN13 = "trixie"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CACHE = CACHE.parent / "pip-cache"
APT_ARCHIVES = CACHE.parent / "apt-archives"
# Where each `in_rootfs` command mounts its private tmpfs (in its own mount namespace, so
# any number of them share this one empty directory).
SCRATCH = CACHE.parent / "scratch"
BUILD_TIMEOUT_S = 900
BOOT_TIMEOUT_S = 60
HALT_TIMEOUT_S = 30


class ContainerError(RuntimeError):
    pass


# One Debian 13 rootfs serves every Debian 13 leg: it holds what deploy/setup-host.sh
# installs, so the script runs there as on a prepared Debian 13 host, installing nothing;
# that is RabbitMQ 4.0 for the broker tests, Python 3.13 with libvirt 11.3's headers to
# build libvirt-python, and libvirtd 11.3 with QEMU for the guests.
DEBIAN13_PACKAGES = setup_host_packages()


def rootfs(suite: str, packages: Sequence[str] = ()) -> Path:
    """A Debian `suite` rootfs (minbase, systemd, dbus; then `packages`, by apt), cached.

    Keyed by suite and package set; built beside its final place and renamed into it, under
    a lock, so a build that dies halfway leaves nothing that looks finished.
    """
    wanted = sorted({*BASE_PACKAGES, *packages})
    key = hashlib.sha256(" ".join([suite, *wanted]).encode()).hexdigest()[:12]
    target = CACHE / f"{suite}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{suite}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc/os-release").exists():
            return target
        building = Path(tempfile.mkdtemp(prefix=f".{suite}-{key}.", dir=CACHE))
        building.chmod(0o755)  # mkdtemp's 0700 would become the container's `/`
        try:
            _run_build(
                f"debootstrap {suite}",
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 suite, str(building), MIRROR],
            )  # fmt: skip
            if packages:
                _run_build(
                    f"apt-get install in {suite}",
                    ["unshare", "--mount", "--fork", "sh", "-c", _INSTALL_IN_ROOTFS,
                     "install-in-rootfs", str(building), *sorted(set(packages))],
                )  # fmt: skip
            building.rename(target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


# Installs packages into a new rootfs with apt, which orders their unpacking and set-up
# (debootstrap's --include unpacks them in one dpkg batch, which fails once systemd and a
# package that depends on it, such as cron-daemon-common, land in the same one). Its mounts
# live in the command's own mount namespace; services are not started (policy-rc.d).
_INSTALL_IN_ROOTFS = r"""
set -eu
root=$1
shift
mount --make-rprivate /
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
export DEBIAN_FRONTEND=noninteractive
chroot "$root" apt-get -q update
chroot "$root" apt-get -q -y --no-install-recommends install "$@"
chroot "$root" apt-get clean
rm "$root/usr/sbin/policy-rc.d"
"""


def _run_build(what: str, argv: Sequence[str]) -> None:
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise ContainerError(f"{what} failed ({done.returncode}): {tail}")


def _copy_tree(source: Path, dest: Path) -> None:
    subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(dest)], check=True)


class Container:
    """A booted container on a copy of `base`; the host's network, its own everything else.

    Without a private network the container reaches the host's services on 127.0.0.1 (the
    shared RabbitMQ), `binds` give it host paths (the libvirtd socket in /run/libvirt) and
    `read_only_binds` host paths it cannot change (a checkout), each `SOURCE[:DEST]`.
    pip's cache, and apt's downloaded packages for this rootfs, persist between containers.
    """

    def __init__(
        self,
        base: Path,
        *,
        binds: Sequence[str] = (),
        name: str = "",
        read_only_binds: Sequence[str] = (),
    ) -> None:
        self.name = name or f"virtpub-test-{secrets.token_hex(4)}"
        self._base = base
        self._binds = tuple(binds)
        self._read_only_binds = tuple(read_only_binds)
        self._work = Path(tempfile.mkdtemp(prefix=f"{self.name}.", dir=CACHE.parent))
        self.root = self._work / "root"
        self.log_path = self._work / "console.log"
        self._cgroups = [root / self.name for root in CGROUP_ROOTS if root.is_dir()]
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def __repr__(self) -> str:
        return f"Container({self.name!r}, leader={self.leader})"

    def __enter__(self) -> Self:
        try:
            self.root.mkdir()
            _copy_tree(self._base, self.root)
            self._share_host_package_access()
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def _share_host_package_access(self) -> None:
        """pip inside reaches PyPI only with the host's pip settings and CA bundle."""
        for conf in (Path("/etc/pip.conf"), HOST_CA_BUNDLE):
            if conf.exists():
                (self.root / conf.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(conf, self.root / conf.relative_to("/"))

    def _join_own_cgroups(self) -> None:
        """Runs in the child before exec: nspawn's groups go below this container's own."""
        for group in self._cgroups:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    def _boot(self) -> None:
        for group in self._cgroups:
            group.mkdir(exist_ok=True)
        # Keyed by the rootfs, so one release's packages never meet another's.
        apt_archives = APT_ARCHIVES / self._base.name
        for cache in (PIP_CACHE, apt_archives):
            cache.mkdir(parents=True, exist_ok=True)
        caches = (f"{PIP_CACHE}:/root/.cache/pip", f"{apt_archives}:/var/cache/apt/archives")
        binds = [f"--bind={b}" for b in (*self._binds, *caches)]
        binds += [f"--bind-ro={b}" for b in self._read_only_binds]
        with open(self.log_path, "wb") as log:
            self._nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--register=no",
                    "--keep-unit",
                    "--quiet",
                    f"--machine={self.name}",
                    "-D",
                    str(self.root),
                    *binds,
                    "--boot",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self._join_own_cgroups,  # noqa: PLW1509 - no threads write cgroups
            )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not self.leader:
            self.leader = self._find_leader()
            self._check_alive(deadline)
            time.sleep(0.05)
        # `--wait` returns once boot is over: running, or degraded (a unit failed).
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False)
            if state.stdout.strip() in ("running", "degraded"):
                return
            self._check_alive(deadline)
            time.sleep(0.2)

    def _find_leader(self) -> int:
        assert self._nspawn is not None
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
        return 0

    def _check_alive(self, deadline: float) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise ContainerError(
                f"{self.name} exited ({self._nspawn.returncode}): {self.console()}"
            )
        if time.monotonic() > deadline:
            raise ContainerError(
                f"{self.name} did not boot in {BOOT_TIMEOUT_S} s: {self.console()}"
            )

    def console(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:])
        return ""

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command inside, as root, in all the container's namespaces."""
        prefix = ["nsenter", "-t", str(self.leader), "-a"]
        if env:
            prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
        done = subprocess.run(
            [*prefix, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            output = " | ".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise ContainerError(
                f"{self.name}: {' '.join(argv)!r} exited {done.returncode}: {output}"
            )
        return done

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """A bash script inside (`set -euo pipefail`)."""
        return self.run("bash", "-c", f"set -euo pipefail\n{script}", check=check, timeout=timeout)

    def close(self) -> None:
        """Halts the container (SIGTERM to nspawn halts it cleanly), kills it if it will not
        halt, then removes its cgroups and its copy of the rootfs."""
        nspawn, self._nspawn = self._nspawn, None
        if nspawn is not None and nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(HALT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(nspawn.pid, signal.SIGKILL)
                nspawn.wait(HALT_TIMEOUT_S)
        for group in self._cgroups:
            _remove_cgroup(group)
        shutil.rmtree(self._work, ignore_errors=True)


def _remove_cgroup(group: Path) -> None:
    """Deepest first: a cgroup directory is removed with rmdir, and only once empty."""
    if not group.is_dir():
        return
    for path in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rmdir_when_empty(path)
    _rmdir_when_empty(group)


def _rmdir_when_empty(path: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# Runs as PID 1 of a new PID namespace in a private mount namespace: a tmpfs holds an
# overlay whose lower layer is the cached rootfs, so the command may write anywhere and the
# cache never changes; host paths are bound at their own paths. When it exits, the kernel
# kills whatever it left (an epmd that daemonized) and every mount goes with the namespace.
_IN_ROOTFS = r"""
set -eu
lower=$1 scratch=$2 user=$3 cwd=$4
shift 4
mount --make-rprivate /
mount -t tmpfs -o mode=0755 virtpub-rootfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay \
    -o "lowerdir=$lower,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
new=$scratch/root
mount -t proc proc "$new/proc"
mount --rbind /dev "$new/dev"
mount --rbind /sys "$new/sys"
mount -t tmpfs -o mode=1777 tmpfs "$new/tmp"
while [ "$1" != -- ]; do
    mode=$1 path=$2
    shift 2
    if [ -d "$path" ]; then
        mkdir -p "$new$path"
    else
        mkdir -p "$new${path%/*}"
        touch "$new$path"
    fi
    mount --bind "$path" "$new$path"
    if [ "$mode" = ro ]; then mount -o remount,bind,ro "$new$path"; fi
done
shift
exec chroot --userspec="$user" "$new" env -C "$cwd" "$@"
"""


def in_rootfs(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Sequence[str | Path] = (),
    read_only: Sequence[str | Path] = (),
    user: str = "0:0",
    cwd: str | Path = "/",
) -> list[str]:
    """The command line that runs `argv` in `root` without booting it (a chroot of its own).

    For running another release's binaries on this host: its network, its processes' view
    of the host's /dev and /sys, and `binds` (read-write) and `read_only` host paths at their
    own paths. `user` is "uid:gid" as the rootfs knows them (see `rootfs_ids`). Everything
    the command started ends with it; nothing of it outlives it, on disk or in the cache.
    """
    SCRATCH.mkdir(parents=True, exist_ok=True)
    mounts = [
        *(x for b in binds for x in ("rw", str(b))),
        *(x for b in read_only for x in ("ro", str(b))),
    ]
    return [
        "unshare", "--mount", "--pid", "--fork", "--kill-child",
        "sh", "-c", _IN_ROOTFS, "in-rootfs",
        str(root), str(SCRATCH), user, str(cwd), *mounts, "--", *argv,
    ]  # fmt: skip


def rootfs_ids(root: Path, user: str) -> tuple[int, int]:
    """`user`'s uid and gid in `root`'s /etc/passwd (they need not match the host's)."""
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ContainerError(f"no user {user} in {root}")


@contextlib.contextmanager
def booted(
    suite: str,
    packages: Sequence[str] = (),
    binds: Sequence[str] = (),
    read_only_binds: Sequence[str] = (),
) -> Iterator[Container]:
    with Container(
        rootfs(suite, packages), binds=binds, read_only_binds=read_only_binds
    ) as container:
        yield container
