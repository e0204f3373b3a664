"""bench/tunnel_rounds.py: ``make bench`` reports, per tunnel and measurement, the round whose
number is the median, and keeps that round's whole dict so CPU stays with its throughput."""

from __future__ import annotations

from typing import Any

from bench_modules import load_bench

tunnel_rounds = load_bench("tunnel_rounds")


def _tunnel(tcp: float, udp: int, ping: float, cpu: float, rss: int = 1000) -> dict[str, Any]:
    """One round of one tunnel, shaped like tunnel_measure.measure's output; the CPU figure
    is tagged with the throughput so a test can see which round it came from."""
    return {
        "address": "198.19.0.2",
        "tcp1": {"mbit_s": tcp, "retransmits": 0, "cpu": {"A": cpu, "B": cpu}},
        "tcp4": {"mbit_s": tcp * 1.1, "retransmits": 0, "cpu": {"A": cpu, "B": cpu}},
        "udp64": {"delivered_pps": udp, "lost_percent": 1.0, "cpu": {"A": cpu, "B": cpu}},
        "ping": {"avg_ms": ping, "cpu": {"A": cpu, "B": cpu}},
        "mem_kib": {"A": {"VmRSS": rss, "VmHWM": rss}, "B": {"VmRSS": rss, "VmHWM": rss}},
        "mtu": 1400,
    }


def test_odd_count_takes_the_median_round_whole_with_its_cpu() -> None:
    rounds = [
        _tunnel(tcp=100, udp=9, ping=0.3, cpu=1, rss=111),
        _tunnel(tcp=300, udp=7, ping=0.1, cpu=3, rss=333),
        _tunnel(tcp=200, udp=8, ping=0.2, cpu=2, rss=222),
    ]
    agg = tunnel_rounds.aggregate_tunnel("secureiod", rounds)
    t = agg.target
    assert t["tcp1"] == rounds[2]["tcp1"]  # 200 of 100, 300, 200
    assert t["tcp1"]["cpu"] == {"A": 2, "B": 2}  # the CPU measured with those 200 Mbit/s
    assert t["udp64"] == rounds[2]["udp64"]  # 8 of 9, 7, 8
    assert t["ping"] == rounds[2]["ping"]  # 0.2 of 0.3, 0.1, 0.2
    # a different median round per measurement: each key is picked on its own
    rounds[0]["ping"] = {"avg_ms": 0.15, "cpu": {"A": 9, "B": 9}}
    t = tunnel_rounds.aggregate_tunnel("secureiod", rounds).target
    assert t["ping"] == {"avg_ms": 0.15, "cpu": {"A": 9, "B": 9}}
    assert t["tcp1"]["mbit_s"] == 200
    # fields that are not measurements come from the last round that ran
    assert t["mem_kib"]["A"]["VmRSS"] == 222
    assert agg.note is None


def test_even_count_takes_the_lower_middle_and_a_tie_the_first() -> None:
    rounds = [_tunnel(tcp, 1, 1.0, cpu) for tcp, cpu in ((400, 4), (100, 1), (300, 3), (200, 2))]
    t = tunnel_rounds.aggregate_tunnel("x", rounds).target
    assert t["tcp1"]["mbit_s"] == 200 and t["tcp1"]["cpu"]["A"] == 2  # median_low of 4
    pair = [_tunnel(500, 1, 1.0, 5), _tunnel(100, 1, 1.0, 1)]
    assert tunnel_rounds.aggregate_tunnel("x", pair).target["tcp1"]["mbit_s"] == 100
    same = [_tunnel(100, 1, 1.0, cpu) for cpu in (7, 8, 9)]
    assert tunnel_rounds.aggregate_tunnel("x", same).target["tcp1"]["cpu"]["A"] == 7


def test_a_round_missing_a_number_is_left_out_of_that_measurement_only() -> None:
    rounds = [_tunnel(100, 10, 1.0, 1), _tunnel(200, 20, 2.0, 2), _tunnel(300, 30, 3.0, 3)]
    rounds[1]["tcp1"] = {"error": "unable to connect"}  # iperf3 failed in round 2
    del rounds[2]["udp64"]
    t = tunnel_rounds.aggregate_tunnel("x", rounds).target
    assert t["tcp1"]["mbit_s"] == 100  # median_low of 100 and 300
    assert t["udp64"]["delivered_pps"] == 10  # median_low of 10 and 20
    assert t["ping"]["avg_ms"] == 2.0  # the other measurements use all three rounds
    # every round failed: the error is kept, as a one-round run would show it
    for r in rounds:
        r["tcp4"] = {"error": "timeout"}
    assert tunnel_rounds.aggregate_tunnel("x", rounds).target["tcp4"] == {"error": "timeout"}


def test_skipped_in_every_round_stays_skipped_and_in_some_gets_a_note() -> None:
    skip = {"skipped": "tincd not installed"}
    agg = tunnel_rounds.aggregate_tunnel("tinc", [skip, skip, skip])
    assert agg.target == {"skipped": "tincd not installed"} and agg.note is None

    rounds = [
        _tunnel(100, 1, 1.0, 1),
        {"skipped": "wireguard-go did not come up"},
        _tunnel(300, 3, 3.0, 3),
    ]
    agg = tunnel_rounds.aggregate_tunnel("wireguard-go", rounds)
    assert "skipped" not in agg.target
    assert agg.target["tcp1"]["mbit_s"] == 100  # median_low of the two rounds that ran
    assert agg.note is not None and "\n" not in agg.note
    assert "wireguard-go" in agg.note and "round(s) 2 of 3" in agg.note
    assert "did not come up" in agg.note and "other 2" in agg.note


def test_one_round_is_returned_unchanged_in_shape_and_order() -> None:
    one = {
        "veth": _tunnel(20_000, 400_000, 0.05, 0) | {"mem_kib": {}},
        "secureiod": _tunnel(3_000, 60_000, 0.5, 50) | {"offload": True, "peer_a": {"rx": 1}},
        "wireguard-go": _tunnel(2_000, 30_000, 0.6, 60) | {"version": "0.0.20250522"},
        "tinc": {"skipped": "--skip tinc"},
    }
    targets, notes = tunnel_rounds.aggregate([one])
    assert targets == one and notes == []
    assert list(targets) == list(one)
    assert all(list(targets[n]) == list(one[n]) for n in one)


def test_aggregate_over_rounds_names_every_tunnel_and_collects_notes() -> None:
    r1 = {"secureiod": _tunnel(100, 1, 1.0, 1), "nebula": {"skipped": "no nebula"}}
    r2 = {"secureiod": _tunnel(300, 3, 3.0, 3), "nebula": _tunnel(50, 1, 1.0, 1)}
    r3 = {"secureiod": _tunnel(200, 2, 2.0, 2), "nebula": _tunnel(70, 1, 1.0, 1)}
    targets, notes = tunnel_rounds.aggregate([r1, r2, r3])
    assert list(targets) == ["secureiod", "nebula"]
    assert targets["secureiod"]["tcp1"]["mbit_s"] == 200
    assert targets["nebula"]["tcp1"]["mbit_s"] == 50
    assert len(notes) == 1 and notes[0].startswith("nebula: skipped in round(s) 1 of 3")
