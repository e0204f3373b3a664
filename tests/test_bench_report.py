"""bench/tunnel_report.py: the goals table of ``make bench`` must judge issue 13's goals
from a run's own numbers, and a skipped tunnel must read "not measured", never "met"."""

from __future__ import annotations

from typing import Any

from bench_modules import load_bench

tunnel_report = load_bench("tunnel_report")


def _tunnel(tcp: float, ping: float, udp: int, cpu: float, rss_mib: float) -> dict[str, Any]:
    per_end = {"A": cpu / 2, "B": cpu / 2}
    kib = int(rss_mib * 1024 / 2)
    return {
        "tcp1": {"mbit_s": tcp, "cpu": per_end},
        "tcp4": {"mbit_s": tcp, "cpu": per_end},
        "udp64": {"delivered_pps": udp, "lost_percent": 1.0, "cpu": per_end},
        "ping": {"avg_ms": ping, "cpu": per_end},
        "mem_kib": {"A": {"VmRSS": kib, "VmHWM": kib}, "B": {"VmRSS": kib, "VmHWM": kib}},
    }


def _results(wg: dict[str, Any] | None, peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "config": {"idle_seconds": 10.0},
        "targets": {
            "veth": _tunnel(20_000, 0.05, 400_000, 0, 0) | {"mem_kib": None},
            "secureiod": _tunnel(3_000, 0.5, 60_000, 100, 120),
            "wireguard-go": wg or {"skipped": "wireguard-go, wg not installed"},
            "tinc": {"skipped": "tincd not installed"},
        },
        "many_peers": peers,
    }


def _verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    return {g.goal: g.met for g in tunnel_report.goals(results)}


def test_goals_are_judged_from_the_runs_ratios() -> None:
    wg = _tunnel(2_000, 0.6, 30_000, 100, 300)
    peers = [
        {"peers": 10_000, "ready_s": 4.0, "idle_cpu_percent": 2.5, "mem_kib": {"VmRSS": 140 << 10}}
    ]
    verdicts = _verdicts(_results(wg, peers))
    assert verdicts["TCP 1 stream, secureiod / wireguard-go"] is True  # 1.5 >= 1.2
    assert verdicts["ping RTT avg (20 ms apart), secureiod / wireguard-go"] is True  # 0.83
    assert verdicts["UDP 64 B delivered, secureiod / wireguard-go"] is False  # 2.0 < 3
    # CPU per Gbit/s: 100 % / 3 Gbit/s against 100 % / 2 Gbit/s
    assert verdicts["CPU % per Gbit/s during TCP 1 stream, secureiod / wireguard-go"] is True
    assert verdicts["10,000 peers: ready after (s)"] is True
    assert verdicts["10,000 peers: VmRSS (MiB)"] is True
    assert verdicts["10,000 peers: idle CPU %"] is False


def test_a_skipped_tunnel_or_failed_start_is_not_measured_and_shown() -> None:
    peers = [{"peers": 10_000, "error": "config file is too large"}]
    results = _results(None, peers)
    assert set(_verdicts(results).values()) == {None}
    results["goals"] = tunnel_report.goals_json(results)
    text = tunnel_report.tables(results) + tunnel_report.goals_table(results)
    assert "tinc: skipped (tincd not installed)" in text
    assert "| 10000 | failed: config file is too large |" in text
    assert "| met |" not in text and "not measured" in text


def test_per_round_table_shows_each_rounds_ratio_and_the_medians() -> None:
    wg = _tunnel(2_000, 0.6, 30_000, 100, 300)
    results = _results(wg, [])
    fast = _results(_tunnel(1_000, 0.5, 20_000, 100, 300), [])["targets"]
    results["rounds"] = [results["targets"], fast]
    results["round_notes"] = ["tinc: skipped in round(s) 2 of 2 (x); ..."]
    text = tunnel_report.rounds_table(results)
    lines = text.splitlines()
    assert lines[0] == "| secureiod / wireguard-go | round 1 | round 2 | median |"
    # secureiod 3000 Mbit/s against 2000 in round 1 and 1000 in round 2: the median of the
    # rounds' own ratios (1.5 and 3.0), not the ratio in the targets (1.5)
    assert "| TCP 1 | 1.50 | 3.00 | 2.25 |" in lines
    assert "| UDP 64 B | 2.00 | 3.00 | 2.50 |" in lines
    assert "| ping | 0.83 | 1.00 | 0.92 |" in lines
    assert lines[-1].startswith("tinc: skipped in round(s) 2 of 2")


