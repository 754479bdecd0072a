"""The Debian 13 rootfs's package list, read from deploy/setup-host.sh without building anything."""

from __future__ import annotations

import re

from tests.containers import DEBIAN13_PACKAGES, setup_host_packages


def test_the_debian13_rootfs_holds_every_package_setup_host_installs() -> None:
    packages = setup_host_packages()
    assert {"libvirt-daemon-driver-qemu", "qemu-system-x86", "rabbitmq-server"} <= set(packages)
    # Names only: the script's comments are left out.
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name) for name in packages), packages
    assert set(packages) <= set(DEBIAN13_PACKAGES)
