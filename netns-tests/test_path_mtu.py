"""The tunnel follows the path MTU mid-stream (issue 12): two daemons, two routers between
them, a TCP stream through the tunnel, and the link between the routers narrows from 1500
to 1280 and widens again.

    a ──── r1 ════ r2 ──── b        (the ════ link is the one that changes)

Each case measures, and asserts with a margin under the goal, how long after the narrowing
the TCP stream moves again: with ICMP "fragmentation needed" / "packet too big" allowed
(the routers tell the sender's kernel, which refuses larger datagrams with EMSGSIZE: goal
< 5 s) and with them dropped by nftables on the routers, as firewalls do (a black hole
that only probing finds: goal < 15 s); on an IPv4 and an IPv6 underlay. Then the path
widens and the full size must come back: with ICMP that needs the kernel to forget what it
learned (``route/mtu_expires``, 10 minutes by default, shortened to 5 s in the two daemon
namespaces here to bound the test), without ICMP the session's first raise (10 s after it
went down). Every wait is bounded; the figures are printed (``pytest -s``) for the report.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from harness import PYTHON, Net, Node, poll, run

MIB = 1 << 20
MOVED: int = 16 * MIB
""""Moving again" = this much more arrived after the narrowing than before it: more than
what the receiving daemon's UDP buffer (4 MiB) and the TUN queue can hold from before."""
ICMP_LIMIT = 4.0
"""Asserted: the issue's 5 s goal with a margin."""
BLACK_HOLE_LIMIT = 12.0
"""Asserted: the issue's 15 s goal with a margin."""
WIDEN_LIMIT = 45.0
MTU_EXPIRES = 5

_SENDER = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conn = socket.create_connection((host, port), timeout=10)
conn.settimeout(seconds)
block = bytes(1 << 16)
end = time.monotonic() + seconds
try:
    while time.monotonic() < end:
        conn.sendall(block)
except OSError:
    pass
"""

_RECEIVER = r"""
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
srv.settimeout(10)
print("ready", flush=True)
conn, _ = srv.accept()
conn.settimeout(0.02)
total, last = 0, 0.0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        data = conn.recv(1 << 20)
        if not data:
            break
        total += len(data)
    except socket.timeout:
        pass
    now = time.monotonic()
    if now - last >= 0.02:
        print(f"{now:.4f} {total}", flush=True)
        last = now
print(f"{time.monotonic():.4f} {total}", flush=True)
"""


@dataclass
class Stream:
    """A TCP stream a → b through the tunnel; ``samples`` fill with (time, bytes received)
    every 20 ms, on the clock the test uses (CLOCK_MONOTONIC is system-wide)."""

    receiver: subprocess.Popen[str]
    sender: subprocess.Popen[str] | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _read(self) -> None:
        assert self.receiver.stdout is not None
        for line in self.receiver.stdout:
            t, n = line.split()
            with self.lock:
                self.samples.append((float(t), int(n)))

    def received(self) -> int:
        with self.lock:
            return self.samples[-1][1] if self.samples else 0

    def received_at(self, when: float) -> int:
        with self.lock:
            before = [n for t, n in self.samples if t <= when]
        return before[-1] if before else 0

    def moved_by(self, since: float, amount: int) -> float | None:
        """Seconds after ``since`` when ``amount`` more bytes than at ``since`` had arrived."""
        base = self.received_at(since)
        with self.lock:
            for t, n in self.samples:
                if t > since and n >= base + amount:
                    return t - since
        return None


def start_stream(a: Node, b: Node, dst: str, seconds: float) -> Stream:
    receiver = b.popen(
        [PYTHON, "-c", _RECEIVER, dst, "5901", str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "ready"
    stream = Stream(receiver)
    threading.Thread(target=stream._read, daemon=True).start()
    stream.sender = a.popen(
        [PYTHON, "-c", _SENDER, dst, "5901", str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return stream


@dataclass
class Routed:
    a: Node
    b: Node
    r1: str
    r2: str
    middle: tuple[str, str]
    """The r1 ═ r2 veth: its name in r1 and in r2."""


def routed_pair(net: Net, ipv6: bool) -> Routed:
    """a ─ r1 ═ r2 ─ b, each subnet a /24 (IPv4) or /80 (IPv6) of the underlay ranges."""
    if ipv6:
        subnet = ["fd00:5ec:ff:0:1::{}/80", "fd00:5ec:ff:0:2::{}/80", "fd00:5ec:ff:0:3::{}/80"]
        listen, family, fwd = "[::]:5800", "-6", "net.ipv6.conf.all.forwarding=1"
    else:
        subnet = ["198.18.1.{}/24", "198.18.2.{}/24", "198.18.3.{}/24"]
        listen, family, fwd = "0.0.0.0:5800", "-4", "net.ipv4.ip_forward=1"
    a = net.node("a", listen=listen)
    b = net.node("b", listen=listen)
    r1, r2 = net.namespace(), net.namespace()
    for ns in (r1, r2):
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", fwd])
    for node in (a, b):
        run(
            ["ip", "netns", "exec", node.ns, "sysctl", "-q", "-w",
             f"net.ipv4.route.mtu_expires={MTU_EXPIRES}",
             f"net.ipv6.route.mtu_expires={MTU_EXPIRES}"]
        )  # fmt: skip
    net.link(a.ns, r1, subnet[0].format(1), subnet[0].format(2))
    middle = net.link(r1, r2, subnet[1].format(1), subnet[1].format(2))
    net.link(r2, b.ns, subnet[2].format(1), subnet[2].format(2))

    def host(i: int, n: int) -> str:
        return subnet[i].format(n).split("/")[0]

    def net_of(i: int) -> str:
        return subnet[i].format(0)

    routes = [
        (a.ns, net_of(2), host(0, 2)),
        (r1, net_of(2), host(1, 2)),
        (r2, net_of(0), host(1, 1)),
        (b.ns, net_of(0), host(2, 1)),
    ]
    for ns, dst, via in routes:
        run(["ip", "-n", ns, family, "route", "add", dst, "via", via])
    a_ep = f"[{host(0, 1)}]:5800" if ipv6 else f"{host(0, 1)}:5800"
    b_ep = f"[{host(2, 2)}]:5800" if ipv6 else f"{host(2, 2)}:5800"
    a.add_peer(b, endpoint=b_ep)
    b.add_peer(a, endpoint=a_ep)
    a.start(wait=False)
    b.start(wait=False)
    a.wait_ready()
    b.wait_ready()
    a.wait_established("b", 15)
    b.wait_established("a", 15)
    return Routed(a, b, r1, r2, middle)


def drop_icmp_too_big(net: Net, ns: str) -> None:
    """What many firewalls do: no ICMP "fragmentation needed" / "packet too big" leaves."""
    ruleset = """
