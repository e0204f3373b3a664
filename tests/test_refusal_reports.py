"""The operator's line about refused key exchanges (``Lifecycle.after_activity``).

``after_activity`` runs for every active peer on every wake-up, so it only walks the
refusal counters when one of them moved (issue 13); these tests hold that the lines
still come, and that what was reported tracks the session's counters exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fakes import ConfigBuilder, Tunnel

from secureiod.daemon.lifecycle import REFUSALS


def _wrong_key_pair(root: Path) -> ConfigBuilder:
    """``b`` names ``a`` with ``c``'s public key: every key exchange ``a`` signs fails
    ``b``'s signature check."""
    builder = ConfigBuilder(root)
    a, b, c = builder.add("a"), builder.add("b"), builder.add("c")
    builder.connect(a, b)
    b.peers["a"]["public_key"] = c.public_key
    return builder


def test_a_wrong_key_is_reported_and_tracked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tunnel = Tunnel(_wrong_key_pair(tmp_path), start=["a", "b"])
    with caplog.at_level(logging.WARNING, logger="secureiod"):
        tunnel.sim.run_for(5.0)
    lines = [r.getMessage() for r in caplog.records if "key exchange refused" in r.getMessage()]
    assert any("peer a:" in line and "kx-bad-signature" in line for line in lines), lines
    peer = tunnel.peer("b", "a")
    assert peer.session is not None and not tunnel.established("b", "a")
    drops = peer.session.stats.drops
    assert drops["kx-bad-signature"] > 0
    # every refusal counted so far has been looked at: the skip leaves nothing behind
    for reason, _text in REFUSALS:
        assert peer.refusals_seen.get(reason, 0) == drops[reason]
    tunnel.close()


def test_a_good_pair_reports_no_refusal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    builder = ConfigBuilder(tmp_path)
    a, b = builder.add("a"), builder.add("b")
    builder.connect(a, b)
    tunnel = Tunnel(builder)
    with caplog.at_level(logging.WARNING, logger="secureiod"):
        tunnel.wait_established(timeout=10)
        for i in range(5):
            tunnel.round_trip("a", "b", seq=i + 1)
    assert not [r for r in caplog.records if "key exchange refused" in r.getMessage()]
    assert tunnel.peer("a", "b").refusals_seen == {}
    tunnel.close()
