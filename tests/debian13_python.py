"""The Debian 13 Python leg: virtpub on Debian 13's Python 3.13 and libvirt 11.3.

`python -m tests.debian13_python [PYTEST ARGS...]` (as root) makes a virtualenv with the
Debian 13 rootfs's python3, installs the checkout into it with its test tools (pip builds
libvirt-python from source against the rootfs's libvirt-dev when no wheel matches), and
runs the tests that need no service: no broker, no libvirtd, no container, no Node.js
(`test:///default` is in libvirt itself, so the libvirt-using unit tests run).

It runs in the rootfs without booting it (`containers.in_rootfs`): the checkout is bound
read-only and the host's pip cache read-write, so a built libvirt-python wheel is built
once; the virtualenv lives in the command's own tmpfs and goes with it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests import containers

CHECKOUT = Path(__file__).resolve().parents[1]
SELECTION = "not broker and not libvirtd and not container and not nodejs"
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
LEG = """\
set -eu
python3 -m venv /tmp/venv
# setuptools writes build files beside the sources, and the checkout is read-only here.
mkdir /tmp/src && tar -C "$1" --exclude=./.venv --exclude=./build --exclude=./.git -cf - . \
    | tar -xf - -C /tmp/src
/tmp/venv/bin/python -m pip install -q --disable-pip-version-check "/tmp/src[test]"
/tmp/venv/bin/python -c '
import platform, libvirt
print("[debian13-python] Python", platform.python_version(), "- libvirt",
      libvirt.getVersion(), "- libvirt-python", libvirt.__file__)'
shift
exec /tmp/venv/bin/python -m pytest -p no:cacheprovider "$@"
"""


def main(args: list[str]) -> int:
    began = time.monotonic()
    root = containers.rootfs(containers.DEBIAN13, containers.DEBIAN13_PACKAGES)
    containers.PIP_CACHE.mkdir(parents=True, exist_ok=True)
    command = containers.in_rootfs(
        root,
        ["bash", "-c", LEG, "leg", str(CHECKOUT), "-m", SELECTION, *args],
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
        # A test that reaches for the broker despite its marks fails instead of passing.
        "VIRTPUB_TEST_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
        # The libvirt tests check they really run on Debian 13's libvirt, not the host's.
        "VIRTPUB_TEST_EXPECT_LIBVIRT": DEBIAN13_LIBVIRT,
    }
    code = subprocess.run(command, env=env, check=False).returncode
    print(f"[debian13-python] exit {code} after {time.monotonic() - began:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
