"""The Debian 13 legs: virtpub on Debian 13's Python 3.13 and libvirt 11.3, in its rootfs.

    python -m tests.debian13 python [PYTEST ARGS...]     the tests that need no service
    python -m tests.debian13 libvirtd [PYTEST ARGS...]   deploy/setup-host.sh, then the
                                                         QEMU tests on Debian 13's libvirtd

Each (as root) makes a virtualenv with the Debian 13 rootfs's python3, installs the
checkout into it with its test tools (pip builds libvirt-python from source against the
rootfs's libvirt-dev when no wheel matches), and runs its tests:

- `python`: those that need no service: no broker, no libvirtd, no container, no
  Node.js (`test:///default` is in libvirt itself, so the libvirt-using unit tests run).
- `libvirtd`: first `deploy/setup-host.sh`, as a Debian 13 host runs it (the rootfs holds
  its packages, `containers.DEBIAN13_PACKAGES`, so it installs nothing; it finds the
  host's broker on 127.0.0.1:5672 and starts virtlogd and libvirtd 11.3 with the QEMU
  driver), then the tests that boot QEMU guests through that libvirtd and publish to the
  host's broker.

Both run in the rootfs without booting it (`containers.in_rootfs`): the checkout is bound
read-only and the host's pip cache read-write, so a built libvirt-python wheel is built
once; the virtualenv, libvirtd, its guests and its state live in the command's own
namespaces and overlay, and go with it. There, the host's libvirtd is out of sight: its
socket is not bound, and `pgrep`/`pkill` see only the leg's processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from tests import containers

CHECKOUT = Path(__file__).resolve().parents[1]
DEBIAN13_LIBVIRT = "11.3"
"""The libvirt release of Debian 13 (trixie), which the map's v11.3.0 rows were read from."""
# The host's pip settings and the local indexes they name, if any; DNS and the CA bundle.
HOST_PIP_PATHS = (
    Path("/etc/pip.conf"),
    Path("/root/.config/pip"),
    Path("/opt/wheels"),
    Path("/opt/pypi"),
    Path("/opt/pypi-more"),
    Path("/etc/resolv.conf"),
    Path("/etc/hosts"),
    containers.HOST_CA_BUNDLE,
)
SERVICE_FREE = "not broker and not libvirtd and not container and not nodejs"
LIBVIRTD_TESTS = (
    "tests/test_e2e_qemu.py",
    "tests/test_capabilities_real.py",
    "tests/test_existence_qemu.py",
    "-k",
    "not random_run",
)
"""Guests through the leg's own libvirtd, the capabilities of its QEMU and LXC drivers
against their map rows, and the existence model across restarts of virtpub and libvirtd.
Not the seeded random runs: 90 s each, they test the model more than the release, and
the host leg runs them."""
LEG = """\
set -eu
{prepare}
python3 -m venv /tmp/venv
# setuptools writes build files beside the sources, and the checkout is read-only here.
mkdir /tmp/src && tar -C "$1" --exclude=./.venv --exclude=./build --exclude=./.git -cf - . \
    | tar -xf - -C /tmp/src
/tmp/venv/bin/python -m pip install -q --disable-pip-version-check "/tmp/src[test]"
/tmp/venv/bin/python -c '
import platform, libvirt
print("[debian13] Python", platform.python_version(), "- libvirt",
      libvirt.getVersion(), "- libvirt-python", libvirt.__file__)'
shift
# Not exec'd: this shell stays PID 1 of the leg's namespace and reaps the processes that
# end up there, as a daemonized libvirtd's guests do (pytest would leave a destroyed
# guest a zombie, and libvirtd waits on it).
code=0
/tmp/venv/bin/python -m pytest -p no:cacheprovider "$@" || code=$?
exit $code
"""


class Leg(NamedTuple):
    """What sets one Debian 13 leg apart; the rest of the run is the same for every leg."""

    prepare: str
    """Shell run in the rootfs before the virtualenv is made."""
    selection: tuple[str, ...]
    """pytest's arguments that pick the leg's tests."""
    env: Mapping[str, str]
    """What the leg's environment adds."""


LEGS = {
    "python": Leg(
        prepare=":",
        selection=("-m", SERVICE_FREE),
        # A test that reaches for the broker despite its marks fails instead of passing.
        env={"VIRTPUB_TEST_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"},
    ),
    "libvirtd": Leg(prepare='bash "$1/deploy/setup-host.sh"', selection=LIBVIRTD_TESTS, env={}),
}


def main(args: list[str]) -> int:
    if not args or args[0] not in LEGS:
        print(f"usage: python -m tests.debian13 {'|'.join(LEGS)} [PYTEST ARGS...]")
        return 2
    name, pytest_args = args[0], args[1:]
    leg = LEGS[name]
    began = time.monotonic()
    try:
        root = containers.rootfs(containers.DEBIAN13, containers.DEBIAN13_PACKAGES)
    except containers.ContainerError as err:
        print(f"[debian13 {name}] no rootfs: {err}", flush=True)
        return 1
    containers.PIP_CACHE.mkdir(parents=True, exist_ok=True)
    script = LEG.format(prepare=leg.prepare)
    command = containers.in_rootfs(
        root,
        ["bash", "-c", script, "leg", str(CHECKOUT), *leg.selection, *pytest_args],
        binds=[containers.PIP_CACHE],
        read_only=[CHECKOUT, *(path for path in HOST_PIP_PATHS if path.exists())],
        cwd=CHECKOUT,
    )
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PIP_CACHE_DIR": str(containers.PIP_CACHE),
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only
        # The libvirt tests check they really run on Debian 13's libvirt, not the host's.
        "VIRTPUB_TEST_EXPECT_LIBVIRT": DEBIAN13_LIBVIRT,
        **leg.env,
    }
    code = subprocess.run(command, env=env, check=False).returncode
    print(f"[debian13 {name}] exit {code} after {time.monotonic() - began:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
