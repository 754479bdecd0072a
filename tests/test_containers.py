"""The Debian 13 rootfs's package list, read from deploy/setup-host.sh without building anything."""

from __future__ import annotations

import re
import subprocess

from tests.containers import DEBIAN13_PACKAGES, SETUP_HOST, setup_host_packages


def test_setup_host_packages_are_the_names_bash_reads_from_the_script() -> None:
    """The rootfs holds what the script installs: the parse must give exactly the words of
    its PACKAGES array as bash expands it, comments left out."""
    array = subprocess.run(
        ["sed", "-n", "/^PACKAGES=(/,/^)/p", str(SETUP_HOST)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    expanded = subprocess.run(
        ["bash", "-c", f'{array}\nprintf "%s\\n" "${{PACKAGES[@]}}"'],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert {"libvirt-daemon-driver-qemu", "qemu-system-x86", "rabbitmq-server"} <= set(expanded)
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name) for name in expanded), expanded
    assert setup_host_packages() == tuple(expanded)
    # Should the rootfs list ever be written out by hand, it must still hold them all.
    assert set(expanded) <= set(DEBIAN13_PACKAGES)
