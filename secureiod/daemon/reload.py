"""Applying a new config to a running device: the diff, never a restart of the tunnel.

Added peers start, removed peers stop, changed peers get a new session (a new key, PSK
or endpoint) or keep theirs (allowed IPs, keepalive), unchanged peers keep theirs. A config
that cannot be loaded, or that changes what only a restart can change (the private key,
the listen address, the interface name...), is refused as a whole with one error line and
the running config stays: SIGHUP and ``secureioctl reload`` behave the same.

A reload is applied in three steps so that a refusal by the host never leaves half of it:
first what can fail without changing anything (socket addresses of the endpoints), then
what asks the kernel for something new (routes, addresses, a fixed MTU: all or nothing,
``Routes.prepare_reload``), and only then the peers and sessions, in memory. Nothing that
goes wrong in a reload stops the daemon.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..config import (
    Config,
    ConfigDiff,
    ConfigError,
    PeerChange,
    diff_config,
    restart_required,
)
from ..control import ControlError
from ..endpoint import Address
from ..paths import config_path
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
    """Every changed peer: ``in_place`` ones kept their session, the others got a new one."""
    unchanged: tuple[str, ...]
    in_place: tuple[str, ...] = ()
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Changed peer -> the keys that changed."""
    interface: tuple[str, ...] = ()
    """The ``[interface]`` keys that changed, in file order."""
    restarted: tuple[str, ...] = ()
    """Peers that kept their config but got a new session (a new key_update_interval)."""

    def summary(self) -> str:
        """ "interface changed (mtu); 1 peer changed in place (c: allowed_ips); 2 unchanged"
        — what an operator reads after a reload, in the log and from ``secureioctl``."""
        parts = []
        if self.interface:
            parts.append(f"interface changed ({', '.join(self.interface)})")
        for what, names in (("added", self.added), ("removed", self.removed)):
            if names:
                parts.append(f"{_peers(len(names))} {what} ({', '.join(names)})")
        renewed = tuple(n for n in self.changed if n not in self.in_place)
        for what, names in (("with a new session", renewed), ("in place", self.in_place)):
            if names:
                detail = "; ".join(f"{n}: {', '.join(self.fields.get(n, ()))}" for n in names)
                parts.append(f"{_peers(len(names))} changed {what} ({detail})")
        if self.restarted:
            n = len(self.restarted)
            parts.append(
                f"{n} session{'' if n == 1 else 's'} restarted for the new key_update_interval "
                f"({', '.join(self.restarted)})"
            )
        if not parts:
            parts.append("nothing changed")
        parts.append(f"{len(self.unchanged)} unchanged")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
            "in_place": list(self.in_place),
            "fields": {n: list(f) for n, f in self.fields.items()},
            "interface": list(self.interface),
            "restarted": list(self.restarted),
            "summary": self.summary(),
        }


