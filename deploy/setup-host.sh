#!/usr/bin/env bash
# Prepare a Debian 12 or 13 host to run and test virtpub (idempotent, run as root).
#
#   1. apt packages (installed only if missing)
#   2. RabbitMQ on 127.0.0.1:5672 (started only if not answering)
#   3. libvirtd + virtlogd with the QEMU driver, guests running as root
#      (started directly: no systemd required)
#
# Safe to re-run: a second run changes nothing and takes a few seconds at most.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"

PACKAGES=(
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-lxc
    libvirt-clients qemu-system-x86 libvirt-dev pkg-config rabbitmq-server
    gcc python3 python3-dev python3-venv openssl
    debootstrap systemd-container   # tests/containers.py: Debian rootfs, systemd as PID 1
)
QEMU_CONF=/etc/libvirt/qemu.conf
LIBVIRT_URI=qemu:///system
AMQP_HOST=127.0.0.1
AMQP_PORT=5672
DPKG_LOCK_WAIT=900     # seconds to wait for a concurrent apt/dpkg run
RABBIT_WAIT=60         # seconds to wait for RabbitMQ to come up
LIBVIRT_WAIT=30        # seconds to wait for libvirtd to answer

log() { printf '[setup-host] %s\n' "$*"; }
die() { printf '[setup-host] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "unexpected failure at line ${LINENO}: ${BASH_COMMAND}"' ERR

[[ ${EUID} -eq 0 ]] || die "must be run as root"

# ---------------------------------------------------------------- 1. packages
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || printf '%s\n' "$p"; done
}

dpkg_busy() {
    # fuser prints noise about /proc/1 on some sandboxes; only the exit code matters.
    if command -v fuser >/dev/null 2>&1; then
        fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock >/dev/null 2>&1 && return 0
    fi
    pgrep -x 'apt|apt-get|aptitude|dpkg|unattended-upgr' >/dev/null 2>&1
}

wait_for_dpkg() {
    local deadline=$((SECONDS + DPKG_LOCK_WAIT)) said=0
    while dpkg_busy; do
        if ((!said)); then log "packages: another apt/dpkg run is active, waiting (max ${DPKG_LOCK_WAIT}s)"; said=1; fi
        ((SECONDS < deadline)) || die "dpkg lock still held after ${DPKG_LOCK_WAIT}s"
        sleep 3
    done
}

mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
    # A background install may be finishing these right now: wait, then re-check.
    wait_for_dpkg
    mapfile -t missing < <(missing_packages)
