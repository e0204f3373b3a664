"""Reloads that the kernel refuses, and reloads that must keep the MTUs, on real daemons
(review of issue 10): IPv6 turned off on the tunnel device, then an IPv6 prefix added to a
peer, used to stop the daemon on SIGHUP and to leave half a config through
``secureioctl reload``; an in-place ``allowed_ips`` change used to drop the route MTUs
and the link MTU to 1280.
"""

from __future__ import annotations

import os
import signal

from harness import Net, Node, poll

V6_PREFIX = "fd00:5ec:0:9::/64"


def _log_since(node: Node, offset: int) -> str:
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _routes(node: Node, version: int) -> str:
    return node.ip(f"-{version}", "route", "show", "dev", node.ifname).stdout


def test_a_route_the_kernel_refuses_keeps_the_daemon_and_the_running_config(
    net: Net,
) -> None:
    a, b = net.pair()
    b.exec(["sysctl", "-qw", f"net.ipv6.conf.{b.ifname}.disable_ipv6=1"], check=True)
    b.peer_specs[0]["allowed_ips"] = [*b.peer_specs[0]["allowed_ips"], V6_PREFIX]
    b.write_config()

    offset = b.log_path.stat().st_size
    os.kill(b.pid, signal.SIGHUP)
    poll(lambda: "reload failed" in _log_since(b, offset), 5, "the refusal", describe=b.log_tail)
    lines = [line for line in _log_since(b, offset).splitlines() if "reload failed" in line]
    print(f"\nSIGHUP: {lines}")
    assert len(lines) == 1 and "Permission denied" in lines[0], lines
    assert b.running, b.log_tail()
    a.assert_ping(b.tunnel4, count=3, interval=0.05)

    cli = b.ctl("reload", check=False)
    print(f"secureioctl reload: exit {cli.returncode}: {cli.stderr.strip()}")
    assert cli.returncode != 0 and "internal error" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1 and "Permission denied" in cli.stderr
    assert b.running
    assert V6_PREFIX not in b.peer("a")["allowed_ips"]
    st = b.status()
    assert (st["reloads"], st["reloads_refused"]) == (0, 2), st

    b.exec(["sysctl", "-qw", f"net.ipv6.conf.{b.ifname}.disable_ipv6=0"], check=True)
    result = b.reload()  # the second reload retries: not "unchanged"
    print(f"after IPv6 is back: {result['summary']}")
    assert result["in_place"] == ["a"]
    assert V6_PREFIX in _routes(b, 6)
    a.assert_ping(b.tunnel4, count=3, interval=0.05)


def test_an_in_place_change_keeps_the_route_and_link_mtus(net: Net) -> None:
    a, b = net.pair()
    mtu = b.peer("a")["mtu"]
    assert mtu and f"mtu {mtu}" in _routes(b, 4)
    link = b.ip("-j", "link", "show", b.ifname).stdout
    b.peer_specs[0]["allowed_ips"] = [*b.peer_specs[0]["allowed_ips"], "198.19.1.0/24"]
    b.write_config()

    result = b.reload()

    print(f"\nreload: {result['summary']}\nroutes:\n{_routes(b, 4)}")
    assert result["in_place"] == ["a"]
    assert b.peer("a")["mtu"] == mtu
    ours = [line for line in _routes(b, 4).splitlines() if "proto kernel" not in line]
    assert len(ours) == 2  # 198.19.0.1/32 and 198.19.1.0/24
    for line in ours:
        assert f"mtu {mtu}" in line, line
    assert b.ip("-j", "link", "show", b.ifname).stdout == link  # link MTU untouched
    ping = b.ping(a.tunnel4, count=2, size=mtu - 28, dont_fragment=True, interval=0.1)
    assert ping.returncode == 0, ping.stdout
