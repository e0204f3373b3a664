"""A TUN device someone else made (issue 11, "the daemon owns only what it created"): a
persistent ``sio0`` with the administrator's MTU 9000. The daemon attaches to it, sets its
own MTU while it runs, and gives 9000 back at SIGTERM, and also at the next start after
a ``kill -9`` (then the link keeps the killed daemon's MTU until that start). The device
itself stays: it was never the daemon's to remove.
"""

from __future__ import annotations

import json
import signal

from harness import Net, Node

ADMIN_MTU = 9000
ADMIN_GSO = 32768


def _mtu(node: Node) -> int:
    text = node.ip("link", "show", "sio0").stdout
    return int(text.split(" mtu ", 1)[1].split()[0])


def _gso_max_size(node: Node) -> int:
    (link,) = json.loads(node.ip("-d", "-j", "link", "show", "sio0").stdout)
    return int(link["gso_max_size"])


def _sigterm(node: Node) -> None:
    """SIGTERM without ``Node.stop``'s check that the device is gone (it must stay)."""
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(10) == 0, node.log_tail()


def test_a_persistent_tun_keeps_its_mtu_and_stays(net: Net) -> None:
    a, b = net.pair(start=False)
    a.ip("tuntap", "add", "dev", "sio0", "mode", "tun")
    a.ip("link", "set", "sio0", "mtu", str(ADMIN_MTU), "gso_max_size", str(ADMIN_GSO))
    b.start()
    a.start()
    a.wait_established("b")
    assert _mtu(a) != ADMIN_MTU
    assert f"sio0 existed before this daemon: its MTU {ADMIN_MTU} is given back" in a.read_log()
    # its segment size stays the administrator's; the log says what would fit, status
    # claims nothing
    assert _gso_max_size(a) == ADMIN_GSO and a.status()["gso_max_size"] is None
    assert "`ip link set sio0 gso_max_size 59966` lets each TCP segment" in a.read_log()
    a.assert_ping(b.tunnel4, count=2, interval=0.05)
    _sigterm(a)
    assert _mtu(a) == ADMIN_MTU
    assert "inet " not in a.ip("addr", "show", "sio0").stdout  # its addresses went too

    a.start()
    a.wait_established("b")
    a.kill9()
    assert _mtu(a) != ADMIN_MTU  # what the killed daemon left
    a.start()
    log = a.read_log().split("--- harness: start #3 ---")[1]
    assert "a previous secureiod for this interface stopped without cleaning up" in log
    assert "1 MTU" in log
    assert f"its MTU {ADMIN_MTU} is given back" in log  # the true one, not the killed one's
    a.wait_established("b")
    _sigterm(a)
    assert _mtu(a) == ADMIN_MTU
    assert not (a.dir / "sio0.owned").exists()
    a.ip("link", "del", "sio0")
    b.stop()