def _peers(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


class ReloadFailed(Exception):
    """The host refused part of a reload, and everything it had done was undone; or, with
    ``partial``, a bug broke it off after the kernel said yes (see ``running_config``)."""

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


def restart_hint(config: Config) -> str:
    """How to restart this daemon: its systemd unit when it reads the standard file."""
    stem = config.path.stem
    if config.path == config_path(stem):
        return f"systemctl restart secureiod@{stem}"
    return f"restart secureiod --config {config.path}"


def apply_config(lifecycle: Lifecycle, routes: Routes, new: Config, now: float) -> ReloadResult:
    """Move the device from ``lifecycle.config`` to ``new``. Raises ``ControlError`` when
    only a restart can apply it and ``ReloadFailed`` when the host refuses a part; in both
    cases nothing changed (see the module docstring)."""
    old = lifecycle.config
    diff = diff_config(old, new)
    blocking = restart_required(diff)
    if blocking:
        raise ControlError(
            "reload refused: changing " + ", ".join(blocking) + " needs a restart "
            f"({restart_hint(old)}); the running config stays"
        )
    peers = lifecycle.peers
    in_place = {n: c for n, c in diff.changed.items() if c.fields <= IN_PLACE_FIELDS and n in peers}
    renewed = {n: c for n, c in diff.changed.items() if n not in in_place}
    starting = [c.new for c in renewed.values()] + list(diff.added.values())

    # 1. what can fail without changing anything
    endpoints: dict[str, Address | None] = {}
    for pc in starting:
        try:
            endpoints[pc.name] = lifecycle.endpoint_for(pc)
        except (OSError, ValueError) as exc:
            raise ReloadFailed(f"peer {pc.name}: endpoint {pc.endpoint}: {exc}") from None

    # 2. the kernel: all or nothing
    going = [peers[n].config for n in (*diff.removed, *renewed, *in_place) if n in peers]
    try:
        routes.prepare_reload(going, [c.new for c in in_place.values()] + starting, new.interface)
    except Exception as exc:
        raise ReloadFailed(str(exc)) from None

    # 3. peers and sessions, in memory
    try:
        restarted = _switch_peers(lifecycle, new, diff, in_place, renewed, endpoints, now)
        routes.finish_reload(new.interface, peers.values())
    except Exception as exc:  # a bug: keep a config that says what really runs
        lifecycle.config = running_config(lifecycle, routes, new)
        raise ReloadFailed(
            f"{type(exc).__name__}: {exc}; the running config now lists what is really "
            "applied, and the next reload retries the rest",
            partial=True,
        ) from exc
    return ReloadResult(
        added=tuple(sorted(diff.added)),
        removed=tuple(sorted(diff.removed)),
        changed=tuple(sorted(diff.changed)),
        unchanged=tuple(sorted(diff.unchanged)),
        in_place=tuple(sorted(in_place)),
        fields={n: _ordered(c.old, c.fields) for n, c in sorted(diff.changed.items())},
        interface=_ordered(new.interface, diff.interface_changed),
        restarted=tuple(sorted(restarted)),
    )


def _switch_peers(
    lifecycle: Lifecycle,
    new: Config,
    diff: ConfigDiff,
    in_place: Mapping[str, PeerChange],
    renewed: Mapping[str, PeerChange],
    endpoints: Mapping[str, Address | None],
    now: float,
) -> list[str]:
    """Step 3 of ``apply_config``; returns the peers restarted for a new key interval."""
    peers = lifecycle.peers
    lifecycle.config = new
    for name in (*diff.removed, *renewed):
        peer = peers.get(name)
        if peer is not None:
            lifecycle.remove_peer(peer, now, "removed by reload")
    kept = [(peers[n], c.new) for n, c in in_place.items()]
    for peer, _ in kept:  # all leave before any comes back: a prefix may move between them
        lifecycle.withdraw_routes(peer)
    for peer, pc in kept:
        lifecycle.update_in_place(peer, pc)
    for pc in [c.new for c in renewed.values()] + list(diff.added.values()):
        lifecycle.start_peer(pc, endpoints[pc.name], now)
    for name, pc in diff.unchanged.items():  # keep the session, adopt the new object
        peer = peers.get(name)
        if peer is not None:
            peer.config = pc
    return lifecycle.apply_timing(now)


def _ordered(instance: Any, names: Iterable[str]) -> tuple[str, ...]:
    """``names`` in the order of ``instance``'s fields (the order of the file)."""
    wanted = set(names)
    return tuple(f.name for f in dataclasses.fields(instance) if f.name in wanted)


def running_config(lifecycle: Lifecycle, routes: Routes, wanted: Config) -> Config:
    """The config the device really runs, after a reload broke off in the middle: the
    peers it has and the interface as applied. Kept as ``lifecycle.config`` so that the
    next reload compares the file with the truth and retries what is missing."""
    return dataclasses.replace(
        wanted,
        interface=routes.interface,
        peers=tuple(p.config for p in lifecycle.peers.values()),
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
        ``ControlError``; the running one stays. Whatever goes wrong, the daemon keeps
        running: an unexpected error is a refusal too (logged with its type), never an
        exception that reaches the event loop."""
        config = self.lifecycle.config
        if self.loader is None:
            raise ControlError("reload: the daemon was started without a config file")
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            try:
                new = self.loader(config.path, config)
                result = apply_config(self.lifecycle, self.routes, new, now)
            except ConfigError as exc:
                raise self._refused(f"reload refused, keeping the running config: {exc}") from None
            except ControlError as exc:
                raise self._refused(str(exc)) from None
            except ReloadFailed as exc:
                what = "applied in part" if exc.partial else "keeping the running config"
                raise self._refused(f"reload failed, {what}: {exc}") from None
            except Exception as exc:  # a bug: one line, the traceback only when debugging
                logger.debug("reload failed", exc_info=True)
                raise self._refused(f"reload failed: {type(exc).__name__}: {exc}") from None
        finally:
            if self.notifier is not None:
                self.notifier.ready()
            self.on_done()
        self.reloads += 1
        changed = result.added or result.removed or result.changed or result.interface
        logger.log(logging.INFO if changed else logging.DEBUG, "reloaded: %s", result.summary())
        return result

    def reload_logged(self, now: float) -> None:
        """SIGHUP: a refusal is already logged, and nothing stops the tunnel (an error in
        telling systemd is logged too)."""
        try:
            self.reload(now)
        except ControlError:
            pass
        except Exception as exc:
            logger.error("reload: %s: %s", type(exc).__name__, exc)

    def _refused(self, message: str) -> ControlError:
        self.refused += 1
        text = " ".join(message.split())  # one line, whatever the error said
        logger.error("%s", text)
        return ControlError(text)
