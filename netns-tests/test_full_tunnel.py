"""Full tunnel and routes the daemon owns, in namespaces: a client A at home behind a router
R, an exit server B, and the "internet" I behind B.

    A ul0 ── R ── B ul0        A: 198.18.1.2/24, fd00:5ec:ff::1:2/112; default via R (both)
                  B ul1 ── I   R: forwards; B: 198.18.2.2/24, fd00:5ec:ff::2:2/112
                               I: 198.19.200.2/24, fd00:5ec:c8::2/64 (nothing routes there but B)

A's default routes lead to R, which also leads to B's endpoint: the case where a tunnel
that replaces the default route routes its own datagrams into itself. Every test ends by
comparing A's ``ip route show table all``, ``ip -6 route show table all``, ``ip rule`` and
``ip -6 rule`` byte for byte with what they were before the daemon started. No namespace
has a route to anything outside the ones made here (the default routes lead to R, which
has none), and they are removed before the fixture checks isolation.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import SECUREIOD, Net, Node, poll, run

README = Path(__file__).resolve().parent.parent / "README.md"
R_A = ("198.18.1.1/24", "fd00:5ec:ff::1:1/112")
A_R = ("198.18.1.2/24", "fd00:5ec:ff::1:2/112")
R_B = ("198.18.2.1/24", "fd00:5ec:ff::2:1/112")
B_R = ("198.18.2.2/24", "fd00:5ec:ff::2:2/112")
B_I = ("198.19.200.1/24", "fd00:5ec:c8::1/64")
I_B = ("198.19.200.2/24", "fd00:5ec:c8::2/64")
INTERNET4, INTERNET6 = "198.19.200.2", "fd00:5ec:c8::2"
POLICY_TABLE = 51820
B_ENDPOINT = {4: "198.18.2.2:5800", 6: "[fd00:5ec:ff::2:2]:5800"}
FULL = ["0.0.0.0/0", "::/0"]


def _host(address: str) -> str:
    return str(ipaddress.ip_interface(address).ip)


def _sh(ns: str, command: str) -> str:
    return run(["ip", "netns", "exec", ns, "sh", "-c", command]).stdout


def routing_state(ns: str) -> str:
    """What must be byte-for-byte the same before and after the daemon."""
    parts = []
    for argv in (
        ["route", "show", "table", "all"],
        ["-6", "route", "show", "table", "all"],
        ["rule"],
        ["-6", "rule"],
        ["addr"],
    ):
        parts.append(f"$ ip {' '.join(argv)}\n" + run(["ip", "-n", ns, *argv]).stdout)
    return "\n".join(parts)


def _counter(ns: str, dev: str, name: str) -> int:
    return int(_sh(ns, f"cat /sys/class/net/{dev}/statistics/{name}").strip())


@dataclass
class Home:
    """The namespaces of the module docstring; ``a`` and ``b`` are daemons-to-be."""

    net: Net
    a: Node
    b: Node
    r: str
    i: str
    r_to_b: str

    def add_peer_c(self, address: tuple[str, str]) -> tuple[Node, str]:
        """A third site C behind R (198.18.3.2/24): (its node, its endpoint)."""
        c = self.net.node("c", address=list(address), listen="[::]:5800")
        _, c.dev = self.net.link(self.r, c.ns, "198.18.3.1/24", "198.18.3.2/24")
        c.ip("route", "add", "198.18.0.0/16", "via", "198.18.3.1")
        return c, "198.18.3.2:5800"

    def finish(self) -> None:
        """Default routes go before the fixture checks that no namespace has one."""
        for family in ("-4", "-6"):
            self.a.ip(family, "route", "del", "default", check=False)


def home(
    net: Net, *, a_address: list[str] | None = None, b_address: list[str] | None = None
) -> Home:
    a = net.node("a", address=a_address or ["198.19.0.1/24", "fd00:5ec::1/64"], listen="[::]:5800")
    b = net.node("b", address=b_address or ["198.19.0.2/24", "fd00:5ec::2/64"], listen="[::]:5800")
    r = net.namespace()
    i = net.namespace()
    a.dev, _ = net.link(a.ns, r, list(A_R), list(R_A))
    r_to_b, b.dev = net.link(r, b.ns, list(R_B), list(B_R))
    b_to_i, i_dev = net.link(b.ns, i)
    for ns, dev, addresses in ((b.ns, b_to_i, B_I), (i, i_dev, I_B)):
        for address in addresses:
            extra = ["nodad"] if ":" in address else []
            run(["ip", "-n", ns, "addr", "add", address, "dev", dev, *extra])
    for ns in (r, b.ns):
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
             "net.ipv6.conf.all.forwarding=1"])  # fmt: skip
    a.ip("route", "add", "default", "via", _host(R_A[0]))
    a.ip("-6", "route", "add", "default", "via", _host(R_A[1]))
    b.ip("route", "add", "198.18.0.0/16", "via", _host(R_B[0]))
    b.ip("-6", "route", "add", "fd00:5ec:ff::/64", "via", _host(R_B[1]))
    a.underlay, b.underlay = _host(A_R[0]), _host(B_R[0])
    return Home(net, a, b, r, i, r_to_b)


def nat_on_b(h: Home) -> None:
    """B masquerades what comes out of the tunnel (as the README's server commands do),
    so I needs no route back to the tunnel addresses."""
    _sh(h.b.ns, "nft add table inet sio-nat")
    _sh(
        h.b.ns,
        "nft add chain inet sio-nat postrouting '{ type nat hook postrouting priority srcnat; }'",
    )
    _sh(h.b.ns, 'nft add rule inet sio-nat postrouting iifname "sio0" oifname != "sio0" masquerade')


def ping_through_tunnel(h: Home, dst: str, count: int = 10) -> None:
    """``count`` pings from A to ``dst`` behind B are answered, A's kernel sends them into
    sio0, and every one of the tunnel's datagrams crossed R (the underlay to B's endpoint
    left by A's own default route, not by the tunnel)."""
    route = h.a.ip("route", "get", dst).stdout
    assert " dev sio0 " in route, route
    before_tx = _counter(h.r, h.r_to_b, "tx_packets")
    before_rx = h.b.peer("a")["rx_packets"]
    h.a.assert_ping(dst, count=count, interval=0.05)
    assert _counter(h.r, h.r_to_b, "tx_packets") - before_tx >= count
    assert h.b.peer("a")["rx_packets"] - before_rx >= count


def underlay_route(h: Home, endpoint_ip: str, mark: int) -> str:
    """How A's kernel sends the daemon's (marked) datagrams to B's endpoint."""
    family = "-6" if ":" in endpoint_ip else "-4"
    return h.a.ip(family, "route", "get", endpoint_ip, "mark", str(mark)).stdout


# --- full tunnel -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint_family", [4, 6], ids=["ipv4-endpoint", "ipv6-endpoint"])
def test_full_tunnel_keeps_its_underlay_and_gives_everything_back(
    net: Net, endpoint_family: int
) -> None:
    h = home(net)
    nat_on_b(h)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[endpoint_family], allowed_ips=FULL)
    h.b.add_peer(h.a)
    before = routing_state(h.a.ns)
    h.b.start()
    h.a.start()
    h.a.wait_established("b")
    h.b.wait_established("a")

    during = routing_state(h.a.ns)
    rules4 = h.a.ip("rule").stdout
    rules6 = h.a.ip("-6", "rule").stdout
    for rules in (rules4, rules6):
        assert "from all lookup main suppress_prefixlength 0" in rules
        assert f"not from all fwmark {POLICY_TABLE:#x} lookup {POLICY_TABLE}" in rules
    assert (
        f"default dev sio0 table {POLICY_TABLE}" in h.a.ip("route", "show", "table", "all").stdout
    )
    assert (
        f"default dev sio0 table {POLICY_TABLE}"
        in h.a.ip("-6", "route", "show", "table", "all").stdout
    )
    # the host's own default routes are untouched and still serve marked traffic
    assert h.a.ip("route", "show", "default").stdout.startswith(
        f"default via {_host(R_A[0])} dev ul0"
    )
    endpoint_ip = B_ENDPOINT[endpoint_family].rsplit(":", 1)[0].strip("[]")
    assert f" dev {h.a.dev} " in underlay_route(h, endpoint_ip, POLICY_TABLE)
    assert " dev sio0 " in h.a.ip("route", "get", endpoint_ip).stdout  # unmarked: the tunnel

    ping_through_tunnel(h, INTERNET4)
    ping_through_tunnel(h, INTERNET6)
    # the LAN stays on the LAN: the main table's specific routes come first
    assert " dev ul0 " in h.a.ip("route", "get", _host(R_A[0])).stdout
    h.a.assert_ping(_host(R_A[0]), count=2, interval=0.05)
    log = h.a.read_log()
    assert "full tunnel (IPv4): default route in table 51820" in log
    assert "Traceback" not in log

    h.a.stop()
    after = routing_state(h.a.ns)
    # shown with the failure (or with -s): what A looked like in each phase
    print(f"=== A before ===\n{before}\n=== A with the tunnel up ===\n{during}")
    print(f"=== A after SIGTERM ===\n{after}")
    assert after == before
    h.b.stop()
    h.finish()


