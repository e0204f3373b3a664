"""``dns = [...]`` under the packaged unit, with a real systemd-resolved: two booted Debian 12
containers (issue 11, item 5).

The netns tests run the daemon as root without resolved; here it runs as the unit runs it
(user secureiod, CAP_NET_ADMIN only, ProtectSystem=strict, seccomp, ...), and resolved
decides whether that caller may set the tunnel link's DNS. It may not by itself: on
Debian's dbus-daemon resolved does not trust the caller's CAP_NET_ADMIN and asks polkit,
which without a rule says no. The package ships the rule (packaging/polkit/).

* container a has systemd-resolved and polkitd (installed from .debs cached on the host:
  the containers have no network), and is the laptop of the README's full tunnel, with
  ``dns = ["198.19.0.1", "tunnel.example"]``;
* container b has no resolved (Debian 12's default) and is the exit server, also with a
  ``dns`` line: one warning line, and the tunnel works all the same.

In order: the DNS is on a's sio0 (`resolvectl dns/domain sio0`) and the session is up;
b logged its one warning line; without the polkit rule a's daemon logs one warning line
naming the fix, and no child of the daemon speaks on its notify socket; ``systemctl stop``
on a calls resolved's RevertLink (seen on the bus) and leaves no trace of the servers.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from secureiod_nspawn import (
    Container,
    Pair,
    booted_pair,
    cached_debs,
    cached_root,
    installed_version,
    log,
    require_host_tools,
    run,
)

REPO = Path(__file__).resolve().parents[2]
UNIT = "secureiod@sio0.service"
TUNNEL = {"a": "198.19.0.2", "b": "198.19.0.1"}
UNDERLAY = {"a": "198.18.0.1", "b": "198.18.0.2"}
DNS_SERVER = "198.19.0.1"
DNS_DOMAIN = "tunnel.example"
RULE = "/usr/share/polkit-1/rules.d/secureiod.rules"
NOT_APPLIED = re.compile(r"^secureiod\.daemon\.owned: dns = \[.*\] not applied: ", re.M)
FOREIGN_NOTIFY = "but reception only permitted for main PID"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="boots containers: needs root")


def _config(me: str, peer_key: str) -> str:
    """a: the laptop of the README's full tunnel; b: its exit. Both ask for DNS."""
    if me == "a":
        peer = f"""\
name = "exit"
public_key = "{peer_key}"
endpoint = "{UNDERLAY["b"]}:5800"
allowed_ips = ["0.0.0.0/0"]
"""
    else:
        peer = f"""\
name = "laptop"
public_key = "{peer_key}"
allowed_ips = ["{TUNNEL["a"]}/32"]
"""
    return f"""\
# written by packaging/tests/test_resolved_dns.py
[interface]
private_key = "/etc/secureiod/id_ed25519"
listen = "0.0.0.0:5800"
address = ["{TUNNEL[me]}/24"]
dns = ["{DNS_SERVER}", "{DNS_DOMAIN}"]

[[peer]]
{peer}"""


