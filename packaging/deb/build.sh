#!/usr/bin/env bash
# Build dist/secureiod_<version>-<rev>_<arch>.deb with dpkg-deb (no debhelper).
#
# Usage: packaging/deb/build.sh [OUTDIR]        (`make deb`; root only to apt-get missing
#                                               build dependencies)
# Prints the path of the .deb on stdout (and only that); progress goes to stderr.
#
# Debian 12 lacks pydantic 2, blake3 and pyroute2 0.9, so the package carries its own
# virtualenv at /opt/secureiod/venv, made by the system /usr/bin/python3 (-m venv) and
# filled by pip from PyPI. The venv is built directly in the staging root
# ($WORK/root/opt/secureiod/venv): nothing is mounted and nothing outside $WORK is
# written, so the build works wherever Debian 12 runs as root, on overlayfs (a Docker
# build, a chroot on overlay) and inside containers. A venv is relocatable except for
# the places that name its own path, and those are rewritten to the final path:
#   * the shebang of the two entry points (bin/secureiod, bin/secureioctl), which pip
#     writes as the staging interpreter's path;
#   * the informational "command =" line of pyvenv.cfg.
# (bin/python3 is a symlink to /usr/bin/python3, and sys.prefix is found from the
# location of pyvenv.cfg at run time, so nothing else depends on where it was built.)
# The venv is then cleaned (no __pycache__, no direct_url.json, no activate scripts,
# ELF objects stripped) and every file is checked for leftover build paths: anything
# that still names $WORK or the source tree fails the build.
#
# Environment: DEB_REVISION (default 1), PIP (extra pip options, e.g. --no-index).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUTDIR=$(mkdir -p "${1:-$REPO/dist}" && cd "${1:-$REPO/dist}" && pwd)
PY=/usr/bin/python3
PKG=secureiod
PREFIX=/opt/secureiod
VENV=$PREFIX/venv

log() { echo "deb: $*" >&2; }
die() { echo "deb: error: $*" >&2; exit 1; }

# --- build dependencies ----------------------------------------------------------------
need=()
for p in dpkg-dev python3-venv python3-dev gcc libsodium-dev libssl-dev binutils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || die "missing build dependencies: ${need[*]}; run as root (or install them)"
    log "installing build dependencies: ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

UPSTREAM=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$REPO/pyproject.toml")
VERSION="$UPSTREAM-${DEB_REVISION:-1}"
ARCH=$(dpkg --print-architecture)
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
DEB="$OUTDIR/${PKG}_${VERSION}_${ARCH}.deb"
MAINTAINER=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$HERE/changelog" | head -1)