def test_kill9_then_restart_leaves_nothing_behind(net: Net) -> None:
    h = home(net)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.b.add_peer(h.a)
    before = routing_state(h.a.ns)
    h.b.start()
    h.a.start()
    h.a.wait_established("b")
    h.a.kill9()
    # what a killed daemon leaves: its rules (the device and its routes went with it)
    left = h.a.ip("rule").stdout
    assert f"lookup {POLICY_TABLE}" in left
    assert routing_state(h.a.ns) != before
    record = h.a.dir / "sio0.owned"
    assert record.exists()

    h.a.start()
    h.a.wait_established("b", timeout=15)
    log = h.a.read_log().split("--- harness: start #2 ---")[1]
    assert "a previous secureiod for this interface stopped without cleaning up" in log
    assert h.a.ip("rule").stdout.count(f"lookup {POLICY_TABLE}") == 1  # not two pairs
    assert h.a.ip("-6", "rule").stdout.count(f"lookup {POLICY_TABLE}") == 1
    h.a.stop()
    assert routing_state(h.a.ns) == before
    assert not record.exists()
    h.b.stop()
    h.finish()


def test_a_second_daemon_for_the_interface_is_refused(net: Net) -> None:
    h = home(net)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.a.start()
    rules = h.a.ip("rule").stdout
    second = run(
        ["ip", "netns", "exec", h.a.ns, SECUREIOD, "--config", str(h.a.config_path)],
        check=False,
        timeout=20,
    )
    assert second.returncode == 1
    assert "is locked: another secureiod is running for this interface" in second.stderr
    assert h.a.ip("rule").stdout == rules  # the first one's rules are still there
    h.a.stop()
    h.finish()


