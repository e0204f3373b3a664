"""DNS for the tunnel's link through systemd-resolved (``dns = [...]`` in the config).

wg-quick hands ``DNS =`` to ``resolvconf``; on a systemd host that is resolved, so the
daemon talks to resolved directly with its command-line client: the servers go on the
tunnel's link and ``~.`` makes that link the route for every query (no query leaks to
another link's servers while the tunnel is up). Names in the list are search domains.
``resolvectl revert`` gives the link back at stop, and resolved forgets a link that
disappears, so a device the daemon created needs nothing after a crash.

Without resolved there is nothing to talk to: the caller logs one warning line naming
the reason and the tunnel comes up without DNS changes.

Under the packaged unit the daemon is user secureiod with CAP_NET_ADMIN, and on Debian 12's
dbus-daemon resolved does not count that capability (dbus-daemon does not vouch for a
caller's capabilities, and sd-bus does not authorize on what it could only read from /proc):
it asks polkit, as seen on the bus in packaging/tests/test_resolved_dns.py. The package
ships a polkit rule for user secureiod (packaging/polkit/secureiod.rules); without polkitd
the answer is "Access denied", and the warning line says what is missing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Final, Protocol

logger = logging.getLogger(__name__)

RESOLVECTL_TIMEOUT: Final = 5.0
SERVICE_MANAGER_VARIABLES: Final = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}
)
"""Variables systemd gives the daemon alone. A systemd tool that fails sends ``ERRNO=`` to
``$NOTIFY_SOCKET`` (seen under the unit: "Got notification message from PID ..., but
reception only permitted for main PID"); with ``NotifyAccess=all`` it would speak for the
service, so children never see them."""
AUTHORIZATION_ANSWERS: Final = ("Access denied", "Interactive authentication required")
"""How resolvectl words resolved's refusal when polkit says no or is not there."""
POLKIT_HINT: Final = (
    "resolved asks polkit whether a caller that is not root may set a link's DNS: with "
    "polkitd installed, the secureiod package's rule allows user secureiod"
)


class DnsPort(Protocol):
    """Apply and revert a link's DNS settings; each returns None on success, else why
    not (one line)."""

    def apply(self, dev: str, entries: Sequence[str]) -> str | None: ...
    def revert(self, dev: str) -> str | None: ...


def split_entries(entries: Sequence[str]) -> tuple[list[str], list[str]]:
    """(server addresses, search domains), as wg-quick reads its ``DNS =`` list."""
    servers: list[str] = []
    domains: list[str] = []
    for entry in entries:
        try:
            servers.append(str(ipaddress.ip_address(entry)))
        except ValueError:
            domains.append(entry)
    return servers, domains


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the service manager's variables (see
    ``SERVICE_MANAGER_VARIABLES``)."""
    return {k: v for k, v in environ.items() if k not in SERVICE_MANAGER_VARIABLES}


class Resolvectl:
    """systemd-resolved through ``resolvectl`` (looked up on ``PATH`` at each call)."""

    def __init__(self, command: str = "resolvectl", timeout: float = RESOLVECTL_TIMEOUT) -> None:
        self.command = command
        self.timeout = timeout

    def apply(self, dev: str, entries: Sequence[str]) -> str | None:
        servers, domains = split_entries(entries)
        if servers:
            problem = self._run("dns", dev, *servers)
            if problem is not None:
                return problem
        problem = self._run("domain", dev, *domains, "~.")
        if problem is not None:
            self._run("revert", dev)
        return problem

    def revert(self, dev: str) -> str | None:
        return self._run("revert", dev)

    def _run(self, *args: str) -> str | None:
        path = shutil.which(self.command)
        if path is None:
            return f"{self.command} (systemd-resolved) is not installed"
        try:
            result = subprocess.run(
                [path, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
                env=child_environment(os.environ),
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{self.command} {args[0]} failed: {exc}"
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            why = detail[0] if detail else f"exit status {result.returncode}"
            if any(answer in why for answer in AUTHORIZATION_ANSWERS):
                why = f"{why.rstrip('.')}; {POLKIT_HINT}"
            return f"{self.command} {args[0]} failed: {why}"
        logger.debug("%s %s", self.command, " ".join(args))
        return None
