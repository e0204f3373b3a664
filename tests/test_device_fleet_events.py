"""State changes of many peers in one wake-up cost one pass over the peers, not one each.

The status line (sd_notify STATUS=) and the TUN's offload switch are both computed over
every peer. Recomputed per event, 10,000 peers reconnecting together (a hub restarting)
would cost O(peers²) of CPU on the loop; ``Lifecycle.fleet_changed`` settles them once,
after the wake-up's callbacks.
"""

from __future__ import annotations

from pathlib import Path

from fakes import Tunnel, hub_and_spokes

from secureiod.secureio.events import StateChanged
from secureiod.secureio.session import SessionState


def test_many_state_changes_in_one_wake_up_settle_once(tmp_path: Path) -> None:
    tunnel = Tunnel(hub_and_spokes(tmp_path, 12))
    tunnel.wait_established(timeout=5)
    hub = tunnel.devices["hub"]
    node = tunnel.nodes["hub"]
    updates: list[int] = []
    real_update = hub.offload.update
    hub.offload.update = lambda peers: updates.append(1) or real_update(peers)  # type: ignore[method-assign]
    statuses_before = len([c for c in node.notifier.calls if c[0] == "status"])
    now = tunnel.sim.now
    ev = StateChanged(SessionState.ESTABLISHED, SessionState.ESTABLISHED)
    for _ in range(5):
        for peer in hub.peers.values():
            hub.lifecycle.on_event(peer, ev, now)
    assert updates == []  # nothing computed per event
    tunnel.sim.run_for(0.01)
    assert updates == [1]  # one pass for the 60 events
    statuses = [c for c in node.notifier.calls if c[0] == "status"]
    assert len(statuses) - statuses_before <= 1
    assert statuses[-1][1] == "12/12 peers established"