def _wait(what: str, predicate, timeout: float = 30.0, interval: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _invocation(c: Container) -> str:
    invocation = c.sh(f"systemctl show -p InvocationID --value {UNIT}").stdout.strip()
    assert invocation, f"{c.name}: {UNIT} has no invocation"
    return invocation


def _journal(c: Container, invocation: str | None = None) -> str:
    """The daemon's lines of one run of the unit (by default the current one)."""
    invocation = invocation or _invocation(c)
    return c.sh(
        f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={invocation}", timeout=30
    ).stdout


def _unit_journal(c: Container) -> str:
    """Everything about the unit, systemd's own lines included."""
    return c.sh(f"journalctl --no-pager -o cat -u {UNIT}", timeout=30).stdout


def _established(c: Container) -> bool:
    out = c.sh("secureioctl status -i sio0 --json", check=False, timeout=20).stdout
    return '"peers_established": 1' in out


# --- fixture ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("SECUREIOD_DEB")
    if given:
        path = Path(given)
        assert path.is_file(), f"SECUREIOD_DEB={given} does not exist"
        return path
    out = tmp_path_factory.mktemp("deb")
    run(["bash", str(REPO / "packaging/deb/build.sh"), str(out)], timeout=900)
    (path,) = out.glob("secureiod_*.deb")
    return path


def _install_resolved(c: Container) -> None:
    """systemd-resolved (the version of the root's systemd) and polkitd, from the host's
    cache; then resolved answers on the bus."""
    root = cached_root()
    debs = cached_debs(root, [f"systemd-resolved={installed_version(root, 'systemd')}", "polkitd"])
    target = c.root / "root" / "debs"
    target.mkdir()
    for path in debs:
        shutil.copy(path, target / path.name)
    c.sh("dpkg -i /root/debs/*.deb", timeout=300)
    # resolved's postinst starts it while dbus-daemon's policy does not know its new user
    # yet ("Unknown username systemd-resolve in message bus configuration file"): it runs
    # but never owns org.freedesktop.resolve1, and every resolvectl call times out. A
    # restart, with the policy reloaded by dpkg's dbus trigger, puts it on the bus.
    c.sh("systemctl restart systemd-resolved", timeout=60)
    _wait(
        "resolved on the bus",
        lambda: c.sh("resolvectl status", check=False, timeout=20).returncode == 0,
    )


def _setup(pair: Pair, deb: Path) -> None:
    started = time.monotonic()
    _install_resolved(pair.a)
    log(f"installed systemd-resolved and polkitd in {pair.a.name}")
    keys = {}
    for side, c in (("a", pair.a), ("b", pair.b)):
        shutil.copy(deb, c.root / "root" / "secureiod.deb")
        c.sh("dpkg -i /root/secureiod.deb", timeout=300)
        c.sh(f"test -f {RULE}")
        out = c.sh("runuser -u secureiod -- secureioctl genkey /etc/secureiod/id_ed25519")
        keys[side] = out.stdout.strip().splitlines()[-1]
    for me, peer, c in (("a", "b", pair.a), ("b", "a", pair.b)):
        c.write("/etc/secureiod/sio0.toml", _config(me, keys[peer]))
        c.sh("runuser -u secureiod -- secureiod --check -i sio0")
    for c in (pair.b, pair.a):
        c.sh(f"systemctl start {UNIT}", timeout=120)
    log(f"set up in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def tunnel(deb: Path) -> Iterator[Pair]:
    require_host_tools()
    with booted_pair("siod") as pair:
        try:
            _setup(pair, deb)
        except BaseException:
            print(pair.diagnostics(), file=sys.stderr)
            raise
        yield pair


# --- tests (in this order) -----------------------------------------------------------------


def test_dns_on_the_tunnel_link(tunnel: Pair) -> None:
    """The daemon, as the unit runs it, set the servers and the domains (with ``~.``: the
    tunnel's link answers every query) on sio0 through resolved."""
    a = tunnel.a
    dns = a.sh("resolvectl dns sio0").stdout
    assert re.fullmatch(rf"Link \d+ \(sio0\): {re.escape(DNS_SERVER)}\s*", dns), dns
    domains = a.sh("resolvectl domain sio0").stdout
    assert re.fullmatch(rf"Link \d+ \(sio0\): {re.escape(DNS_DOMAIN)} ~\.\s*", domains), domains
    status = a.sh("resolvectl status sio0").stdout
    assert "+DefaultRoute" in status, status
    journal = _journal(a)
    assert f"sio0: DNS {DNS_SERVER}, {DNS_DOMAIN} through systemd-resolved" in journal, journal
    assert not NOT_APPLIED.search(journal), journal
    assert FOREIGN_NOTIFY not in _unit_journal(a)
    # and the full tunnel itself works: the session is up, b answers through it
    _wait("a's session", lambda: _established(a))
    a.sh(f"ping -n -c 2 -i 0.2 -W 2 {TUNNEL['b']}", timeout=20)


def test_without_resolved_one_warning_line(tunnel: Pair) -> None:
    b = tunnel.b
    assert b.sh("command -v resolvectl", check=False).returncode != 0
    journal = _journal(b)
    warnings = NOT_APPLIED.findall(journal)
    assert len(warnings) == 1, journal
    line = next(x for x in journal.splitlines() if NOT_APPLIED.match(x))
    assert line.endswith(
        "not applied: resolvectl (systemd-resolved) is not installed; "
        "configure the resolver yourself"
    ), line
    assert b.sh(f"systemctl is-active {UNIT}").stdout.strip() == "active"
    _wait("b's session", lambda: _established(b))
    b.sh(f"ping -n -c 2 -i 0.2 -W 2 {TUNNEL['a']}", timeout=20)


def test_refused_without_the_polkit_rule(tunnel: Pair) -> None:
    """Without the package's rule resolved refuses the daemon: one warning line that names
    polkit, the daemon runs on, and resolvectl's failure report does not reach systemd."""
    a = tunnel.a
    a.sh(f"mv {RULE} /root/secureiod.rules")
    try:
        a.sh(f"systemctl restart {UNIT}", timeout=60)
        journal = _journal(a)
        lines = [x for x in journal.splitlines() if NOT_APPLIED.match(x)]
        assert len(lines) == 1, journal
        assert "resolvectl dns failed: " in lines[0], lines[0]
        assert "polkit" in lines[0] and "user secureiod" in lines[0], lines[0]
        assert a.sh("resolvectl dns sio0").stdout.strip().endswith("(sio0):"), a.sh(
            "resolvectl dns sio0"
        ).stdout
        assert a.sh(f"systemctl is-active {UNIT}").stdout.strip() == "active"
        # a failing resolvectl sends ERRNO= to $NOTIFY_SOCKET if it has one
        assert FOREIGN_NOTIFY not in _unit_journal(a)
    finally:
        a.sh(f"mv /root/secureiod.rules {RULE}")
    a.sh(f"systemctl restart {UNIT}", timeout=60)
    assert DNS_SERVER in a.sh("resolvectl dns sio0").stdout


def test_stop_reverts(tunnel: Pair) -> None:
    """``systemctl stop``: the daemon asks resolved to revert sio0 (RevertLink on the bus,
    answered, not refused) before the device goes, and the servers are nowhere after."""
    a = tunnel.a
    assert DNS_SERVER in a.sh("resolvectl dns sio0").stdout
    invocation = _invocation(a)
    monitor = "/root/resolve1.monitor"
    pid = a.sh(
        f"rm -f {monitor}; timeout 60 busctl monitor org.freedesktop.resolve1 "
        f">{monitor} 2>&1 </dev/null & echo $!"
    ).stdout.strip()
    _wait(
        "busctl monitor",
        lambda: "Monitoring bus message stream" in a.sh(f"cat {monitor}", check=False).stdout,
    )
    a.sh(f"systemctl stop {UNIT}", timeout=60)
    props = a.sh(f"systemctl show -p Result,ExecMainStatus {UNIT}").stdout.split()
    assert props == ["Result=success", "ExecMainStatus=0"], props
    assert a.sh("ip link show sio0", check=False).returncode != 0
    assert DNS_SERVER not in a.sh("resolvectl dns").stdout
    assert DNS_DOMAIN not in a.sh("resolvectl domain").stdout
    journal = _journal(a, invocation)
    assert "SIGTERM" in journal, journal
    assert not re.search(r"not (applied|removed|reverted)|could not", journal), journal
    text = a.sh(f"sleep 1; cat {monitor}; kill {pid}").stdout
    calls = re.findall(r"Cookie=(\d+) .*\n\s*Sender=(\S+) .*Member=RevertLink", text)
    assert len(calls) == 1, text
    cookie, sender = calls[0]
    replies = re.findall(
        rf"Type=(method_return|error) .*ReplyCookie={cookie} .*\n"
        rf".*Destination={re.escape(sender)}\b",
        text,
    )
    assert replies == ["method_return"], text
