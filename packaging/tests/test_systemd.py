"""The Debian package under a real systemd: two booted Debian 12 containers.

What is checked, in order (the tests share one pair of containers and run top to
bottom; the last ones stop and remove the service):

* lintian reports no error or warning for the .deb;
* the .deb installs with dpkg -i on a minimal bookworm (no network in the container),
  creating the user, /etc/secureiod 0700 and byte code;
* ``systemctl enable --now secureiod@sio0`` reaches active/running, which for
  Type=notify means the daemon's READY=1 arrived, and STATUS= shows in StatusText,
  with /dev/net/tun at mode 0600 root in container a (as nspawn and hosts without udev
  have it: the unit's ACL step lets user secureiod open it) and 0666 in container b (as
  udev makes it);
* the daemon runs as user secureiod with CAP_NET_ADMIN only, NoNewPrivs, seccomp;
* ``secureioctl status`` answers; the containers ping each other through the tunnel;
* ``systemctl reload`` applies a changed config and keeps the peer's session;
* the daemon feeds the watchdog (WatchdogSec shortened by a drop-in on one container);
* ``journalctl -u secureiod@sio0`` holds the daemon's lines, at their priorities;
* ``systemd-analyze verify`` passes in the container (and on the host, with a stub);
  ``systemd-analyze security`` scores at most 1.9;
* a second instance (secureiod@sio1) starts and stops without touching sio0's socket;
* ``systemctl stop`` removes the device and the socket, exit status clean;
* ``dpkg -r`` keeps the configs and takes back the ACL entry, ``dpkg -P`` removes the
  configs and the user.

Needs root and the host tools of ``secureiod_nspawn.HOST_TOOLS`` (``make bootstrap``
installs them; a missing one is an error, not a skip). The minbase root is cached in
/var/cache/secureiod-test; set SECUREIOD_DEB to test a prebuilt .deb instead of building
one (``make test-systemd`` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from secureiod_nspawn import Container, Pair, booted_pair, log, require_host_tools, run

REPO = Path(__file__).resolve().parents[2]
UNIT_SOURCE = REPO / "packaging" / "systemd" / "secureiod@.service"
UNIT = "secureiod@sio0.service"
TUNNEL = {"a": "198.19.0.1", "b": "198.19.0.2"}
UNDERLAY = {"a": "198.18.0.1", "b": "198.18.0.2"}
EXTRA_ADDRESS = "198.19.0.101/24"
# The mode /dev/net/tun has in each container when the service first starts: 0600 root
# is what nspawn (and any host without udev) gives, 0666 what udev gives.
TUN_MODE = {"a": 0o600, "b": 0o666}
MAX_SECURITY_EXPOSURE = 1.9

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="boots containers: needs root")


def _config(me: str, peer: str, peer_key: str, extra_addresses: tuple[str, ...] = ()) -> str:
    addresses = ", ".join(f'"{a}"' for a in (f"{TUNNEL[me]}/24", *extra_addresses))
    return f"""\
# written by packaging/tests/test_systemd.py
[interface]
name = "sio0"
private_key = "/etc/secureiod/id_ed25519"
listen = "0.0.0.0:5800"
address = [{addresses}]
# no key rotation during the test, so latest_handshake only changes on a new session
key_update_interval = 3600

