"""Prometheus metrics from a real daemon (issue 14): ``metrics_listen`` on the namespace's own
loopback, scraped over HTTP from inside the namespace with urllib after a known number of
pings, parsed with ``prometheus_client``'s parser and checked against the traffic and the
daemon's own ``peers`` answer; a listener on the underlay address, scraped by the peer's
namespace; the listener gone after SIGTERM."""

from __future__ import annotations

import json
import time
from typing import Any

from harness import PYTHON, SECUREIOD, Net, Node, run
from prometheus_client.parser import text_string_to_metric_families

from secureiod.daemon.metrics import COLLECT_INTERVAL

PORT = 9586
PINGS = 20
PING_PAYLOAD = 56
IPV4_PACKET = PING_PAYLOAD + 8 + 20  # ICMP payload + ICMP header + IPv4 header

_SCRAPE = r"""
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as reply:
        sys.stdout.write(reply.headers.get("Content-Type", "") + "\n" + reply.read().decode())
except (OSError, urllib.error.URLError) as exc:
    sys.stdout.write(f"FAILED {type(exc).__name__}: {exc}\n")
"""


def scrape(node: Node, url: str) -> str:
    """GET ``url`` with urllib from inside ``node``'s namespace; the body, or 'FAILED ...'."""
    result = node.exec([PYTHON, "-c", _SCRAPE, url], check=True, timeout=20)
    content_type, _, body = result.stdout.partition("\n")
    if content_type.startswith("FAILED"):
        return content_type
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, read by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def peer_value(values: dict[Any, float], name: str, peer: str) -> float:
    return values[(name, (("interface", "sio0"), ("peer", peer)))]


def with_metrics(net: Net, listen_a: str) -> tuple[Node, Node]:
    a, b = net.pair(start=False)
    a.interface["metrics_listen"] = listen_a
    for node in (a, b):
        node.start(wait=False)
    for node in (a, b):
        node.wait_ready()
    a.wait_established("b")
    b.wait_established("a")
    return a, b


def test_scrape_over_http_in_the_namespace_matches_the_pings(net: Net) -> None:
    a, b = with_metrics(net, f"127.0.0.1:{PORT}")
    url = f"http://127.0.0.1:{PORT}/metrics"
    before = samples(scrape(a, url))
    a.assert_ping(b.tunnel4, count=PINGS, interval=0.02)
    time.sleep(COLLECT_INTERVAL + 0.1)  # scrapes within one interval share one snapshot
    after_text = scrape(a, url)
    after = samples(after_text)

    def moved(name: str) -> float:
        return peer_value(after, name, "b") - peer_value(before, name, "b")

    # A sent PINGS echo requests to b and got PINGS replies (a stray packet or two of the
    # kernel's may ride along, never fewer)
    for direction in ("tx", "rx"):
        packets = moved(f"secureiod_peer_{direction}_packets_total")
        nbytes = moved(f"secureiod_peer_{direction}_bytes_total")
        assert PINGS <= packets <= PINGS + 2, (direction, packets)
        assert nbytes >= PINGS * IPV4_PACKET, (direction, nbytes)
        assert nbytes - PINGS * IPV4_PACKET <= (packets - PINGS) * 1500, (direction, nbytes)
    assert moved("secureiod_peer_session_tx_datagrams_total") >= PINGS
    key = ("secureiod_udp_rx_datagrams_total", (("interface", "sio0"),))
    assert after[key] - before[key] >= PINGS
    # the same numbers the daemon gives on its control socket (the tunnel is idle now)
    peer = a.peer("b")
    again = samples(scrape(a, url))
    for name in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
        metric = f"secureiod_peer_{name}_total"
        assert peer_value(again, metric, "b") == peer_value(after, metric, "b") == peer[name]
    # labels and info
    info = [k for k in after if k[0] == "secureiod_peer_info"]
    assert info == [
        (
            "secureiod_peer_info",
            (
                ("endpoint", "198.18.0.2:5800"),
                ("interface", "sio0"),
                ("peer", "b"),
                ("public_key", b.public_key),
            ),
        )
    ]
    established = (
        "secureiod_peer_session_state",
        (("interface", "sio0"), ("peer", "b"), ("state", "established")),
    )
    assert after[established] == 1
    assert after[("secureiod_peers_established", (("interface", "sio0"),))] == 1
    assert peer_value(after, "secureiod_peer_handshakes_total", "b") >= 1
    assert peer_value(after, "secureiod_peer_route_mtu_bytes", "b") == 1408
    assert after[("process_resident_memory_bytes", ())] > 0
    # secureioctl metrics gives the same families
    ctl_text = a.ctl("metrics").stdout
    assert {f.name for f in text_string_to_metric_families(ctl_text)} == {
        f.name for f in text_string_to_metric_families(after_text)
    }
    # the listener is on a's loopback only: b's namespace cannot reach it over the veth
    assert scrape(b, f"http://198.18.0.1:{PORT}/metrics").startswith("FAILED URLError")
    # and it stops with the daemon
    a.stop()
    assert scrape(a, url).startswith("FAILED URLError")
    assert "Connection refused" in scrape(a, url)


def test_a_listener_written_on_the_underlay_serves_the_peer_and_warns(net: Net) -> None:
    a, b = with_metrics(net, f"198.18.0.1:{PORT}")
    text = scrape(b, f"http://198.18.0.1:{PORT}/metrics")
    values = samples(text)
    assert values[("secureiod_peers", (("interface", "sio0"),))] == 1
    log = a.read_log()
    assert (
        f"metrics on http://198.18.0.1:{PORT}/metrics, not a loopback address: whoever can "
        "reach it reads peer names, public keys, endpoints and traffic counters"
    ) in log
    # the loopback of a's own namespace does not hear it: only the address written
    assert scrape(a, f"http://127.0.0.1:{PORT}/metrics").startswith("FAILED")


def test_show_and_showconf_of_a_running_daemon(net: Net) -> None:
    a, _ = with_metrics(net, f"127.0.0.1:{PORT}")
    shown = json.loads(a.ctl("show", "--json").stdout)
    assert list(shown) == ["sio0"]
    assert shown["sio0"]["status"]["public_key"] == a.public_key
    assert [p["name"] for p in shown["sio0"]["peers"]] == ["b"]
    conf = a.ctl("showconf").stdout
    assert f'metrics_listen = "127.0.0.1:{PORT}"' in conf
    assert f'private_key = "{a.key_path}"' in conf
    assert a.key_path.read_text().strip() not in conf
    # what showconf prints is a config the daemon accepts
    copy = a.dir / "showconf.toml"
    copy.write_text(conf)
    checked = run([SECUREIOD, "--check", "--config", str(copy)])
    assert checked.stdout.startswith(f"{copy}: OK: interface sio0, 1 peer")
