"""MTU on whole devices: the underlay path decides the payload size each session
negotiates, which becomes the peer's route MTU and (with ``mtu = "auto"``) the link MTU,
as the daemon tells the kernel through netlink (``secureiod.daemon.routes``).
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
from pathlib import Path

import pytest
from fakes import Sim, Tunnel, hub_and_spokes, two_sites, udp4

from secureiod.daemon.offload import SEGMENT_CEILING, gso_max_size_for
from secureiod.daemon.routes import payload_limit_for_mtu
from secureiod.daemon.status import device_status
from secureiod.secureio.constants import PACKET_OVERHEAD

NET = ipaddress.ip_network
A_IP, B_IP = "198.18.0.1", "198.18.0.2"
V4_B, V6_B = NET("198.19.0.2/32"), NET("fd00:5ec::2/128")


def test_a_1500_byte_path_gives_1408(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    netlink = tunnel.nodes["a"].netlink
    assert tunnel.peer("a", "b").session.payload_size == 1408  # type: ignore[union-attr]
    assert netlink.routes[V4_B] == ("sio0", 1408)
    assert netlink.routes[V6_B] == ("sio0", 1408)
    assert netlink.mtu["sio0"] == 1408
    assert tunnel.devices["a"].routes.link_mtu == 1408
    assert tunnel.peer("a", "b").describe(tunnel.sim.now)["mtu"] == 1408


def test_a_smaller_known_path_mtu_is_used_from_the_start(tmp_path: Path) -> None:
    """The kernel knows the path MTU toward b (1400): the session starts from it and the
    tunnel's routes and link follow."""
    sim = Sim()
    sim.wire.link(A_IP, B_IP, mtu=1400)
    tunnel = Tunnel(two_sites(tmp_path), sim=sim)
    tunnel.wait_established(timeout=5)
    size = payload_limit_for_mtu(1400, ipv6=False)
    assert size == 1312
    netlink = tunnel.nodes["a"].netlink
    assert tunnel.peer("a", "b").session.payload_size == size  # type: ignore[union-attr]
    assert netlink.routes[V4_B] == ("sio0", size)
    assert netlink.mtu["sio0"] == size
    assert sim.wire.stats.too_big == 0  # nothing was ever too big
    big = udp4("198.19.0.1", "198.19.0.2", bytes(size - 28))  # fills the route MTU
    tunnel.nodes["a"].tun.inject(big)
    tunnel.sim.run_for(0.1)
    assert tunnel.delivered("b") == [big]


def test_a_black_hole_is_found_by_negotiation(tmp_path: Path) -> None:
    """The path drops datagrams over 1300 bytes without telling anyone (the kernel still
    says 1500): the size negotiation finds what gets through, and the routes say so."""
    sim = Sim()
    sim.wire.link(A_IP, B_IP, mtu=1300, black_hole=True)
    tunnel = Tunnel(two_sites(tmp_path), sim=sim)
    tunnel.wait_established(timeout=30)
    size = tunnel.peer("a", "b").session.payload_size  # type: ignore[union-attr]
    assert size is not None
    assert 1300 - 28 - 64 <= size + PACKET_OVERHEAD <= 1300 - 28
    netlink = tunnel.nodes["a"].netlink
    assert netlink.routes[V4_B] == ("sio0", size)
    assert netlink.routes[V6_B] == ("sio0", 1280)  # IPv6 needs at least 1280 (fragments)
    assert netlink.mtu["sio0"] == 1280
    assert sim.wire.stats.black_holed > 0
    for n in (100, size - 28):
        packet = udp4("198.19.0.1", "198.19.0.2", bytes(n))
        tunnel.nodes["a"].tun.inject(packet)
        tunnel.sim.run_for(0.1)
        assert tunnel.delivered("b") == [packet]


