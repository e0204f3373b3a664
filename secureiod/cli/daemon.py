"""``secureiod``: the daemon's entry point.

Order of work: validate the config (``--check`` stops here) → lock the record of what
this daemon adds to the host and remove what a killed previous instance left there →
look up the peers' endpoint names (at most ``PREFETCH_BUDGET`` seconds, all at once:
before any route, rule or DNS setting of ours could send the lookups into a tunnel that
needs their answer to come up) → decide where routes go (``daemon/policy.py``; the UDP
socket's firewall mark comes from it) → open the TUN device and configure it (addresses,
MTU, link up, DNS) → bind the UDP socket and the control socket → drop privileges if
asked, keeping CAP_NET_ADMIN for later MTU and route changes → start one session per peer
(their routes; the names found above are their first endpoints) → tell systemd READY=1 →
serve. On SIGTERM: close sessions, give back exactly what we added (routes, rules,
addresses, DNS; the device itself goes away with its fd), remove the socket, exit 0.
Later lookups of a name (it moved) go through ``dnsquery``'s marked stub resolver while
a full tunnel could capture them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..config import Config, ConfigError, check_config, load_config, reload_config
from ..control import ControlError
from ..daemon.capture import capture_warnings, read_host_routes
from ..daemon.device import Device
from ..daemon.dns import Resolvectl
from ..daemon.ledger import Ledger, LedgerError, LedgerFile, record_path
from ..daemon.lone import load_fastpath
from ..daemon.loop import EventLoop, SystemClock
from ..daemon.owned import undo_leftovers
from ..daemon.policy import MODE_AUTO, RoutingPlan, decide_plan
from ..dnsquery import StubLookup, UnderlayLookup, name_warnings
from ..endpoint import Address, format_endpoint, resolve_endpoint
from ..logs import setup_daemon_logging
from ..netlink import Netlink, NetlinkError
from ..notify import Notifier, watchdog_interval
from ..paths import config_path as default_config_path
from ..privileges import PrivilegeError, current_capabilities, drop_privileges
from ..resolver import ThreadResolver, prefetch
from ..secureio.packet import crypto_backend
from ..tun import TunDevice, TunError
from ..udp import UdpSocket
from . import ArgumentParser

logger = logging.getLogger("secureiod")
PROG = "secureiod"
PREFETCH_BUDGET: Final = 5.0
"""Seconds the start waits, in all, for the peers' endpoint names; a name not resolved by
then is retried with backoff once the daemon runs."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="secureio VPN daemon (one TUN interface)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", "-c", type=Path, help="config file (TOML)")
    where.add_argument(
        "--interface", "-i", metavar="IFNAME", help=f"read {default_config_path('IFNAME')}"
    )
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--user", help="drop to this user after setup (keeps CAP_NET_ADMIN)")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    parser.add_argument(
        "--no-control-socket", action="store_true", help="do not serve the control socket"
    )
    parser.add_argument(
        "--require-unprivileged",
        action="store_true",
        help="refuse to serve as root or with any capability but CAP_NET_ADMIN (the "
        "systemd unit passes it, so an override that runs the daemon as full root fails "
        "loudly instead of silently widening what a compromise could do)",
    )
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config is not None:
        config_path = args.config
    elif args.interface:
        config_path = default_config_path(args.interface)
    else:
        return _fail("give --config PATH or --interface IFNAME", 2)
    if args.check:
        try:
            print(check_config(config_path))
            config = load_config(config_path)
        except ConfigError as exc:
            return _fail(str(exc), 2)
        servers = StubLookup(None).nameservers()
        for text in name_warnings(config, servers, read_host_routes()):
            print(f"  warning: {text}")
        return 0
    setup_daemon_logging(args.log_level.upper())
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    user = args.user or config.interface.user
    try:
        return _serve(
            config,
            config_path,
            user,
            control=not args.no_control_socket,
            require_unprivileged=args.require_unprivileged,
        )
    except (TunError, NetlinkError, ControlError, PrivilegeError, LedgerError, OSError) as exc:
        logger.error("%s", exc)
        return 1


def _check_unprivileged() -> None:
    extra = sorted(current_capabilities() - {"CAP_NET_ADMIN"})
    if os.geteuid() == 0 or extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise PrivilegeError(
            f"--require-unprivileged: running as uid {os.geteuid()} with "
            f"{shown or 'no capability but CAP_NET_ADMIN'}; run as a dedicated user with only "
            "CAP_NET_ADMIN (User= and AmbientCapabilities=CAP_NET_ADMIN in the unit, or --user)"
        )


