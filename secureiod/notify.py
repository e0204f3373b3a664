"""systemd glue: readiness notification and the watchdog.

It knows nothing of secureio. It exists so a ``Type=notify`` (or ``notify-reload``) unit
knows when the tunnel is really up, restarts a daemon whose event loop has stalled, and
the daemon runs unchanged outside systemd (where log lines go is ``secureiod.logs``).

libsystemd (through systemd-python) is optional. Without it the notification protocol is
sent by hand: it is one ``KEY=VALUE`` line per field in a single datagram to the
``AF_UNIX`` socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace), as documented in sd_notify(3). A notification is a courtesy to the service
manager: failing to send one is logged once and never stops the daemon.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Final

__all__ = ["Notifier", "watchdog_interval"]

logger = logging.getLogger(__name__)

SYSLOG_IDENTIFIER: Final = "secureiod"
_HANDLER_NAME: Final = "secureiod"
_FIELD_NAME: Final = re.compile(r"[A-Z0-9_]+")

SdNotify = Callable[[str], bool]


def _load_sd_notify() -> SdNotify | None:
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        return None
    notify: SdNotify = daemon.notify
    return notify


class Notifier:
    """Sends sd_notify(3) messages; every method returns whether the message was sent.

    With no ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call is a
    cheap no-op returning ``False``, so callers never need to ask first.
    """

    def __init__(self, socket_address: str | None, *, use_libsystemd: bool = True) -> None:
        """``use_libsystemd=False`` forces the built-in datagram sender (tests, or to avoid
        loading libsystemd); it is also used when systemd-python is not installed."""
        self.address = socket_address or None
        self._sd_notify = _load_sd_notify() if use_libsystemd and self.address else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, use_libsystemd: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), use_libsystemd=use_libsystemd)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def backend(self) -> str:
        """``"libsystemd"``, ``"socket"`` (the built-in sender) or ``"disabled"``."""
        if self.address is None:
            return "disabled"
        return "libsystemd" if self._sd_notify is not None else "socket"

    # --- the messages -----------------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: ``Type=notify`` units leave "activating"."""
        return self._with_status({"READY": "1"}, status)

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status``."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Keep-alive for ``WatchdogSec=``; see ``watchdog_interval`` for the period."""
        return self.notify(WATCHDOG="1")

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; send ``ready()`` when it is done.

        ``MONOTONIC_USEC`` is required by systemd >= 253 for ``Type=notify-reload``: it
        tells a reload that started after the manager's request from a stale one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._with_status({"RELOADING": "1", "MONOTONIC_USEC": str(usec)}, status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun, so systemd does not take the exit for a crash."""
        return self._with_status({"STOPPING": "1"}, status)

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` fields in one message (booleans as 1/0, newlines flattened
        since they would split a field). Keys are upper-case sd_notify names."""
        if self.address is None or not fields:
            return False
        lines = []
        for key, value in fields.items():
            if not _FIELD_NAME.fullmatch(key):
                raise ValueError(f"sd_notify field {key!r} must be upper-case A-Z, 0-9, _")
            text = str(int(value)) if isinstance(value, bool) else str(value)
            lines.append(f"{key}={' '.join(text.splitlines())}")
        return self._send("\n".join(lines))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- sending ----------------------------------------------------------------------------

    def _with_status(self, fields: dict[str, str], status: str | None) -> bool:
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def _send(self, message: str) -> bool:
        try:
            # libsystemd reads NOTIFY_SOCKET itself, so it only serves our address while
            # the environment still names it; otherwise send by hand.
            if self._sd_notify is not None and os.environ.get("NOTIFY_SOCKET") == self.address:
                return bool(self._sd_notify(message))
            return self._send_raw(message)
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return False

    def _send_raw(self, message: str) -> bool:
        address = self.address or ""
        if address.startswith("@"):
            target = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            target = address
        else:
            raise ValueError(f"unsupported NOTIFY_SOCKET {address!r} (want a path or @name)")
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(message.encode("utf-8"), target)
        return True

    def _failed(self, exc: Exception) -> None:
        if self._warned:
            logger.debug("sd_notify to %s failed: %s", self.address, exc)
            return
        self._warned = True
        logger.warning(
            "sd_notify to %s failed: %s (further failures are logged at DEBUG)",
            self.address,
            exc,
        )


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """Seconds between ``Notifier.watchdog()`` pings, or ``None`` if no watchdog is armed.

    Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so one late ping does
    not get the daemon killed. ``WATCHDOG_PID``, when set, must be our pid: the variables
    may have leaked from a parent the watchdog is meant for.
    """
    env = os.environ if environ is None else environ
    text = env.get("WATCHDOG_USEC")
    if not text:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        me = os.getpid() if pid is None else pid
        if not owner.isdigit() or int(owner) != me:
            logger.debug("WATCHDOG_PID=%s is not our pid %d: watchdog not ours", owner, me)
            return None
    if not text.isdigit() or int(text) <= 0:
        logger.warning("ignoring invalid WATCHDOG_USEC=%r", text)
        return None
    return int(text) / 2 / 1_000_000
