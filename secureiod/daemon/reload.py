"""Applying a new config to a running device: the diff, never a restart of the tunnel.

Added peers start, removed peers stop, changed peers get a new session (a new key, PSK,
allowed IPs or endpoint), unchanged peers keep theirs. A config that cannot be loaded, or
that changes what only a restart can change (the private key, the listen address, the
interface name...), is refused as a whole with one error line and the running config
stays: SIGHUP and ``secureioctl reload`` behave the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config import Config, diff_config, restart_required
from ..control import ControlError
from .lifecycle import Lifecycle
from .routes import Routes

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]

    def summary(self) -> str:
        """ "1 peer changed (b), 0 unchanged" — what an operator reads after a reload."""
        parts = []
        for what, names in (
            ("added", self.added),
            ("removed", self.removed),
            ("changed", self.changed),
        ):
            if names:
                parts.append(f"{_peers(len(names))} {what} ({', '.join(names)})")
        if not parts:
            parts.append("no peer changed")
        parts.append(f"{len(self.unchanged)} unchanged")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
            "summary": self.summary(),
        }


def _peers(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


def apply_config(lifecycle: Lifecycle, routes: Routes, new: Config, now: float) -> ReloadResult:
    """Move the device from ``lifecycle.config`` to ``new``; raises ``ControlError``
    (nothing changed) when only a restart can apply it."""
    old = lifecycle.config
    diff = diff_config(old, new)
    blocking = restart_required(diff)
    if blocking:
        raise ControlError(
            "reload refused: changing " + ", ".join(blocking) + " needs a restart "
            "(systemctl restart secureiod@IFNAME); the running config stays"
        )
    peers = lifecycle.peers
    lifecycle.config = new
    # Removals and the old sides of changes first: an allowed IP may move between peers.
    for name in (*diff.removed, *diff.changed):
        peer = peers.get(name)
        if peer is not None:
            lifecycle.remove_peer(peer, now, "removed by reload")
    for change in diff.changed.values():
        lifecycle.add_peer(change.new, now)
    for pc in diff.added.values():
        lifecycle.add_peer(pc, now)
    for name, pc in diff.unchanged.items():  # keep the session, adopt the new object
        peer = peers.get(name)
        if peer is not None:
            peer.config = pc
    routes.apply_interface(new.interface)
    return ReloadResult(
        added=tuple(sorted(diff.added)),
        removed=tuple(sorted(diff.removed)),
        changed=tuple(sorted(diff.changed)),
        unchanged=tuple(sorted(diff.unchanged)),
    )