def test_every_ratio_goal_takes_the_rounds_own_ratios_and_counts_them() -> None:
    """All six ratio goals, with rounds whose targets-based ratios would give the opposite
    verdict; a round where wireguard-go did not run is left out of the median and the
    count; and the per-round table shows the CPU ratios the goals use. secureiod is 3000
    Mbit/s, 0.5 ms, 60,000 datagrams/s at 100 % CPU (33.3 % per Gbit/s) in every round."""
    wgs = [
        _tunnel(2_000, 0.4, 15_000, 200, 300),  # TCP 1.5, ping 1.25, UDP 4.0, CPU 0.33
        _tunnel(2_600, 0.6, 25_000, 80, 300),  # TCP 1.15, ping 0.83, UDP 2.4, CPU 1.08
        _tunnel(2_400, 0.55, 18_000, 150, 300),  # TCP 1.25, ping 0.91, UDP 3.33, CPU 0.53
        {"skipped": "wireguard-go did not come up"},
        None,
    ]
    rounds = [_results(wg, [])["targets"] for wg in wgs]
    results = _results(_tunnel(2_600, 0.4, 25_000, 80, 300), [])
    results["rounds"] = rounds
    goals = tunnel_report.goals(results)
    expected = [1.25, 1.25, 0.91, 3.33, 0.53, 0.53]
    assert [round(g.value, 2) for g in goals[:6] if g.value is not None] == expected
    assert [g.met for g in goals[:6]] == [True] * 6
    assert [g.rounds_met for g in goals[:6]] == [(2, 3)] * 6
    del results["rounds"]  # the ratios of the targets alone: 1.15, 1.15, 1.25, 2.4, 1.08, 1.08
    assert [g.met for g in tunnel_report.goals(results)[:6]] == [False] * 6
    results["rounds"] = rounds
    results["goals"] = tunnel_report.goals_json(results)
    assert "| met | 2 of 3 |" in tunnel_report.goals_table(results)
    table = tunnel_report.rounds_table(results).splitlines()
    assert "| CPU per Gbit/s, TCP 1 | 0.33 | 1.08 | 0.53 | - | - | 0.53 |" in table


def test_goals_take_the_median_of_the_rounds_own_ratios() -> None:
    """Each round pairs the two tunnels measured minutes apart; the goals take the median
    of those ratios. The ratio of the two tunnels' median rounds would pair secureiod's
    round with another round's wireguard-go (here 3000 / 2600: not met)."""
    rounds = [
        _results(_tunnel(wg_tcp, 0.6, 30_000, 100, 300), [])["targets"]
        for wg_tcp in (2_000, 2_600, 2_400)
    ]
    results = _results(_tunnel(2_600, 0.6, 30_000, 100, 300), [])
    results["rounds"] = rounds
    goal = next(g for g in tunnel_report.goals(results) if g.goal.startswith("TCP 1 stream"))
    assert goal.value is not None and round(goal.value, 2) == 1.25  # 1.5, 1.15, 1.25
    assert goal.met is True
    del results["rounds"]
    assert _verdicts(results)["TCP 1 stream, secureiod / wireguard-go"] is False


def test_no_per_round_table_for_a_one_round_run() -> None:
    results = _results(_tunnel(2_000, 0.6, 30_000, 100, 300), [])
    assert tunnel_report.rounds_table(results) == ""  # no "rounds": an older JSON
    results["rounds"] = [results["targets"]]
    assert tunnel_report.rounds_table(results) == ""


def test_many_peers_goals_take_the_worst_start_and_count_the_starts() -> None:
    """Three starts with 10,000 peers: one slow start fails the goal even though the other
    two met it, and the table says how many met it on their own."""
    peers = [
        {
            "peers": n,
            "ready_s": s,
            "idle_cpu_percent": c,
            "mem_kib": {"VmRSS": m << 10, "VmHWM": m << 10},
        }
        for n, s, c, m in (
            (1_000, 9.0, 5.0, 70),  # not a goal
            (10_000, 3.0, 0.4, 90),
            (10_000, 5.2, 0.5, 95),
            (10_000, 4.0, 0.9, 91),
        )
    ]
    goals = {g.goal: g for g in tunnel_report.goals(_results(None, peers))}
    ready = goals["10,000 peers: ready after (s)"]
    assert (ready.value, ready.met, ready.rounds_met) == (5.2, False, (2, 3))
    rss = goals["10,000 peers: VmRSS (MiB)"]
    assert (rss.value, rss.met, rss.rounds_met) == (95.0, True, (3, 3))
    idle = goals["10,000 peers: idle CPU %"]
    assert (idle.value, idle.met, idle.rounds_met) == (0.9, True, (3, 3))
    results = _results(None, peers)
    results["goals"] = tunnel_report.goals_json(results)
    assert "| 10,000 peers: ready after (s) | 5.20 | < 5 | not met | 2 of 3 |" in (
        tunnel_report.goals_table(results)
    )
    table = tunnel_report.many_peers_table(results).splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == [
        "| 1000", "| 10000", "| 10000", "| 10000", "| goal for 10,000 (issue 13)"
    ]  # fmt: skip


def test_many_peers_goals_are_not_measured_when_one_start_failed() -> None:
    """A failed start is not a sample to leave out: the goal cannot be judged."""
    peers = [
        {"peers": 10_000, "ready_s": 3.0, "idle_cpu_percent": 0.4, "mem_kib": {"VmRSS": 90 << 10}},
        {"peers": 10_000, "error": "control socket did not answer within 60 s"},
    ]
    goals = [g for g in tunnel_report.goals(_results(None, peers)) if "10,000" in g.goal]
    assert len(goals) == 3 and {g.met for g in goals} == {None}


def test_a_start_that_loaded_fewer_peers_is_not_a_sample() -> None:
    """``status`` answered, but with 9,000 of the 10,000 peers: not met, not measured."""
    peer = {"peers": 10_000, "ready_s": 3.0, "idle_cpu_percent": 0.4}
    peer["mem_kib"] = {"VmRSS": 90 << 10, "VmHWM": 90 << 10}
    peers = [peer | {"peers_total": 10_000}, peer | {"peers_total": 9_000}]
    goals = [g for g in tunnel_report.goals(_results(None, peers)) if "10,000" in g.goal]
    assert {g.met for g in goals} == {None}
    assert {
        g.met for g in tunnel_report.goals(_results(None, peers[:1])) if "10,000" in g.goal
    } == {True}