fi
if ((${#missing[@]})); then
    log "packages: installing ${missing[*]}"
    apt_opts=(-o DPkg::Lock::Timeout="${DPKG_LOCK_WAIT}" -q -y)
    apt-get "${apt_opts[@]}" update >/dev/null || die "apt-get update failed"
    apt-get "${apt_opts[@]}" install "${missing[@]}" >/dev/null || die "apt-get install failed: ${missing[*]}"
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) || die "packages still missing after install: ${missing[*]}"
    log "packages: installed"
else
    log "packages: all ${#PACKAGES[@]} already installed"
fi

# ---------------------------------------------------------------- 2. RabbitMQ
amqp_up() { timeout 2 bash -c "exec 3<>/dev/tcp/${AMQP_HOST}/${AMQP_PORT}" 2>/dev/null; }

if amqp_up; then
    log "rabbitmq: already listening on ${AMQP_HOST}:${AMQP_PORT}"
else
    if pgrep -u rabbitmq -f 'beam.*rabbit' >/dev/null 2>&1; then
        log "rabbitmq: node process exists but port closed, waiting for it"
    else
        log "rabbitmq: starting (rabbitmq-server -detached)"
        rabbitmq-server -detached >/dev/null 2>&1 || die "rabbitmq-server -detached failed (see /var/log/rabbitmq/)"
    fi
    deadline=$((SECONDS + RABBIT_WAIT))
    until amqp_up && timeout 10 rabbitmqctl -q await_startup >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "rabbitmq not answering on ${AMQP_HOST}:${AMQP_PORT} after ${RABBIT_WAIT}s (see /var/log/rabbitmq/)"
        sleep 2
    done
    log "rabbitmq: up after $((SECONDS - deadline + RABBIT_WAIT))s"
fi

# ---------------------------------------------------------------- 3. libvirt
# Without libvirt-daemon-system (needs systemd) Debian ships neither the state
# directories nor /etc/libvirt/qemu.conf, so create them ourselves.
created=()
for d in /var/log/libvirt /var/log/libvirt/qemu /var/run/libvirt \
         /var/lib/libvirt /var/lib/libvirt/qemu /var/cache/libvirt /etc/libvirt; do
    if [[ ! -d $d ]]; then mkdir -p "$d"; created+=("$d"); fi
done
if ((${#created[@]})); then log "libvirt: created ${created[*]}"; else log "libvirt: directories already in place"; fi

# The QEMU driver resolves its compiled-in default account (libvirt-qemu:libvirt-qemu)
# *before* reading qemu.conf and refuses to start if it does not exist, even with
# user = "root".  libvirt-daemon-system normally creates it; mirror its postinst.
accounts=()
for g in kvm libvirt-qemu; do
    if ! getent group "$g" >/dev/null; then groupadd --system "$g"; accounts+=("group:$g"); fi
done
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
        --no-create-home --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
    accounts+=("user:libvirt-qemu")
fi
if ((${#accounts[@]})); then log "libvirt: created ${accounts[*]}"; else log "libvirt: libvirt-qemu account already in place"; fi

declare -A QEMU_SETTINGS=(
    [user]='"root"'
    [group]='"root"'
    [dynamic_ownership]='0'
    [remember_owner]='0'
    [security_driver]='"none"'
)
if [[ ! -e $QEMU_CONF ]]; then
    install -m 0600 /dev/null "$QEMU_CONF"
    echo "# Written by virtpub deploy/setup-host.sh" >>"$QEMU_CONF"
fi
conf_changed=()
for key in user group dynamic_ownership remember_owner security_driver; do
    want="${key} = ${QEMU_SETTINGS[$key]}"
    if grep -Eq "^[[:space:]]*${key}[[:space:]]*=[[:space:]]*${QEMU_SETTINGS[$key]}[[:space:]]*$" "$QEMU_CONF"; then
        continue                                    # already set as wanted
    elif grep -Eq "^[[:space:]]*${key}[[:space:]]*=" "$QEMU_CONF"; then
        sed -i -E "s|^[[:space:]]*${key}[[:space:]]*=.*$|${want}|" "$QEMU_CONF"   # set to something else
    else
        printf '%s\n' "$want" >>"$QEMU_CONF"
    fi
    conf_changed+=("$key")
done
if ((${#conf_changed[@]})); then
    log "libvirt: ${QEMU_CONF}: set ${conf_changed[*]}"
else
    log "libvirt: ${QEMU_CONF} already configured"
fi

# Daemons log to files (there is no journald here).
if pgrep -x virtlogd >/dev/null; then
    log "virtlogd: already running"
else
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/virtlogd.log" virtlogd -d || die "virtlogd -d failed"
    log "virtlogd: started"
fi

libvirtd_pid="$(pgrep -x libvirtd || true)"
if [[ -n $libvirtd_pid ]] && ((${#conf_changed[@]})); then
    # qemu.conf is only read at startup; running guests survive a libvirtd restart.
    log "libvirtd: restarting (pid ${libvirtd_pid}) to apply qemu.conf changes"
    kill -TERM $libvirtd_pid
    for _ in $(seq 1 30); do pgrep -x libvirtd >/dev/null || break; sleep 1; done
    pgrep -x libvirtd >/dev/null && die "libvirtd (pid ${libvirtd_pid}) did not exit"
    libvirtd_pid=""
fi
if [[ -n $libvirtd_pid ]]; then
    log "libvirtd: already running (pid ${libvirtd_pid})"
else
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d || die "libvirtd -d failed (see /var/log/libvirt/libvirtd.log)"
    log "libvirtd: started"
fi

deadline=$((SECONDS + LIBVIRT_WAIT))
until version="$(timeout 10 virsh -c "$LIBVIRT_URI" version 2>/dev/null)"; do
    pgrep -x libvirtd >/dev/null || die "libvirtd exited; see /var/log/libvirt/libvirtd.log"
    ((SECONDS < deadline)) || die "virsh -c ${LIBVIRT_URI} not answering after ${LIBVIRT_WAIT}s"
    sleep 1
done
hv="$(awk -F': ' '/Running hypervisor/ {print $2}' <<<"$version")"
accel="TCG only (no usable /dev/kvm)"
[[ -r /dev/kvm && -w /dev/kvm ]] && accel="/dev/kvm present"
log "libvirt: ${LIBVIRT_URI} answers (${hv:-hypervisor unknown}; ${accel})"

log "done"