WORK=$(mktemp -d /var/tmp/secureiod-deb.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/root
mkdir -p "$STAGE" "$WORK/src" "$WORK/wheels"
log "building $PKG $VERSION ($ARCH) in $WORK"

# --- the source, as a clean copy (the work tree stays untouched) -----------------------
tar -C "$REPO" --exclude=__pycache__ --exclude='*.so' --exclude='*.pyc' \
    -cf - pyproject.toml setup.py README.md secureiod | tar -C "$WORK/src" -xf -

# --- the venv, built in the staging root and relocated to its final path ---------------
SVENV=$STAGE$VENV
mkdir -p "$STAGE$PREFIX"
(
    cd /   # import from the venv below, not from a secureiod/ in the current directory
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$PY" -m venv "$SVENV"
    # Build our own wheel (with the libsodium/OpenSSL C accelerator) from the clean copy, with
    # Debian's hardening flags (fortify, stack protector, relro/bindnow) ...
    eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
    # shellcheck disable=SC2086  # PIP holds several options
    "$SVENV/bin/pip" wheel -q ${PIP:-} --no-deps -w "$WORK/wheels" "$WORK/src"
    # ... and install it with its dependencies as binary wheels. (PyNaCl 1.6 cannot be
    # built against Debian 12's libsodium 1.0.18, so it keeps the libsodium its wheel
    # embeds; our own C accelerator links the system libsodium23 and libssl3's libcrypto.)
    # shellcheck disable=SC2086
    "$SVENV/bin/pip" install -q ${PIP:-} --no-compile --only-binary :all: "$WORK"/wheels/secureiod-*.whl
    "$SVENV/bin/python" - <<'PYEOF'
import importlib, sys
for m in ("secureiod.secureio._accel", "secureiod.secureio._rxbatch", "secureiod.daemon._fastpath", "secureiod._tunio", "nacl.bindings", "blake3", "pydantic", "pyroute2",
          "cryptography.hazmat.primitives.asymmetric.ed25519", "secureiod.cli.daemon"):
    importlib.import_module(m)
import secureiod.secureio._accel as a, nacl._sodium as s
print("deb: imports ok:", a.__file__, s.__file__, file=sys.stderr)
PYEOF
    "$SVENV/bin/pip" freeze --all >"$WORK/freeze.txt"
    # A product venv: dpkg owns its files, nobody pip-installs into it.
    "$SVENV/bin/pip" uninstall -q -y pip setuptools
) >&2
[ -x "$SVENV/bin/secureiod" ] || die "the venv has no bin/secureiod"

# --- relocate: the paths that name the staging venv now name $VENV -------------------------
for script in secureiod secureioctl; do
    head -1 "$SVENV/bin/$script" | grep -qx "#!$SVENV/bin/python[0-9.]*" \
        || die "unexpected shebang in bin/$script: $(head -1 "$SVENV/bin/$script")"
    sed -i "1s|^#!.*|#!$VENV/bin/python3|" "$SVENV/bin/$script"
done
sed -i "s|^command = .*|command = $PY -m venv $VENV|" "$SVENV/pyvenv.cfg"

# --- clean the venv ----------------------------------------------------------------------
find "$STAGE$PREFIX" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$STAGE$PREFIX" -name '*.pyc' -delete
find "$STAGE$PREFIX" -name direct_url.json -delete       # would name the build's wheel path
# bin/ keeps the interpreter links and our two entry points; the dependencies' own
# tools (pyroute2's, cffi's) are not part of this package. include/ is empty.
find "$STAGE$VENV/bin" -mindepth 1 -maxdepth 1 ! -name 'python*' ! -name secureiod \
    ! -name secureioctl -exec rm -rf {} +
rm -rf "$STAGE$VENV/include"
# Strip ELF objects (debug info holds build paths); the CPython ABI and symbols stay.
find "$STAGE$PREFIX" -type f -name '*.so*' -print0 |
    xargs -0 -r strip --strip-unneeded --remove-section=.comment --remove-section=.note
find "$STAGE$PREFIX" -type f -name '*.so*' -exec chmod 0644 {} +
# RECORD lists the hashes of the files pip installed; the stripped objects no longer
# match them, and dpkg, not pip, owns these files: drop RECORD rather than ship it stale.
find "$STAGE$PREFIX" -path '*.dist-info/RECORD' -delete
chmod -R u+rwX,go+rX,go-w "$STAGE$PREFIX"

# --- everything else -------------------------------------------------------------------
install -d -m 0755 "$STAGE/usr/bin" "$STAGE/lib/systemd/system" \
    "$STAGE/usr/share/doc/$PKG/examples" "$STAGE/usr/share/man/man8" \
    "$STAGE/usr/share/lintian/overrides" "$STAGE/usr/share/bash-completion/completions" \
    "$STAGE/usr/share/polkit-1/rules.d"
ln -s "$VENV/bin/secureiod" "$STAGE/usr/bin/secureiod"
ln -s "$VENV/bin/secureioctl" "$STAGE/usr/bin/secureioctl"
install -m 0644 "$REPO/packaging/systemd/secureiod@.service" "$STAGE/lib/systemd/system/"
# `dns = [...]` under the unit: resolved asks polkit whether user secureiod may (see the file).
install -m 0644 "$REPO/packaging/polkit/secureiod.rules" "$STAGE/usr/share/polkit-1/rules.d/"
install -m 0644 "$REPO"/config/*.toml "$STAGE/usr/share/doc/$PKG/examples/"
install -m 0644 "$REPO/config/README.md" "$STAGE/usr/share/doc/$PKG/examples/README.md"
install -m 0644 "$HERE/copyright" "$STAGE/usr/share/doc/$PKG/copyright"
gzip -9n <"$HERE/changelog" >"$STAGE/usr/share/doc/$PKG/changelog.Debian.gz"
gzip -9n <"$REPO/README.md" >"$STAGE/usr/share/doc/$PKG/README.md.gz"
for page in secureiod.8 secureioctl.8; do
    gzip -9n <"$REPO/packaging/man/$page" >"$STAGE/usr/share/man/man8/$page.gz"
done
install -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/$PKG"
install -m 0644 "$REPO/packaging/completion/secureioctl" "$REPO/packaging/completion/secureiod" \
    "$STAGE/usr/share/bash-completion/completions/"
find "$STAGE/usr/share" -type f -exec chmod 0644 {} +

# The changelog's top entry must be this version.
head -1 "$HERE/changelog" | grep -q "^$PKG ($VERSION) " \
    || die "packaging/deb/changelog: top entry is not $PKG ($VERSION)"

# --- no build paths left ---------------------------------------------------------------
if leftovers=$(grep -rlI -e "$WORK" -e /tmp/ -e /var/tmp/ -e "$REPO" "$STAGE" 2>/dev/null); then
    die "build paths left in: $leftovers"
fi
if leftovers=$(grep -rl -a -e "$WORK" -e "$REPO" "$STAGE" 2>/dev/null); then
    die "build paths left in binary files: $leftovers"
fi

# --- dependencies of the compiled objects ------------------------------------------------
mkdir -p "$WORK/shlibs/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" >"$WORK/shlibs/debian/control"
mapfile -t elfs < <(find "$STAGE$PREFIX" -type f -name '*.so*' | sort)
# Wheels' own vendored libraries (*.libs/) are found through their RPATH.
libdirs=()
while IFS= read -r d; do libdirs+=("-l$d"); done < <(find "$STAGE$PREFIX" -type d -name '*.libs')
shlibs=$(cd "$WORK/shlibs" && dpkg-shlibdeps -O --ignore-missing-info "${libdirs[@]}" "${elfs[@]}" 2>"$WORK/shlibdeps.err" |
    sed -n 's/^shlibs:Depends=//p')
grep -vE 'no dependency information found|should already be installed|could avoid a useless dependency' \
    "$WORK/shlibdeps.err" >&2 || true
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no dependencies"
# The venv is tied to the minor version it was made with (lib/python3.11, cp311 wheels).
# libsodium23 and libssl3 are named even if dpkg-shlibdeps finds them (our C accelerator
# links both);
# iproute2 for the admin's `ip`, procps for the unit's /bin/kill, adduser for postinst,
# acl for the unit's setfacl (access to /dev/net/tun where it is 0600).
# Suggests: `dns = [...]` is applied through systemd-resolved, which lets the unit's user
# change a link's DNS only through polkit (packaging/polkit/secureiod.rules).
DEPENDS="python3 (>= $PYVER), python3 (<< $PYNEXT), $shlibs, libsodium23, libssl3, iproute2, procps, adduser, acl"
# Keep the first mention of each package (libsodium23 (>= x) over a bare libsodium23).
DEPENDS=$("$PY" -c '
import sys
out = []
for d in (x.strip() for x in sys.argv[1].split(",") if x.strip()):
    name = d.split()[0]
    if d in out or (d == name and any(o.split()[0] == name for o in out)):
        continue
    out.append(d)
print(", ".join(out))' "$DEPENDS")

# --- control files -----------------------------------------------------------------------
install -d -m 0755 "$STAGE/DEBIAN"
for script in postinst prerm postrm; do
    install -m 0755 "$HERE/$script" "$STAGE/DEBIAN/$script"
done
# The bundled distributions, wrapped for the extended description (one space indent).
bundled=$(grep -viE '^(pip|setuptools|secureiod)( |==)' "$WORK/freeze.txt" | tr '\n' ' ' | sed 's/ $//' |
    fold -s -w 72 | sed 's/ *$//; s/^/ /')
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $SIZE
Depends: $DEPENDS
Suggests: systemd-resolved, polkitd
Section: net
Priority: optional
Description: VPN daemon carrying IP packets over secureio sessions
 secureiod creates one TUN interface per instance and carries its IP packets
 to peers over authenticated, encrypted secureio sessions on UDP, like
 WireGuard. It is configured by one TOML file per interface in /etc/secureiod
 and runs as the systemd service secureiod@IFNAME; secureioctl shows its
 state, reloads it and makes keys.
 .
 The daemon and its Python dependencies live in a private virtual
 environment in $VENV, because Debian 12 lacks some of them.
 Bundled from PyPI:
$bundled
EOF
(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
    xargs -0 md5sum | sed 's|  \./|  |') >"$STAGE/DEBIAN/md5sums"
chmod 0644 "$STAGE/DEBIAN/control" "$STAGE/DEBIAN/md5sums"

if leftovers=$(grep -rl -a -e "$WORK" -e "$REPO" "$STAGE" 2>/dev/null); then
    die "build paths left in: $leftovers"
fi

rm -f "$DEB"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
log "built $DEB ($(du -h "$DEB" | cut -f1), installed size $SIZE KiB)"
log "Depends: $DEPENDS"
echo "$DEB"
