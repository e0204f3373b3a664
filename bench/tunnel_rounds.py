"""How ``bench/tunnel.py`` turns several rounds of measurements into one set of numbers.

The box's speed drifts by tens of percent over minutes and one short sample per tunnel is
noisy, so a single pass cannot resolve a 1.2x goal. The run therefore measures every tunnel
once per round, the rounds one after another (so the tunnels are interleaved in time and a
slow minute hurts them all alike), and reports, per tunnel and per measurement, the round
whose primary value is the median. The whole dict of that round is kept, not a median of each
field, so the CPU figures always belong to the throughput they were measured with.

Pure functions over plain dicts: no namespaces, so the unit tests can check them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

# the number that ranks a measurement's rounds
PRIMARY: dict[str, str] = {
    "tcp1": "mbit_s",
    "tcp4": "mbit_s",
    "udp64": "delivered_pps",
    "ping": "avg_ms",
}


def _value(measurement: Any, field: str) -> float | None:
    if not isinstance(measurement, dict):
        return None
    v = measurement.get(field)
    if isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    return None


def median_round(samples: list[Any], field: str) -> int | None:
    """Index into ``samples`` of the one whose ``field`` is the median (``median_low``, so
    it is always a value that was measured); the first such sample on a tie; None if no
    sample has the field (every round failed that measurement)."""
    values = [(i, v) for i, s in enumerate(samples) if (v := _value(s, field)) is not None]
    if not values:
        return None
    chosen = statistics.median_low(v for _, v in values)
    return next(i for i, v in values if v == chosen)


@dataclass(frozen=True)
class Aggregate:
    """One tunnel over all rounds: what the tables read, and a note when rounds are missing."""

    target: dict[str, Any]
    note: str | None = None


def aggregate_tunnel(name: str, rounds: list[dict[str, Any] | None]) -> Aggregate:
    """``rounds[i]`` is the tunnel's dict in round i (None: the round did not reach it).

    Skipped in every round: the last ``{"skipped": reason}``. Otherwise the rounds that ran
    are merged: each measurement key from its median round, every other field (memory,
    MTU, peer counters, version) from the last round that ran."""
    total = len(rounds)
    ran = [(i, r) for i, r in enumerate(rounds) if r is not None and "skipped" not in r]
    if not ran:
        last = next((r for r in reversed(rounds) if r is not None), None)
        return Aggregate(last if last is not None else {"skipped": "not run"})
    target = dict(ran[-1][1])  # key order as in one round: the JSON reads like today's
    for key, field in PRIMARY.items():
        samples = [r.get(key) for _, r in ran]
        pick = median_round(samples, field)
        if pick is not None:
            target[key] = samples[pick]
        elif key not in target:
            # no round has the number: keep the last round's entry (an error, say) if any
            present = [s for s in samples if s is not None]
            if present:
                target[key] = present[-1]
    note = None
    if len(ran) < total:
        missed = [i for i in range(total) if i not in {j for j, _ in ran}]
        reasons = sorted(
            {str(rounds[i]["skipped"]) for i in missed if rounds[i] is not None}  # type: ignore[index]
        )
        note = (
            f"{name}: skipped in round(s) {', '.join(str(i + 1) for i in missed)} of {total}"
            + (f" ({'; '.join(reasons)})" if reasons else "")
            + f"; its numbers are the median of the other {len(ran)}"
        )
    return Aggregate(target, note)


def aggregate(rounds: list[dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], list[str]]:
    """``rounds``: each round's ``targets``. Returns the targets the report reads (the same
    shape as one round's) and the notes on tunnels skipped in some rounds only."""
    names: list[str] = []
    for r in rounds:
        names += [n for n in r if n not in names]
    targets: dict[str, Any] = {}
    notes: list[str] = []
    for name in names:
        agg = aggregate_tunnel(name, [r.get(name) for r in rounds])
        targets[name] = agg.target
        if agg.note:
            notes.append(agg.note)
    return targets, notes
