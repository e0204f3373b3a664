#!/usr/bin/env bash
# Install what `make test` needs: apt packages, a virtualenv in .venv with the
# package installed editable, and /dev/net/tun. Idempotent and silent when
# everything is already in place.
#
# Usage: scripts/bootstrap.sh [EXTRA_APT_PACKAGE...]
# Environment:
#   PYTHON              interpreter used to create .venv (default: python3)
#   EXTRA_APT_PACKAGES  more apt packages to require (space separated)
set -euo pipefail

# apt packages every test run needs: nothing a test calls may be missing on a fresh
# Debian 12 (a missing tool fails a test, it is never a reason to skip one). Extend here,
# with the command that needs the package:
#   the venv and the C accelerator     python3-venv python3-dev python3-pip gcc pkg-config
#                                      libsystemd-dev libsodium23 libsodium-dev
#                                      libssl3 libssl-dev
#   netns-tests, tests, make demo      ip ss (iproute2), iperf3, nft (nftables), sysctl
#                                      kill (procps), ping (iputils-ping), modprobe (kmod),
#                                      ssh-keygen (openssh-client), unshare nsenter
#                                      (util-linux), mount umount (mount)
#   make deb (packaging/deb/build.sh)  dpkg-deb (dpkg), dpkg-shlibdeps dpkg-buildflags
#                                      (dpkg-dev), strip (binutils)
#   packaging/tests                    debootstrap, systemd-nspawn (systemd-container),
#                                      systemd-analyze (systemd), lintian; https mirrors
#                                      for debootstrap (ca-certificates)
#   tests/test_metrics.py              promtool (prometheus; its server is kept from
#                                      starting and left disabled: a test tool must not
#                                      leave a listener on :9090 behind)
APT_PACKAGES="python3-venv python3-dev python3-pip gcc pkg-config libsystemd-dev
libsodium23 libsodium-dev libssl3 libssl-dev
iproute2 iperf3 nftables procps iputils-ping kmod openssh-client util-linux mount
dpkg dpkg-dev binutils
debootstrap systemd-container systemd lintian ca-certificates prometheus"

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed-stamp"
PIP_EXTRAS="test,systemd,bench"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "bootstrap: $*" >&2; }
is_root() { [ "$(id -u)" -eq 0 ]; }

# --- apt packages ------------------------------------------------------------
missing=()
for pkg in $APT_PACKAGES ${EXTRA_APT_PACKAGES:-} "$@"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    if ! is_root; then
        log "missing apt packages: ${missing[*]}; run as root (or install them) and retry"
        exit 1
    fi
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Debian starts the daemons it installs; none of ours should run (policy-rc.d(8)).
    policy=/usr/sbin/policy-rc.d
    ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && ours=1
    fi
    status=0
    apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" || status=$?
    [ "$ours" = 1 ] && rm -f "$policy"
    [ "$status" = 0 ] || exit "$status"
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

# --- virtualenv ----------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    if [ -e "$VENV" ]; then
        log "$VENV is broken, recreating it"
        rm -rf "$VENV"
    fi
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
fi

if [ ! -e "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ setup.py -nt "$STAMP" ] \
    || [ secureiod/secureio/_accel.c -nt "$STAMP" ] \
    || [ secureiod/secureio/_rxbatch.c -nt "$STAMP" ] \
    || [ secureiod/daemon/_fastpath.c -nt "$STAMP" ] \
    || [ secureiod/_tunio.c -nt "$STAMP" ] \
    || [ secureiod/secureio/_construction.h -nt "$STAMP" ]; then
    log "installing secureiod[$PIP_EXTRAS] into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$PIP_EXTRAS]"
    touch "$STAMP"
fi

# --- bytecode ------------------------------------------------------------------
# Our own modules compiled ahead, as the .deb's postinst does for its venv: pip's editable
# install compiles none of them, and where PYTHONDONTWRITEBYTECODE is set (CI's machine
# has it) every daemon and secureioctl start compiled all of them again (lab: one peer
# 1.10 -> 0.74 s, 10,000 peers 4.95 -> 3.6-4.2 s). Only changed files are recompiled; a
# source newer than its .pyc is read from source, so it is never stale. A failure (a
# read-only tree, a syntax error) costs only speed: say why, and go on.
if ! out=$("$VENV/bin/python" -m compileall -q secureiod 2>&1); then
    log "warning: compileall failed (daemons will start slower): $(printf '%s\n' "$out" | head -n 3)"
fi

# --- /dev/net/tun ----------------------------------------------------------------
if [ ! -c /dev/net/tun ]; then
    if is_root; then
        modprobe tun 2>/dev/null || true
        if [ ! -c /dev/net/tun ]; then
            mkdir -p /dev/net && mknod -m 0666 /dev/net/tun c 10 200 2>/dev/null || true
        fi
    fi
    if [ ! -c /dev/net/tun ]; then
        log "warning: /dev/net/tun is missing; tests that need a TUN device will fail or skip"
    fi
fi