# --- collisions and nesting --------------------------------------------------------------------


def test_lan_prefix_collision_is_installed_behind_and_given_back(net: Net) -> None:
    """A peer's allowed_ips include A's own LAN (198.18.1.0/24 on ul0): --check warns, the
    daemon adds its route behind the connected one (with a warning), the session comes up,
    the LAN stays reachable, and at stop only the daemon's route goes."""
    h = home(net)
    lan = "198.18.1.0/24"
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=["198.19.0.2/32", lan])
    h.b.add_peer(h.a)
    h.a.write_config()
    check = h.a.exec([SECUREIOD, "--check", "--config", str(h.a.config_path)], check=True)
    assert (
        f'warning: peer "b": allowed_ips {lan} is already routed by this host '
        f"({lan} dev ul0 proto kernel scope link)"
    ) in check.stdout
    before = routing_state(h.a.ns)
    h.b.start()
    h.a.start()
    h.a.wait_established("b")
    shown = h.a.ip("route", "show", lan).stdout
    assert f"{lan} dev ul0 proto kernel scope link src {_host(A_R[0])}" in shown
    assert f"{lan} dev sio0 proto static scope link metric 1" in shown
    assert " dev ul0 " in h.a.ip("route", "get", _host(R_A[0])).stdout
    h.a.assert_ping(_host(R_A[0]), count=2, interval=0.05)
    h.a.assert_ping(h.b.tunnel4, count=2, interval=0.05)
    warnings = [
        line for line in h.a.read_log().splitlines() if "already routed by the host" in line
    ]
    assert len(warnings) == 1 and "metric 1" in warnings[0], warnings
    h.a.stop()
    assert routing_state(h.a.ns) == before
    h.a.assert_ping(_host(R_A[0]), count=2, interval=0.05)  # the LAN still works
    h.b.stop()
    h.finish()


