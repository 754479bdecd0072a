#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a running virtpub (run as root):
#
#   bash deploy/bootstrap.sh demo [ARGS...]   set up, then `virtpub demo` (events flow, Ctrl-C stops)
#   bash deploy/bootstrap.sh test [ARGS...]   set up, then lint, type-check and the whole test suite
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
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
export PATH="$venv/bin:$PATH"

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
        echo "[bootstrap] pytest"
        exec python -m pytest "$@"
        ;;
esac
