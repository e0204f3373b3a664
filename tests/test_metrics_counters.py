"""The counters exported this round: the demultiplexer's decisions and the event loop's
(device-wide, in the metrics and in ``status``) and a session's key-exchange replays (per
peer, in the metrics and in ``peers``). Each is made to move by traffic over the in-memory
world of ``fakes`` and read back through the ``metrics`` control command (parsed by
``prometheus_client``) and the JSON answers, so an export that is missing, misnamed or
reads the wrong field fails here."""

from __future__ import annotations

from pathlib import Path

from fakes import Tunnel, hub_and_spokes, two_sites
from prometheus_client.parser import text_string_to_metric_families

from secureiod.secureio.constants import KX_PACKET_SIZE

STRANGER = ("198.18.0.66", 6666)
IFACE = {"interface": "sio0"}


def scrape(tunnel: Tunnel, site: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value, from ``secureioctl metrics`` run on the site's loop."""
    device = tunnel.devices[site]
    text = tunnel.call(site, lambda _now: device.handle_command("metrics", {}))
    assert isinstance(text, str)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    key = (name, frozenset({**IFACE, **labels}.items()))
    assert key in samples, f"{name}{labels} not exported"
    return samples[key]


def test_demux_counters_move_and_match_status(tmp_path: Path) -> None:
    """b has no endpoint for a: a's signed key exchange wakes it (signature check,
    identified by key exchange); garbage from a stranger costs a cheap check or is dropped
    for its length; a datagram of a from a new port is identified by trial decryption."""
    tunnel = Tunnel(two_sites(tmp_path, b_knows_a=False), start=["b"])
    before = scrape(tunnel, "b")
    assert metric(before, "secureiod_dormant_peers_woken_total") == 0
    assert metric(before, "secureiod_identify_signature_checks_total") == 0
    tunnel.start("a")
    tunnel.wait_established(timeout=10)
    b_addr = tunnel.nodes["b"].address
    for size in (3, 5, 7):  # shorter than any secureio packet
        tunnel.sim.wire.inject(STRANGER, b_addr, bytes(size))
    tunnel.sim.wire.inject(STRANGER, b_addr, b"\x01" * KX_PACKET_SIZE)  # opens under no key
    tunnel.sim.run_for(0.1)
    tunnel.sim.wire.rebind(tunnel.nodes["a"].udp, "198.18.0.1", 30001)
    tunnel.round_trip("a", "b")
    after = scrape(tunnel, "b")
    stats = tunnel.devices["b"].demux.stats
    assert stats.woken == 1 and stats.bad_size == 3
    expected = {
        "secureiod_dormant_peers_woken_total": stats.woken,
        "secureiod_identify_bad_length_datagrams_total": stats.bad_size,
        "secureiod_identify_key_checks_total": stats.key_checks,
        "secureiod_identify_signature_checks_total": stats.signature_checks,
        "secureiod_address_reassignments_total": stats.reassigned,
        "secureiod_path_takeovers_total": stats.path_takeovers,
    }
    for name, count in expected.items():
        assert metric(after, name) == count, name
    kx = metric(after, "secureiod_identified_datagrams_total", method="key-exchange")
    trial = metric(after, "secureiod_identified_datagrams_total", method="trial-decryption")
    assert (kx, trial) == (stats.identified_kx, stats.identified_trial)
    assert kx >= 1 and trial >= 1
    assert metric(after, "secureiod_identify_key_checks_total") > metric(
        before, "secureiod_identify_key_checks_total"
    )
    assert metric(after, "secureiod_identify_signature_checks_total") >= 1
    status = tunnel.devices["b"].status()
    assert status["demux"]["woken"] == 1 and status["demux"]["bad_size"] == 3
    assert status["demux"]["key_checks"] == stats.key_checks > 0
    assert status["demux"]["signature_checks"] == stats.signature_checks >= 1
    assert status["demux"]["identified_trial"] == trial
    assert status["demux"]["unknown_source"] == status["unknown_source"] == 4
    tunnel.close()


def test_an_address_handed_to_another_peer_is_counted(tmp_path: Path) -> None:
    """A NAT gives s1's address to s2: the hub's map says s1, s1's session cannot open
    s2's datagram, s2's can (a reassignment), and s2 takes the address over."""
    tunnel = Tunnel(hub_and_spokes(tmp_path, spokes=2))
    tunnel.wait_established(timeout=10)
    wire, s1, s2 = tunnel.sim.wire, tunnel.nodes["s1"], tunnel.nodes["s2"]
    old = s1.udp.address
    wire.rebind(s1.udp, "198.18.0.99", 40000)
    wire.rebind(s2.udp, old[0], old[1])
    tunnel.round_trip("s2", "hub")
    samples = scrape(tunnel, "hub")
    stats = tunnel.devices["hub"].demux.stats
    assert stats.reassigned >= 1
    assert metric(samples, "secureiod_address_reassignments_total") == stats.reassigned
    assert metric(samples, "secureiod_path_takeovers_total") == stats.path_takeovers
    status = tunnel.devices["hub"].status()
    assert status["demux"]["reassigned"] == stats.reassigned
    assert status["demux"]["path_takeovers"] == stats.path_takeovers
    tunnel.close()


def test_loop_counters_move_and_match_status(tmp_path: Path) -> None:
    tunnel = Tunnel(two_sites(tmp_path))
    tunnel.wait_established(timeout=5)
    before = scrape(tunnel, "a")
    tunnel.round_trip("a", "b")
    loop = tunnel.nodes["a"].loop
    loop.callback_failures += 2  # the sim lets a callback's exception through: set here
    after = scrape(tunnel, "a")
    wakeups = metric(after, "secureiod_loop_wakeups_total")
    assert wakeups > metric(before, "secureiod_loop_wakeups_total")
    assert metric(before, "secureiod_loop_callback_failures_total") == 0
    assert metric(after, "secureiod_loop_callback_failures_total") == 2
    status = tunnel.devices["a"].status()
    assert status["loop"]["callback_failures"] == 2
    assert status["loop"]["wakeups"] == loop.wakeups >= wakeups
    tunnel.close()


def test_key_exchange_replays_are_counted_per_peer(tmp_path: Path) -> None:
    """a's own key exchanges sent again from its address are duplicates at b; a restored
    key (an old key replayed, see test_kx_hardening) is read from the same stats."""
    tunnel = Tunnel(two_sites(tmp_path), start=["b"])
    a_addr, b_addr = tunnel.nodes["a"].address, tunnel.nodes["b"].address
    cap = tunnel.sim.wire.capture(lambda dg: dg.src == a_addr and len(dg.data) == KX_PACKET_SIZE)
    tunnel.start("a")
    tunnel.wait_established(timeout=5)
    tunnel.sim.run_for(0.5)
    before = scrape(tunnel, "b")
    assert metric(before, "secureiod_peer_session_rx_kx_restored_total", peer="a") == 0
    for _ in range(5):
        tunnel.sim.wire.inject(a_addr, b_addr, list(cap)[-1].data)
    tunnel.sim.run_for(0.1)
    session = tunnel.peer("b", "a").session
    assert session is not None
    session.stats.rx_kx_restored += 3  # the scenario itself lives in test_kx_hardening
    after = scrape(tunnel, "b")
    name = "secureiod_peer_session_rx_kx_duplicates_total"
    assert metric(after, name, peer="a") == session.stats.rx_kx_duplicates
    assert metric(after, name, peer="a") >= metric(before, name, peer="a") + 5
    assert metric(after, "secureiod_peer_session_rx_kx_restored_total", peer="a") == 3
    info = tunnel.peer("b", "a").describe(tunnel.sim.now)
    assert info["wire_rx_kx_duplicates"] == session.stats.rx_kx_duplicates
    assert info["wire_rx_kx_restored"] == 3
    tunnel.close()