def test_check_warns_of_a_prefix_that_captures_the_endpoint(net: Net) -> None:
    h = home(net)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=["198.19.0.2/32", "198.18.2.0/24"])
    h.a.write_config()
    check = h.a.exec([SECUREIOD, "--check", "--config", str(h.a.config_path)], check=True)
    assert check.stdout.splitlines()[0].endswith("OK: interface sio0, 1 peer")
    assert (
        'warning: peer "b": allowed_ips 198.18.2.0/24 covers its own endpoint 198.18.2.2 '
        "(the host reaches it by default via 198.18.1.1 dev ul0 proto boot), so the daemon's "
        "own datagrams to it would go into the tunnel"
    ) in check.stdout
    assert "ip route add 198.18.2.2/32 via 198.18.1.1 dev ul0" in check.stdout
    h.finish()


def test_exit_peer_beside_a_site_peer_longest_prefix_wins(net: Net) -> None:
    h = home(net)
    nat_on_b(h)
    c, c_endpoint = h.add_peer_c(("198.19.0.3/24", "fd00:5ec::3/64"))
    c.ip("addr", "add", "198.19.5.1/24", "dev", "lo")
    c.ip("addr", "add", "fd00:5ec:5::1/64", "dev", "lo")
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.a.add_peer(
        c,
        endpoint=c_endpoint,
        allowed_ips=["198.19.0.3/32", "fd00:5ec::3/128", "198.19.5.0/24", "fd00:5ec:5::/64"],
    )
    h.b.add_peer(h.a)
    c.add_peer(h.a)
    h.a.write_config()
    check = h.a.exec([SECUREIOD, "--check", "--config", str(h.a.config_path)], check=True)
    assert "OK: interface sio0, 2 peers" in check.stdout and "warning" not in check.stdout
    before = routing_state(h.a.ns)
    for node in (h.b, c, h.a):
        node.start()
    h.a.wait_established("b")
    h.a.wait_established("c")
    ping_through_tunnel(h, INTERNET4, count=3)
    for site in ("198.19.5.1", "fd00:5ec:5::1"):
        via_c = h.a.peer("c")["rx_packets"]
        via_b = h.a.peer("b")["rx_packets"]
        h.a.assert_ping(site, count=3, interval=0.05)
        assert h.a.peer("c")["rx_packets"] - via_c >= 3  # answered by C, accepted from C
        assert h.a.peer("b")["rx_packets"] == via_b
    assert "198.19.5.0/24 dev sio0 proto static scope link" in h.a.ip("route", "show").stdout
    h.a.stop()
    assert routing_state(h.a.ns) == before
    h.b.stop()
    c.stop()
    h.finish()


