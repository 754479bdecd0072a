#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running virtpub (run as root):
#
#   bash deploy/bootstrap.sh demo [ARGS...]   set up, then `virtpub demo` (events flow, Ctrl-C stops)
#   bash deploy/bootstrap.sh test [ARGS...]   set up, then lint, type-check and the test legs:
#        host             the whole suite here (ARGS go to its pytest)
#        debian13-broker  the broker tests against Debian 13's RabbitMQ 4.0, deprecated features denied
#        debian13-python  the service-free tests on Debian 13's Python 3.13 and libvirt 11.3
#        debian13-libvirtd  deploy/setup-host.sh on Debian 13, then QEMU guests on its libvirtd 11.3
#      VIRTPUB_TEST_LEGS (default: all four, space-separated) picks legs; each one runs, and
#      the command fails if any failed.
#   bash deploy/bootstrap.sh run  [ARGS...]   set up, then `virtpub run ARGS...`
#
# Set-up is idempotent: Debian packages, RabbitMQ and libvirtd (deploy/setup-host.sh),
# then a virtualenv in .venv with virtpub and its test tools. VIRTPUB_PYTHON picks the
# interpreter for the virtualenv (default: python3, which must be 3.11 or newer).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
mode="${1:-}"
case "$mode" in
    demo | test | run) shift ;;
    *) echo "usage: bash deploy/bootstrap.sh demo|test|run [ARGS...]" >&2; exit 2 ;;
esac

bash deploy/setup-host.sh

python="${VIRTPUB_PYTHON:-python3}"
venv="$repo/.venv"
if [[ ! -x $venv/bin/python ]]; then
    echo "[bootstrap] creating $venv with $($python --version)"
    "$python" -m venv "$venv"
fi
echo "[bootstrap] installing virtpub and its test tools into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# strict: the editable install is a tree of links in build/, laid out as the wheel is
# (publisher/ as virtpub, drivers/ as virtpub.drivers), which mypy and import-linter
# read like any installed package. A new module needs this step again.
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]" \
    --config-settings editable_mode=strict
export PATH="$venv/bin:$PATH"

# The debian13-broker leg: what talks to the broker, publishing and confirms to faults,
# TLS, the definitions and every tool, run unchanged against RabbitMQ 4.0.
debian13_broker_tests=(
    tests/test_topology.py tests/test_publish_test_driver.py tests/test_broker_reconnect.py
    tests/test_faults.py tests/test_tls.py tests/test_deploy.py
    tests/test_tail.py tests/test_archive.py tests/test_inventory.py
    tests/test_capabilities_real.py tests/test_snapshot_requests.py tests/test_rabbitnode.py
)

case "$mode" in
    demo)
        exec virtpub demo --state-dir "${VIRTPUB_STATE_DIR:-/var/lib/virtpub/demo}" "$@"
        ;;
    run)
        exec virtpub run "$@"
        ;;
    test)
        if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
            # The AsyncAPI document is validated by the official parser, an npm package.
            echo "[bootstrap] installing Node.js and npm (Debian's)"
            apt-get -q -y install nodejs npm >/dev/null
        fi
        echo "[bootstrap] ruff"
        ruff check publisher drivers tests bench
        ruff format --check publisher drivers tests bench
        echo "[bootstrap] mypy --strict"
        mypy
        failed=()
        for leg in ${VIRTPUB_TEST_LEGS:-host debian13-broker debian13-python debian13-libvirtd}; do
            began=$SECONDS
            echo "[bootstrap] leg $leg"
            case "$leg" in
                host) python -m pytest "$@" ;;
                debian13-broker) VIRTPUB_TEST_BROKER=debian13 python -m pytest "${debian13_broker_tests[@]}" ;;
                debian13-python) python -m tests.debian13 python -q ;;
                debian13-libvirtd) python -m tests.debian13 libvirtd -q ;;
                *) echo "[bootstrap] unknown leg $leg" >&2; false ;;
            esac || failed+=("$leg")
            echo "[bootstrap] leg $leg took $((SECONDS - began)) s"
        done
        if ((${#failed[@]})); then
            echo "[bootstrap] failed legs: ${failed[*]}" >&2
            exit 1
        fi
        ;;
esac