def test_each_peer_gets_its_own_route_mtu_and_the_link_follows_the_largest(
    tmp_path: Path,
) -> None:
    sim = Sim()
    sim.wire.link("198.18.0.1", "198.18.0.2", mtu=1400)
    sim.wire.link("198.18.0.1", "198.18.0.3", mtu=1500)
    sim.wire.link("198.18.0.1", "198.18.0.4", mtu=1350)
    tunnel = Tunnel(hub_and_spokes(tmp_path, hub_knows_spokes=True), sim=sim)
    tunnel.wait_established(timeout=5)
    routes = tunnel.nodes["hub"].netlink.routes
    sizes = {n: payload_limit_for_mtu(m, ipv6=False) for n, m in ((2, 1400), (3, 1500), (4, 1350))}
    for n, size in sizes.items():
        assert routes[NET(f"198.19.0.{n}/32")] == ("sio0", size)
    assert tunnel.nodes["hub"].netlink.mtu["sio0"] == max(sizes.values()) == 1408
    # a spoke's one route (the whole tunnel network) has its own path's size
    assert tunnel.nodes["s3"].netlink.routes[NET("198.19.0.0/24")] == ("sio0", sizes[4])


def test_a_fixed_mtu_caps_routes_and_is_left_alone(tmp_path: Path) -> None:
    builder = two_sites(tmp_path)
    builder.nodes["a"].interface["mtu"] = 1300
    tunnel = Tunnel(builder)
    tunnel.wait_established(timeout=5)
    netlink = tunnel.nodes["a"].netlink
    assert netlink.mtu_history == [("sio0", 1300)]
    assert netlink.routes[V4_B] == ("sio0", 1300)
    assert tunnel.nodes["b"].netlink.routes[NET("198.19.0.1/32")] == ("sio0", 1408)


SPOKE_MTUS = (("s1", 1000), ("s2", 1500), ("s3", 900))


def test_the_device_gso_size_fits_one_send_toward_every_peer(tmp_path: Path) -> None:
    """TSO segments leave in one UDP GSO send (``offload.gso_max_size_for``) toward every
    peer: the TUN device's gso_max_size is the smallest fit of their payload sizes (one
    value, SEGMENT_CEILING, for all common paths), it follows a reload that removes the
    peer that decided, ``status`` shows it, and each value is set once."""
    sim = Sim()
    for n, (_, mtu) in enumerate(SPOKE_MTUS, start=2):
        sim.wire.link("198.18.0.1", f"198.18.0.{n}", mtu=mtu)
    builder = hub_and_spokes(tmp_path, hub_knows_spokes=True)
    tunnel = Tunnel(builder, sim=sim)
    tunnel.wait_established(timeout=5)
    netlink, device = tunnel.nodes["hub"].netlink, tunnel.devices["hub"]
    fits = {n: gso_max_size_for(payload_limit_for_mtu(m, False)) for n, m in SPOKE_MTUS}
    # 64 fragments of 888 and 792 bytes for the narrow paths
    assert fits == {"s1": 56_822, "s2": SEGMENT_CEILING, "s3": 50_678}
    assert netlink.gso_max_size["sio0"] == 50_678
    assert device_status(device, tunnel.sim.now)["gso_max_size"] == 50_678
    # the spoke that decided leaves: the next smallest fit does
    hub = builder.nodes["hub"]
    del hub.peers["s3"]
    hub.write()
    tunnel.call("hub", lambda now: device.reload())
    assert netlink.gso_max_size["sio0"] == 56_822
    # set once per change, not once per peer or packet
    sets = [args[1] for op, args in netlink.calls if op == "set_gso_max_size"]
    assert sets[-1] == 56_822 and len(sets) <= 4
    assert all(a != b for a, b in itertools.pairwise(sets)), sets
    # a two-site tunnel on 1500-byte paths: the common value
    pair = Tunnel(two_sites(tmp_path / "pair"))
    pair.wait_established(timeout=5)
    assert pair.nodes["a"].netlink.gso_max_size["sio0"] == SEGMENT_CEILING == 59_966