def _serve(
    config: Config,
    config_path: Path,
    user: str | None,
    *,
    control: bool,
    require_unprivileged: bool,
) -> int:
    iface = config.interface
    listen = iface.listen
    family, sockaddr = resolve_endpoint(listen.host, listen.port, passive=True)
    netlink = Netlink()
    ledger: Ledger | None = None
    try:
        ledger, plan, resolved = prepare_host(config, netlink, family)
        tun = TunDevice.open(iface.name, vnet_hdr=iface.offload)
    except BaseException:
        if ledger is not None:
            ledger.close()
        netlink.close()
        raise
    loop = EventLoop()
    device: Device | None = None
    try:
        udp = UdpSocket.bind(sockaddr, family=family, segmentation=True, mark=plan.fwmark)
        notifier = Notifier.from_env()
        device = Device(
            config,
            tun=tun,
            udp=udp,
            netlink=netlink,
            notifier=notifier if notifier.enabled else None,
            resolver=ThreadResolver(
                loop.call_soon_threadsafe,
                getaddrinfo=UnderlayLookup(
                    StubLookup(plan.fwmark), lambda: lookups_captured(plan, device)
                ),
            ),
            loop=loop,
            clock=SystemClock(),
            control_path=iface.control_socket if control else None,
            config_loader=reload_config,
            watchdog_interval=watchdog_interval() if notifier.enabled else None,
        )
        device.routes.attach(plan=plan, ledger=ledger, dns=Resolvectl())
        device.configure_interface()
        if user:
            drop_privileges(user)
            logger.info("running as %s with CAP_NET_ADMIN only", user)
        if require_unprivileged:
            _check_unprivileged()
        _install_signal_handlers(loop, device)
        fastpath = load_fastpath()
        if fastpath is not None:
            device.use_lone_hop(fastpath)
        device.start(resolved)
        logger.info(
            "%s up: listening on %s, %d peer(s), public key %s, crypto %s, lone hop %s",
            tun.name,
            format_endpoint(udp.local_address),
            len(config.peers),
            config.identity.public_key,
            crypto_backend(),
            "C" if fastpath is not None else "Python",
        )
        if crypto_backend() != "openssl+libsodium":
            logger.warning(
                "crypto: %s only; the C accelerator with OpenSSL is several times faster"
                " (see README, Crypto backend)",
                crypto_backend(),
            )
        loop.run(after_wakeup=device.after_wakeup)
        logger.info("stopping")
        notifier.stopping()
        return 0
    finally:
        # Each step on its own: one failing (e.g. a file we may no longer touch after
        # dropping privileges) must not leave the device or sockets open. What we added
        # goes back whether or not we created the device: policy rules outlive it.
        for step in (
            device.close if device is not None else None,
            device.give_back if device is not None else None,
            tun.close,
            ledger.close,
            netlink.close,
            loop.close,
        ):
            if step is None:
                continue
            try:
                step()
            except Exception as exc:
                logger.warning("cleanup: %s", exc)


def lookups_captured(plan: RoutingPlan, device: Device | None) -> bool:
    """Whether an unmarked DNS query of ours could now be routed into the tunnel: a full
    tunnel is configured (``table = "auto"`` and a peer with a default route), or the
    administrator's own rules act on a configured ``fwmark``. Then names are looked up by
    the marked stub resolver (``dnsquery``), else by ``getaddrinfo``. Asked on a resolver
    thread per lookup, as a reload may add or remove the full tunnel."""
    if plan.fwmark is None or device is None:
        return False
    if plan.mode != MODE_AUTO:
        return True
    return any(n.prefixlen == 0 for pc in device.config.peers for n in pc.allowed_ips)


@dataclass(frozen=True)
class StartLookup:
    """How the start looks up endpoint names: injectable for tests."""

    budget: float = PREFETCH_BUDGET
    getaddrinfo: Callable[..., list] | None = None


def prepare_host(
    config: Config, netlink: Netlink, family: int, names: StartLookup | None = None
) -> tuple[Ledger, RoutingPlan, dict[tuple[str, int], list[Address] | str]]:
    """Before the device exists: lock the record of what this daemon adds (refused while
    another instance holds it), remove what a killed previous instance recorded (its
    rules could capture the lookups), look up the endpoint names, warn of routes that
    would capture our own datagrams, and decide where routes go."""
    iface = config.interface
    names = names or StartLookup()
    store, leftovers = LedgerFile.open(record_path(iface.control_socket, iface.name), iface.name)
    ledger = Ledger(store, leftovers)
    try:
        undo_leftovers(netlink, leftovers, Resolvectl(), ledger)
        wanted = [
            (pc.endpoint.host, pc.endpoint.port)
            for pc in config.peers
            if pc.endpoint is not None and pc.endpoint.ip is None
        ]
        resolved = prefetch(wanted, family, budget=names.budget, getaddrinfo=names.getaddrinfo)
        for text in capture_warnings(config, netlink.list_routes(), same_prefix=False):
            logger.warning("%s", text)
        plan = decide_plan(iface, netlink)
    except BaseException:
        ledger.close()
        raise
    return ledger, plan, resolved


def _install_signal_handlers(loop: EventLoop, device: Device) -> None:
    """SIGTERM/SIGINT stop the loop; SIGHUP reloads exactly as ``secureioctl reload``
    does (a refused config is logged and the tunnel keeps running)."""

    def stop(signum: int, _frame: object) -> None:
        logger.info("%s received", signal.Signals(signum).name)
        loop.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda *_: loop.call_soon_threadsafe(device.reload_logged))


if __name__ == "__main__":
    sys.exit(main())
