"""The device: one TUN, one UDP socket, one session per peer — wiring only.

Each concern lives in its own module (see the package docstring and README "How the daemon
is built", which walks one datagram through them); ``Device`` builds them, registers the
two data descriptors with the event loop and, after every wake-up, flushes each peer that
the wake-up touched once: its aggregated messages go out, its events not yet delivered
are (what a socket read brought is delivered right after that read: ``ReceivePath.on_udp``),
its timer is re-armed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from ..config import Config
from ..control import DEFAULT_LIMITS, ControlError
from ..endpoint import Address
from ..secureio.demux import Demultiplexer
from .allowed_ips import AllowedIPs
from .control import ControlServer
from .gate import CommandGate
from .lifecycle import Lifecycle
from .lone import LoneHop
from .metrics import Metrics
from .offload import LOSS_CHECK_INTERVAL, OffloadCaps
from .peer import Peer
from .ports import ClockPort, LoopPort, NetlinkPort, NotifierPort, ResolverPort, TunPort, UdpPort
from .receive import ReceivePath
from .reload import ConfigLoader, Reloader, ReloadResult
from .routes import Routes
from .send import BatchSize, SendPath
from .status import device_status, running_config_toml, status_line

logger = logging.getLogger("secureiod")

WATCHDOG_FRACTION: Final = 0.5


class Device:
    def __init__(
        self,
        config: Config,
        *,
        tun: TunPort,
        udp: UdpPort,
        netlink: NetlinkPort,
        notifier: NotifierPort | None,
        resolver: ResolverPort,
        loop: LoopPort,
        clock: ClockPort,
        control_path: Path | None = None,
        config_loader: ConfigLoader | None = None,
        watchdog_interval: float | None = None,
    ) -> None:
        self.tun = tun
        self.udp = udp
        self.loop = loop
        self.clock = clock
        self.notifier = notifier
        self.resolver = resolver
        self.watchdog_interval = watchdog_interval
        self.ifname = tun.name
        self.peers: dict[str, Peer] = {}
        self.dirty: set[Peer] = set()
        self.router: AllowedIPs[Peer] = AllowedIPs()
        self.demux: Demultiplexer[Peer] = Demultiplexer()
        # A persistent TUN someone else made outlives us: what we change on it goes back.
        # (``preexisted`` is the real adapter's; a port without it is a device we made.)
        created = not getattr(tun, "preexisted", False)
        self.routes = Routes(netlink, self.ifname, config.interface, created=created)
        # One BatchSize per descriptor; the loop's wake-up count tells a queue from a lone packet.
        wake_count = (lambda: loop.wakeups) if hasattr(loop, "wakeups") else None
        self.send = SendPath(tun, udp, self.router, self.dirty, BatchSize(wake_count))
        self.offload = OffloadCaps(tun, self.send.write, self.ifname)
        self.lifecycle = Lifecycle(
            config,
            peers=self.peers,
            router=self.router,
            demux=self.demux,
            routes=self.routes,
            offload=self.offload,
            send=self.send,
            loop=loop,
            clock=clock,
            resolver=resolver,
            udp_family=udp.family,
            on_status=self._update_status,
        )
        self.receive = ReceivePath(
            tun,
            udp,
            self.demux,
            self.router,
            self.dirty,
            BatchSize(wake_count),
            on_caps=lambda peer, payload: self.offload.on_caps(peer, payload, self.peers.values()),
            on_event=self.lifecycle.on_event,
        )
        # bound before the control socket: a metrics_listen in use then leaves nothing behind
        self.metrics = Metrics(self, config.interface.metrics_listen)
        # SIGHUP and `secureioctl reload` share one gate: one reload at a time, at most
        # one a second, requests meanwhile share its result.
        self.reload_gate = CommandGate(
            loop,
            lambda now: self.reload().as_dict(),
            name="reload",
            min_interval=DEFAULT_LIMITS.reload_interval,
        )
        self.control = (
            ControlServer(
                control_path,
                self.handle_command,
                loop,
                clock=clock.monotonic,
                gates={"reload": self.reload_gate},
            )
            if control_path is not None
            else None
        )
        self.reloader = Reloader(
            self.lifecycle, self.routes, config_loader, notifier, lambda: self._update_status(True)
        )
        self.started_at = clock.monotonic()
        self._status_text = ""
        self.lone: LoneHop | None = None

    def use_lone_hop(self, module: Any) -> None:
        """Serve lone packets from C inside the loop's wait (``lone.py``); ``module`` is
        ``lone.load_fastpath()``. Only for the real TUN, socket and ``EventLoop``."""
        loop_fd: int = self.loop.fileno()  # type: ignore[attr-defined]
        hop = LoneHop(
            module,
            loop_fd,
            self.tun,
            self.udp,
            self.send,
            self.receive,
            self.router,  # type: ignore[arg-type]
        )
        hop.attach(self.loop)
        self.lone = hop

    @property
    def config(self) -> Config:
        return self.lifecycle.config

    # -- start and stop ----------------------------------------------------------------

    def configure_interface(self) -> None:
        """Addresses, MTU, link up: before privileges are dropped."""
        self.routes.configure_interface()

    def start(self, resolved: Mapping[tuple[str, int], list[Address] | str] | None = None) -> None:
        """Peers, descriptors and timers; call ``configure_interface`` first. ``resolved``:
        the endpoint names looked up before anything was installed (``resolver.prefetch``),
        by (host, port)."""
        now = self.clock.monotonic()
        for pc in self.config.peers:
            ep = pc.endpoint
            found = resolved.get((ep.host, ep.port)) if resolved and ep is not None else None
            self.lifecycle.add_peer(pc, now, found)
        self.loop.add_reader(self.tun.fileno(), self.send.on_tun)
        self.loop.add_reader(self.udp.fileno(), self.receive.on_udp)
        if self.control is not None:
            self.control.start()
        self.metrics.start(self.clock.wall_ns() / 1e9)
        if self.tun.vnet_hdr:
            self.loop.call_at(now + LOSS_CHECK_INTERVAL, self._check_offload)
        if self.watchdog_interval and self.notifier is not None:
            self._watchdog(now)
        self.after_wakeup(now)
        self._update_status(force=True)
        if self.notifier is not None:
            self.notifier.ready()

    def close(self) -> None:
        now = self.clock.monotonic()
        for peer in self.peers.values():
            if peer.session is not None:
                peer.session.close(now, "daemon stopping")
        for fd in (self.tun.fileno(), self.udp.fileno()):
            self.loop.remove_reader(fd)
        if self.control is not None:
            self.control.close()
        self.metrics.close()
        self.resolver.close()

    def give_back(self) -> None:
        """On stop: remove exactly what the daemon added (routes, rules, addresses, DNS);
        policy rules outlive the TUN device, so this runs whether we created it or not."""
        self.routes.remove_all(self.peers.values())

    # -- the loop's hooks --------------------------------------------------------------

    def after_wakeup(self, now: float) -> None:
        """Flush every peer the wake-up touched, once (a flush can touch it again), and
        deliver what its session still holds (what a read brought is usually delivered
        already: ``ReceivePath.on_udp``)."""
        dirty = self.dirty
        send, receive, lifecycle = self.send, self.receive, self.lifecycle
        rounds = 0
        while dirty and rounds < 8:
            rounds += 1
            batch = list(dirty)
            dirty.clear()
            for peer in batch:
                s = peer.session
                if s is None:
                    continue
                s.flush(now)
                send.transmit(peer, now)
                receive.drain(peer, now)
                lifecycle.after_activity(peer, now)
        lone = self.lone
        if lone is not None:
            lone.routes_changed()  # before any wait: the hop must not use a stale address
        if dirty:  # still more to do: come back at once rather than sleep on it
            self.loop.call_at(now, lambda _now: None)
        elif lone is not None:
            lone.rearm(now)

    def _check_offload(self, now: float) -> None:
        self.offload.check_loss(self.peers.values(), now)
        self.loop.call_at(now + LOSS_CHECK_INTERVAL, self._check_offload)

    def _watchdog(self, now: float) -> None:
        assert self.notifier is not None and self.watchdog_interval
        self.notifier.watchdog()
        self.loop.call_at(now + self.watchdog_interval * WATCHDOG_FRACTION, self._watchdog)

    def _update_status(self, force: bool = False) -> None:
        text = status_line(self.peers.values())
        if force or text != self._status_text:
            self._status_text = text
            if self.notifier is not None:
                self.notifier.status(text)

    # -- reload and control ------------------------------------------------------------

    def reload(self) -> ReloadResult:
        return self.reloader.reload(self.clock.monotonic())

    def reload_logged(self, now: float) -> None:
        """SIGHUP: through the reload gate; a refusal is logged, never raised."""
        self.reload_gate.request(now)

    def status(self) -> dict[str, Any]:
        return device_status(self, self.clock.monotonic())

    def peers_info(self) -> list[dict[str, Any]]:
        now = self.clock.monotonic()
        return [p.describe(now) for p in self.peers.values()]

    def handle_command(self, command: str, request: dict[str, Any]) -> Any:
        commands = {
            "status": self.status,
            "peers": self.peers_info,
            "reload": lambda: self.reload().as_dict(),
            "metrics": self.metrics.text,
            "showconf": lambda: running_config_toml(self.config),
        }
        if command not in commands:
            raise ControlError(f"unknown command {command!r}")
        return commands[command]()