table inet pmtu_black_hole {
    chain pmtu_out {
        type filter hook output priority 0; policy accept;
        icmp type destination-unreachable icmp code frag-needed drop
        icmpv6 type packet-too-big drop
    }
    chain pmtu_forward {
        type filter hook forward priority 0; policy accept;
        icmp type destination-unreachable icmp code frag-needed drop
        icmpv6 type packet-too-big drop
    }
}
"""
    path = net.workdir / f"nft-{ns}.conf"
    path.write_text(ruleset)
    run(["ip", "netns", "exec", ns, "nft", "-f", str(path)])


def set_middle_mtu(r: Routed, mtu: int) -> float:
    """Both ends of the r1 ═ r2 link (so both directions narrow); when it took effect."""
    for ns, dev in ((r.r1, r.middle[0]), (r.r2, r.middle[1])):
        run(["ip", "-n", ns, "link", "set", dev, "mtu", str(mtu)])
    return time.monotonic()


def payload_of(node: Node, peer: str) -> int:
    return int(node.peer(peer)["payload_size"])


def route_mtu(node: Node, dst: str) -> int | None:
    (route,) = json.loads(node.ip("-j", "-4", "route", "show", dst).stdout)
    mtu = (route.get("metrics") or [{}])[0].get("mtu")
    return int(mtu) if mtu is not None else None


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("icmp", [True, False], ids=["icmp", "icmp-dropped"])
def test_tcp_keeps_moving_when_the_path_narrows_and_widens(
    net: Net, ipv6: bool, icmp: bool
) -> None:
    full, small = (1392, 1168) if ipv6 else (1408, 1184)
    case = f"{'ipv6' if ipv6 else 'ipv4'} underlay, ICMP {'allowed' if icmp else 'dropped'}"
    r = routed_pair(net, ipv6)
    a, b = r.a, r.b
    if not icmp:
        drop_icmp_too_big(net, r.r1)
        drop_icmp_too_big(net, r.r2)
    assert payload_of(a, "b") == full and payload_of(b, "a") == full

    stream = start_stream(a, b, b.tunnel4, seconds=90.0)
    poll(lambda: stream.received() >= 32 * MIB, 20, "the TCP stream to get going")
    shrunk = set_middle_mtu(r, 1280)
    limit = ICMP_LIMIT if icmp else BLACK_HOLE_LIMIT
    poll(
        lambda: stream.moved_by(shrunk, MOVED) is not None,
        limit + 10,
        f"TCP to move again after the path narrowed ({case})",
        describe=lambda: f"{stream.samples[-5:]}\n{a.log_tail()}\n{b.log_tail()}",
    )
    recovery = stream.moved_by(shrunk, MOVED)
    assert recovery is not None
    print(f"\n[pmtu] {case}: TCP moving again {recovery:.2f} s after 1500 → 1280")
    assert recovery < limit, f"{case}: {recovery:.2f} s"

    # a's size toward b follows, with its routes, its link and one log line
    assert payload_of(a, "b") == small
    assert route_mtu(a, b.tunnel4) == small
    (link,) = json.loads(a.ip("-j", "link", "show", a.ifname).stdout)
    assert int(link["mtu"]) == 1280  # the IPv6 minimum (the tunnel has IPv6 addresses)
    assert len(re.findall(rf"peer b: path MTU {full} → {small}", a.read_log())) == 1
    # the other direction carried only ACKs so far; a large ping finds it out too
    t0 = time.monotonic()
    poll(
        lambda: b.ping(a.tunnel4, count=1, size=1300, wait=0.5).returncode == 0,
        limit,
        f"a 1328-byte ping b → a through the narrowed path ({case})",
        interval=0.0,
        describe=b.log_tail,
    )
    print(f"[pmtu] {case}: b → a full-size ping through after {time.monotonic() - t0:.2f} s")

    widened = set_middle_mtu(r, 1500)
    poll(
        lambda: payload_of(a, "b") == full,
        WIDEN_LIMIT,
        f"a's payload size back to {full} after the path widened ({case})",
        interval=0.25,
        describe=a.log_tail,
    )
    print(f"[pmtu] {case}: full size again {time.monotonic() - widened:.2f} s after widening")
    assert route_mtu(a, b.tunnel4) == full
    assert f"peer b: path MTU {small} → {full}" in a.read_log()
    before = stream.received()
    poll(lambda: stream.received() >= before + MOVED, 10, "TCP still moving at full size")
    assert stream.sender is not None and stream.sender.poll() is None