[[peer]]
name = "{peer}"
public_key = "{peer_key}"
endpoint = "{UNDERLAY[peer]}:5800"
allowed_ips = ["{TUNNEL[peer]}/32"]
"""


# Open the node read-write as the service user, as the daemon does (then close it).
_OPEN_TUN_AS_SECUREIOD = "runuser -u secureiod -- /bin/sh -c ': <>/dev/net/tun'"


def _tun_node(c: Container) -> tuple[str, list[str]]:
    """Mode (octal, as stat shows it) and ACL entries of /dev/net/tun in the container."""
    mode = c.sh("stat -c '%a %U %G' /dev/net/tun").stdout.strip()
    acl = c.sh("getfacl -cp /dev/net/tun").stdout.split()
    return mode, acl


def _show(c: Container, *props: str) -> dict[str, str]:
    out = c.sh(f"systemctl show -p {','.join(props)} {UNIT}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _json(c: Container, command: str) -> object:
    return json.loads(c.sh(f"secureioctl {command} -i sio0 --json", timeout=20).stdout)


def _wait(what: str, predicate, timeout: float = 30.0, interval: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _ping(src: Container, dst: str) -> subprocess.CompletedProcess[str]:
    return src.sh(f"ping -n -c 3 -i 0.2 -W 2 {dst}", check=False, timeout=20)


def _assert_ping(src: Container, dst: str, timeout: float = 20.0) -> None:
    result = _wait(
        f"{src.name} to ping {dst}",
        lambda: (r := _ping(src, dst)).returncode == 0 and r,
        timeout=timeout,
        interval=0.2,
    )
    assert " 0% packet loss" in result.stdout, result.stdout


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SECUREIOD_DEB")
    if given:
        path = Path(given)
        assert path.is_file(), f"SECUREIOD_DEB={given} does not exist"
        return path
    out = tmp_path_factory.mktemp("deb")
    started = time.monotonic()
    run(["bash", str(REPO / "packaging/deb/build.sh"), str(out)], timeout=900)
    (path,) = out.glob("secureiod_*.deb")
    log(f"built {path.name} in {time.monotonic() - started:.1f} s")
    return path


def _install_and_start(pair: Pair, deb: Path) -> None:
    started = time.monotonic()
    for c in (pair.a, pair.b):
        shutil.copy(deb, c.root / "root" / "secureiod.deb")
        c.sh("dpkg -i /root/secureiod.deb", timeout=300)
        # postinst: the system user and group, /etc/secureiod 0700 owned by the user.
        assert c.sh("getent passwd secureiod").stdout.split(":")[5] == "/nonexistent"
        c.sh("getent group secureiod")
        assert c.sh("stat -c '%a %U %G' /etc/secureiod").stdout.split() == [
            "700",
            "secureiod",
            "secureiod",
        ]
    log(f"installed the .deb in both containers in {time.monotonic() - started:.1f} s")
    host_node = os.stat("/dev/net/tun")
    for side, c in (("a", pair.a), ("b", pair.b)):
        # nspawn gives each container a node of its own (mknod in its /dev): changing it
        # must not change the host's, so make sure it is not the host's node bound in.
        node = os.stat(f"/proc/{c.leader}/root/dev/net/tun")
        assert (node.st_dev, node.st_ino) != (host_node.st_dev, host_node.st_ino), c.name
        mode = TUN_MODE[side]
        c.sh(f"setfacl -b /dev/net/tun && chown root: /dev/net/tun && chmod {mode:o} /dev/net/tun")
        # The check can fail: without the unit's ACL step user secureiod could not open a
        # 0600 node (and with it, could).
        probe = c.sh(_OPEN_TUN_AS_SECUREIOD, check=False)
        assert (probe.returncode == 0) == bool(mode & 0o006), (side, oct(mode), probe)
    keys = {}
    for side, c in (("a", pair.a), ("b", pair.b)):
        out = c.sh("runuser -u secureiod -- secureioctl genkey /etc/secureiod/id_ed25519")
        keys[side] = out.stdout.strip().splitlines()[-1]
    for me, peer, c in (("a", "b", pair.a), ("b", "a", pair.b)):
        c.write("/etc/secureiod/sio0.toml", _config(me, peer, keys[peer]))
        # The service's user must be able to read everything, as at every reload.
        c.sh("runuser -u secureiod -- secureiod --check -i sio0")
    started = time.monotonic()
    for c in (pair.a, pair.b):
        c.sh(f"systemctl enable --now {UNIT}", timeout=120)
    log(f"enable --now on both took {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def tunnel(deb: Path) -> Iterator[Pair]:
    require_host_tools()
    with booted_pair() as pair:
        try:
            _install_and_start(pair, deb)
        except BaseException:
            print(pair.diagnostics(), file=sys.stderr)
            raise
        yield pair


# --- tests without containers ---------------------------------------------------------------


def test_unit_verifies_on_host(tmp_path: Path) -> None:
    """systemd-analyze verify on the host, with ExecStart pointing at a stub (the real
    binary exists only where the package is installed). It exits 0 even for lines it
    ignores, so any output at all is a failure."""
    require_host_tools()
    stub = tmp_path / "secureiod"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = tmp_path / "secureiod@.service"
    unit.write_text(UNIT_SOURCE.read_text().replace("/usr/bin/secureiod", str(stub)))
    (tmp_path / UNIT).symlink_to(unit.name)
    result = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / UNIT)], check=False)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )


def test_lintian_clean(deb: Path) -> None:
    """No lintian error or warning; the overrides (each with its reason) ship in
    usr/share/lintian/overrides/secureiod."""
    require_host_tools()
    result = run(["lintian", "--fail-on", "error,warning", str(deb)], check=False, timeout=300)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert result.returncode == 0 and not tags, result.stdout + result.stderr


# --- tests in the containers (in this order) ----------------------------------------------


def test_active_through_sd_notify(tunnel: Pair) -> None:
    for c in (tunnel.a, tunnel.b):
        props = _show(c, "Type", "NotifyAccess", "ActiveState", "SubState", "StatusText", "MainPID")
        assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
        # `enable --now` returned only after READY=1: a Type=notify unit is "activating"
        # until then (and fails after TimeoutStartSec).
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert int(props["MainPID"]) > 0, props
        # STATUS= from the daemon, over the same notify socket.
        assert re.fullmatch(r"\d+/1 peers established", props["StatusText"]), props
        assert c.sh(f"systemctl is-enabled {UNIT}").stdout.strip() == "enabled"


def test_tun_access_whatever_its_mode(tunnel: Pair) -> None:
    """Container a's node was 0600 root, b's 0666: both daemons opened it (they are
    running), through one ACL entry for user secureiod; owner, group and others keep
    the access they had (with an ACL, stat's group digit is the ACL mask)."""
    expected = {
        "a": (
            "660 root root",
            ["user::rw-", "user:secureiod:rw-", "group::---", "mask::rw-", "other::---"],
        ),
        "b": (
            "666 root root",
            ["user::rw-", "user:secureiod:rw-", "group::rw-", "mask::rw-", "other::rw-"],
        ),
    }
    for side, c in (("a", tunnel.a), ("b", tunnel.b)):
        mode, acl = _tun_node(c)
        assert (mode, acl) == (expected[side][0], expected[side][1]), (side, mode, acl)
        c.sh(_OPEN_TUN_AS_SECUREIOD)
        assert c.sh("ip -o link show sio0").returncode == 0


def test_runs_unprivileged(tunnel: Pair) -> None:
    for c in (tunnel.a, tunnel.b):
        pid = _show(c, "MainPID")["MainPID"]
        status = dict(
            (k, v.strip())
            for k, _, v in (
                line.partition(":") for line in c.sh(f"cat /proc/{pid}/status").stdout.splitlines()
            )
        )
        uid = c.sh("id -u secureiod").stdout.strip()
        assert status["Uid"].split() == [uid] * 4, status["Uid"]
        cap_net_admin = f"{1 << 12:016x}"
        for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert status[field] == cap_net_admin, (field, status[field])
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"


def test_secureioctl_status(tunnel: Pair) -> None:
    for c in (tunnel.a, tunnel.b):
        out = c.sh("secureioctl status -i sio0", timeout=20).stdout
        assert "interface: sio0" in out, out
        # Operators in group secureiod may use the socket: 0660 secureiod:secureiod.
        assert c.sh("stat -c '%a %U %G' /run/secureiod/sio0.sock").stdout.split() == [
            "660",
            "secureiod",
            "secureiod",
        ]
        _wait(
            f"{c.name}: peer established",
            lambda c=c: _json(c, "status")["peers_established"] == 1,
        )
    for c in (tunnel.a, tunnel.b):
        assert _show(c, "StatusText")["StatusText"] == "1/1 peers established"


def test_ping_through_tunnel(tunnel: Pair) -> None:
    _assert_ping(tunnel.a, TUNNEL["b"])
    _assert_ping(tunnel.b, TUNNEL["a"])


def test_reload_keeps_session(tunnel: Pair) -> None:
    a, b = tunnel.a, tunnel.b
    before = _show(a, "MainPID", "NRestarts")
    (peer_before,) = _json(a, "peers")
    (b_peer_before,) = _json(b, "peers")
    assert peer_before["established"] and peer_before["latest_handshake"] is not None

    # A real change that a reload applies in place: one more address on sio0.
    b_key = peer_before["public_key"]
    a.write("/etc/secureiod/sio0.toml", _config("a", "b", b_key, (EXTRA_ADDRESS,)))
    a.sh(f"systemctl reload {UNIT}", timeout=60)

    after = _show(a, "MainPID", "NRestarts", "ActiveState", "SubState", "StatusText")
    assert (after["ActiveState"], after["SubState"]) == ("active", "running"), after
    assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"]
    status = _json(a, "status")
    assert status["reloads"] == 1, status
    assert EXTRA_ADDRESS in status["addresses"], status
    assert EXTRA_ADDRESS in a.sh("ip -4 -o address show dev sio0").stdout
    (peer_after,) = _json(a, "peers")
    for key in ("sessions_started", "latest_handshake", "established"):
        assert peer_after[key] == peer_before[key], (key, peer_before, peer_after)
    assert peer_after["rx_packets"] >= peer_before["rx_packets"], (peer_before, peer_after)
    (b_peer_after,) = _json(b, "peers")
    assert b_peer_after["sessions_started"] == b_peer_before["sessions_started"]
    assert b_peer_after["latest_handshake"] == b_peer_before["latest_handshake"]
    _assert_ping(a, TUNNEL["b"], timeout=10)
    _assert_ping(b, TUNNEL["a"], timeout=10)
    journal = a.sh(f"journalctl -u {UNIT} --no-pager -o cat").stdout
    assert re.search(r"reloaded: .*unchanged", journal), journal


def test_watchdog_pings(tunnel: Pair) -> None:
    """The daemon pings WATCHDOG=1 at half of WatchdogSec. With the packaged 30 s that
    takes long to see, so container a gets a drop-in with WatchdogSec=2 and a restart:
    the daemon must outlive several watchdog periods and the ping timestamp advance."""
    c = tunnel.a
    c.sh("mkdir -p /run/systemd/system/secureiod@sio0.service.d")
    c.write(
        "/run/systemd/system/secureiod@sio0.service.d/watchdog.conf", "[Service]\nWatchdogSec=2\n"
    )
    c.sh(f"systemctl daemon-reload && systemctl restart {UNIT}", timeout=60)
    props = _show(c, "WatchdogUSec", "MainPID", "ActiveState")
    assert props["WatchdogUSec"] == "2s" and props["ActiveState"] == "active", props
    first = int(_show(c, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
    time.sleep(5)  # 2.5 watchdog periods: a daemon that does not ping is killed by now
    after = _show(c, "MainPID", "ActiveState", "NRestarts", "WatchdogTimestampMonotonic")
    assert after["ActiveState"] == "active" and after["MainPID"] == props["MainPID"], after
    assert after["NRestarts"] == "0", after
    assert int(after["WatchdogTimestampMonotonic"]) > first, (first, after)
    c.sh("rm -r /run/systemd/system/secureiod@sio0.service.d && systemctl daemon-reload")
    _wait(
        "the restarted session",
        lambda: _json(c, "status")["peers_established"] == 1,
    )


def test_journal_has_daemon_lines(tunnel: Pair) -> None:
    for c in (tunnel.a, tunnel.b):
        out = c.sh(f"journalctl -u {UNIT} --no-pager -o json", timeout=30).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "secureiod"]
        messages = [str(e.get("MESSAGE", "")) for e in daemon]
        assert any("sio0 up: listening on" in m for m in messages), messages
        assert any("ESTABLISHED" in m or "established" in m for m in messages), messages
        # The <N> priority prefixes were parsed by journald, not logged as text.
        assert not [m for m in messages if re.match(r"<\d>", m)], messages
        assert {e.get("PRIORITY") for e in daemon} <= {"3", "4", "6", "7"}, daemon


def test_systemd_analyze_in_container(tunnel: Pair) -> None:
    c = tunnel.a
    # --man=no: the minimal container has no man-db to resolve Documentation=man:...;
    # check instead that the pages it names are installed.
    c.sh(
        "test -f /usr/share/man/man8/secureiod.8.gz && test -f /usr/share/man/man8/secureioctl.8.gz"
    )
    result = c.sh(f"systemd-analyze verify --man=no {UNIT}", check=False, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
    security = c.sh(f"systemd-analyze security --no-pager {UNIT}", check=False, timeout=60)
    overall = [line for line in security.stdout.splitlines() if "Overall exposure" in line]
    log(f"systemd-analyze security: {overall[0].strip() if overall else security.stdout}")
    assert overall, security.stdout + security.stderr
    score = float(re.search(r"level for \S+: ([0-9.]+)", overall[0]).group(1))
    assert score <= MAX_SECURITY_EXPOSURE, overall[0]


def test_second_instance_leaves_the_first_alone(tunnel: Pair) -> None:
    """Instances share /run/secureiod (RuntimeDirectoryPreserve=yes): stopping
    secureiod@sio1 must not take secureiod@sio0's control socket with it."""
    c = tunnel.b
    c.write(
        "/etc/secureiod/sio1.toml",
        '[interface]\nprivate_key = "/etc/secureiod/id_ed25519"\n'
        'listen = "0.0.0.0:5801"\naddress = ["198.19.5.2/24"]\n',
    )
    c.sh("systemctl start secureiod@sio1", timeout=60)
    c.sh("test -S /run/secureiod/sio0.sock && test -S /run/secureiod/sio1.sock")
    assert "interface: sio1" in c.sh("secureioctl status -i sio1", timeout=20).stdout
    c.sh("systemctl stop secureiod@sio1", timeout=60)
    assert c.sh("ip link show sio1", check=False).returncode != 0
    c.sh("test -S /run/secureiod/sio0.sock")
    assert "interface: sio0" in c.sh("secureioctl status -i sio0", timeout=20).stdout
    _assert_ping(c, TUNNEL["a"], timeout=10)


def test_stop_removes_device(tunnel: Pair) -> None:
    c = tunnel.a
    assert c.sh("ip link show sio0", check=False).returncode == 0
    c.sh(f"systemctl stop {UNIT}", timeout=60)
    props = _show(c, "ActiveState", "Result", "ExecMainStatus")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    assert c.sh("ip link show sio0", check=False).returncode != 0
    assert c.sh("test -e /run/secureiod/sio0.sock", check=False).returncode != 0
    # The shared runtime directory stays for other instances (RuntimeDirectoryPreserve).
    c.sh("test -d /run/secureiod")
    journal = c.sh(f"journalctl -u {UNIT} --no-pager -o cat").stdout
    assert re.search(r"^secureiod: .*SIGTERM", journal, re.M), journal


def test_remove_keeps_config_purge_removes_it(tunnel: Pair) -> None:
    c = tunnel.b
    assert c.sh("systemctl is-active secureiod@sio0", check=False).stdout.strip() == "active"
    assert "user:secureiod:rw-" in _tun_node(c)[1]
    c.sh("dpkg -r secureiod", timeout=120)
    # prerm stopped the instance: its device went with it.
    assert c.sh("ip link show sio0", check=False).returncode != 0
    # ... and took back the ACL entry, before a purge frees the user's uid.
    assert "user:secureiod" not in " ".join(_tun_node(c)[1])
    c.sh("test -f /etc/secureiod/sio0.toml && test -f /etc/secureiod/id_ed25519")
    c.sh("getent passwd secureiod")
    assert c.sh("test -e /opt/secureiod", check=False).returncode != 0, c.sh(
        "find /opt/secureiod | head", check=False
    ).stdout
    c.sh("dpkg -P secureiod", timeout=120)
    assert c.sh("test -e /etc/secureiod", check=False).returncode != 0
    assert c.sh("getent passwd secureiod", check=False).returncode != 0
    assert c.sh("getent group secureiod", check=False).returncode != 0
    state = c.sh("dpkg-query -W -f='${db:Status-Abbrev}' secureiod", check=False)
    assert state.returncode != 0 or state.stdout.startswith("un"), state.stdout
