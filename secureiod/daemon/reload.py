"""Applying a new config to a running device: the diff, never a restart of the tunnel.

Added peers start, removed peers stop, changed peers get a new session (a new key, PSK,
allowed IPs or endpoint), unchanged peers keep theirs. A config that cannot be loaded, or
that changes what only a restart can change (the private key, the listen address, the
interface name...), is refused as a whole with one error line and the running config
stays: SIGHUP and ``secureioctl reload`` behave the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..config import Config, ConfigError, diff_config, restart_required
from ..control import ControlError
from .lifecycle import Lifecycle
from .ports import NotifierPort
from .routes import Routes

logger = logging.getLogger("secureiod")

IN_PLACE_FIELDS: Final = frozenset({"allowed_ips", "persistent_keepalive"})
"""Peer settings a reload applies to the running session, as WireGuard does; a new key,
PSK or endpoint starts a new session."""

ConfigLoader = Callable[[Path, Config], Config]
"""(path, running config) -> new config; the running one lets the loader reuse what did
not change (the private key, which the dropped user may no longer read)."""


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
    in_place = {n: c for n, c in diff.changed.items() if c.fields <= IN_PLACE_FIELDS}
    renewed = {n: c for n, c in diff.changed.items() if n not in in_place}
    # Removals and the old sides of changes first: an allowed IP may move between peers.
    for name in (*diff.removed, *renewed):
        peer = peers.get(name)
        if peer is not None:
            lifecycle.remove_peer(peer, now, "removed by reload")
    kept = [(peers[n], c.new) for n, c in in_place.items() if n in peers]
    for peer, _ in kept:
        lifecycle.withdraw_routes(peer)
    for peer, pc in kept:
        lifecycle.update_in_place(peer, pc)
    for change in renewed.values():
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


class Reloader:
    """``secureioctl reload`` and SIGHUP: re-read the config file, apply the difference."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        routes: Routes,
        loader: ConfigLoader | None,
        notifier: NotifierPort | None,
        on_done: Callable[[], None],
    ) -> None:
        self.lifecycle = lifecycle
        self.routes = routes
        self.loader = loader
        self.notifier = notifier
        self.on_done = on_done
        self.reloads = 0
        self.refused = 0

    def reload(self, now: float) -> ReloadResult:
        """A config that cannot be loaded or applied is refused with one error line and
        ``ControlError``; the running one stays."""
        config = self.lifecycle.config
        if self.loader is None:
            raise ControlError("reload: the daemon was started without a config file")
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            try:
                result = apply_config(
                    self.lifecycle, self.routes, self.loader(config.path, config), now
                )
            except ConfigError as exc:
                raise self._refused(f"reload refused, keeping the running config: {exc}") from None
            except ControlError as exc:
                raise self._refused(str(exc)) from None
        finally:
            if self.notifier is not None:
                self.notifier.ready()
            self.on_done()
        self.reloads += 1
        logger.info("reloaded: %s", result.summary())
        return result

    def reload_logged(self, now: float) -> None:
        """SIGHUP: a refusal is already logged, and never stops the tunnel."""
        with contextlib.suppress(ControlError):
            self.reload(now)

    def _refused(self, message: str) -> ControlError:
        self.refused += 1
        logger.error("%s", message)
        return ControlError(message)