# --- the README's example -----------------------------------------------------------------------


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("\n## Full tunnel\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def _as_node_config(text: str, node: Node, peer: Node) -> str:
    """The README's file with what must differ in a test put in: this node's key file and
    control socket, the peer's public key."""
    data = tomllib.loads(text)
    placeholder = data["peer"][0]["public_key"]
    text = text.replace(data["interface"]["private_key"], str(node.key_path))
    text = text.replace(placeholder, peer.public_key)
    return text.replace(
        "[interface]\n",
        f"[interface]\ncontrol_socket = {json.dumps(str(node.control_socket))}\n",
        1,
    )


def test_readme_full_tunnel_example_works_as_written(net: Net) -> None:
    section = _readme_section()
    client_text, server_text = _blocks(section, "toml")
    client, server = tomllib.loads(client_text), tomllib.loads(server_text)
    h = home(
        net, a_address=client["interface"]["address"], b_address=server["interface"]["address"]
    )
    assert client["peer"][0]["endpoint"] == B_ENDPOINT[4]  # the addresses of this test
    (server_commands,) = [b for b in _blocks(section, "sh") if "nft" in b]
    for line in server_commands.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            _sh(h.b.ns, line)
    h.a.config_text = lambda: _as_node_config(client_text, h.a, h.b)  # type: ignore[method-assign]
    h.b.config_text = lambda: _as_node_config(server_text, h.b, h.a)  # type: ignore[method-assign]
    before = routing_state(h.a.ns)
    h.b.start()
    h.a.start()
    h.a.wait_established("exit")
    h.b.wait_established("laptop")
    for dst in (INTERNET4, INTERNET6):
        assert " dev sio0 " in h.a.ip("route", "get", dst).stdout
        h.a.assert_ping(dst, count=3, interval=0.05)
    # no systemd-resolved here: the dns key costs exactly one warning line
    dns_lines = [line for line in h.a.read_log().splitlines() if "dns" in line.lower()]
    assert len(dns_lines) == 1 and "not applied" in dns_lines[0], dns_lines
    poll(lambda: h.b.peer("laptop")["rx_packets"] >= 6, 5, "the laptop's packets at the server")
    h.a.stop()
    assert routing_state(h.a.ns) == before
    h.b.stop()
    h.finish()


# --- what the host must allow, and DNS ---------------------------------------------------------


def test_strict_rp_filter_is_named_with_its_fix(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """Strict reverse-path filtering drops the server's datagrams (their source looks
    routed into the tunnel when looked up without the mark). The daemon's mark restore
    (test_full_tunnel_rpfilter.py) is refused here, as nft is for a daemon without
    CAP_NET_ADMIN: one warning line names the sysctl, and applying it lets the session
    come up."""
    bindir = net.workdir / "bin"
    bindir.mkdir()
    stub = bindir / "nft"
    stub.write_text(
        '#!/bin/sh\necho "Error: Could not process rule: Operation not permitted" >&2\nexit 1\n'
    )
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    h = home(net)
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.b.add_peer(h.a)
    h.a.exec(["sysctl", "-q", "-w", "net.ipv4.conf.all.rp_filter=1"], check=True)
    h.b.start()
    h.a.start()
    (line,) = [x for x in h.a.read_log().splitlines() if "rp_filter" in x]
    assert line.endswith(
        "strict reverse-path filtering (rp_filter=1) on ul0 drops the peers' datagrams that "
        "arrive there while the tunnel holds the default route; make it loose: sysctl -w "
        "net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.ul0.rp_filter=2"
    )
    fix = line.split("make it loose: ", 1)[1]
    h.a.exec(fix.split(), check=True)
    h.a.wait_established("b", timeout=15)
    h.a.stop()
    h.b.stop()
    h.finish()


def test_dns_goes_through_resolvectl_and_back(net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd-resolved cannot run here (no systemd, no system bus), so a ``resolvectl``
    stand-in on PATH records what the daemon asks: the servers and ``~.`` on the tunnel's
    link at start, ``revert`` at stop. (Without any resolvectl, the README example test
    checks the one warning line.)"""
    bindir = net.workdir / "bin"
    bindir.mkdir()
    calls = net.workdir / "resolvectl.calls"
    script = bindir / "resolvectl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    h = home(net)
    h.a.interface["dns"] = ["198.19.0.2", "fd00:5ec::2", "tunnel.example"]
    h.a.add_peer(h.b, endpoint=B_ENDPOINT[4], allowed_ips=FULL)
    h.a.start()
    assert calls.read_text().splitlines() == [
        "dns sio0 198.19.0.2 fd00:5ec::2",
        "domain sio0 tunnel.example ~.",
    ]
    assert "sio0: DNS 198.19.0.2, fd00:5ec::2, tunnel.example through systemd-resolved" in (
        h.a.read_log()
    )
    h.a.stop()
    assert calls.read_text().splitlines()[-1] == "revert sio0"
    h.finish()