def _fixed_mtu_on_a_1000_byte_path(tmp_path: Path, mtu: int) -> Tunnel:
    """Sites a (IPv4 only, for an MTU below IPv6's 1280: ``mtu``) and b, established."""
    sim = Sim()
    sim.wire.link(A_IP, B_IP, mtu=1000)
    builder = two_sites(tmp_path)
    builder.nodes["a"].interface["mtu"] = mtu
    builder.nodes["a"].interface["address"] = ["198.19.0.1/24"]
    tunnel = Tunnel(builder, sim=sim)
    tunnel.wait_established(timeout=5)
    return tunnel


def test_with_a_fixed_mtu_the_gso_size_fits_the_sessions_payload(tmp_path: Path) -> None:
    """A fixed MTU caps the routes, not what the session carries per datagram, which is
    what fragments a segment: on a 1000-byte path (payload 912) with mtu = 900 the fit is
    the payload's (56,822), not the route MTU's (900: 56,054)."""
    tunnel = _fixed_mtu_on_a_1000_byte_path(tmp_path, 900)
    assert tunnel.peer("a", "b").session.payload_size == 912  # type: ignore[union-attr]
    assert tunnel.peer("a", "b").route_mtu == 900
    assert tunnel.nodes["a"].netlink.gso_max_size["sio0"] == gso_max_size_for(912) == 56_822


def test_a_kernel_that_refuses_or_keeps_its_gso_size_costs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before Linux 5.19 the kernel refuses IFLA_GSO_MAX_SIZE on a live link (or may take
    it and keep its own): one warning naming the effect and the fix, the tunnel works,
    ``status`` shows what the device has, and the same value is not asked for again."""
    caplog.set_level(logging.INFO, logger="secureiod")
    tunnel = Tunnel(two_sites(tmp_path), start=[])
    netlink = tunnel.nodes["a"].netlink
    netlink.fail("set_gso_max_size", "set gso_max_size: Operation not supported")
    netlink.gso_max_size_kept = 65_536
    tunnel.nodes["b"].netlink.gso_max_size_kept = 65_536
    tunnel.start("a")
    tunnel.start("b")
    tunnel.wait_established(timeout=5)
    for _ in range(3):
        tunnel.round_trip("a", "b")
    refused = [r.getMessage() for r in caplog.records if "setting gso_max_size" in r.message]
    kept = [r.getMessage() for r in caplog.records if "the kernel kept gso_max_size" in r.message]
    assert len(refused) == 1 and len(kept) == 1, (refused, kept)
    assert "throughput only; Linux 5.19 or later can set it" in refused[0]
    calls = [c for c in netlink.calls if c[0] == "set_gso_max_size"]
    assert calls == [("set_gso_max_size", ("sio0", SEGMENT_CEILING))]
    assert device_status(tunnel.devices["a"], tunnel.sim.now)["gso_max_size"] == 65_536
    assert device_status(tunnel.devices["b"], tunnel.sim.now)["gso_max_size"] == 65_536


def test_a_lowered_gso_size_is_followed_by_a_route_write(tmp_path: Path) -> None:
    """The kernel hands a running TCP socket the new segment size only when the socket
    checks its route: after a lowering (here: the path narrows from 1000 to 900 bytes,
    payload 912 → 816) a route write follows even when the route MTU stays (a fixed
    MTU of 576 caps it), and the size is set before it."""
    tunnel = _fixed_mtu_on_a_1000_byte_path(tmp_path, 576)
    device, netlink = tunnel.devices["a"], tunnel.nodes["a"].netlink
    peer = tunnel.peer("a", "b")
    assert (peer.payload_size, peer.route_mtu, netlink.gso_max_size["sio0"]) == (912, 576, 56_822)
    start = len(netlink.calls)
    device.routes.apply_payload_size(peer, 816, device.peers.values())
    ops = [op for op, _ in netlink.calls[start:]]
    assert ops[0] == "set_gso_max_size" and "replace_route" in ops[1:], ops
    assert (peer.route_mtu, netlink.gso_max_size["sio0"]) == (576, 50_678)
    # raised again: nothing to re-check (a larger value only lets segments grow)
    start = len(netlink.calls)
    device.routes.apply_payload_size(peer, 912, device.peers.values())
    assert [op for op, _ in netlink.calls[start:]] == ["set_gso_max_size"]
