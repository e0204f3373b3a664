"""Keeping a full tunnel working under strict reverse-path filtering (``rp_filter=1``).

The problem: with ``table = "auto"`` every unmarked packet's route lookup ends in the
tunnel's table (``policy.py``). The kernel's reverse-path check of a received datagram is
such a lookup, for its source and without a mark unless ``src_valid_mark`` is on; so the
peers' replies, which arrive on the physical interface, look as if they came in the
wrong way, and strict filtering drops them: the session never comes up.

The fix is wg-quick's: the replies of the daemon's own flow carry its mark again before
routing looks at them, and the reverse-path check uses it.

* ``net.ipv4.conf.all.src_valid_mark = 1``, so the check looks up with the packet's mark
  (set only when neither ``all`` nor every strict device already has it; the old value
  is recorded and put back at stop);
* an nftables table of the daemon's own, ``inet secureiod-<ifname>``: on postrouting, a
  UDP packet carrying the socket's mark stores it in its conntrack entry
  (``ct mark set meta mark``); on prerouting, a UDP packet whose conntrack entry holds
  that mark gets it back (``meta mark set ct mark``). Both at mangle priority (-150):
  after conntrack (-200) has found the entry, before the routing decision.

The table is created with ``create`` (never ``add``), in one ``nft -f -`` transaction: a
table of that name that is already there is someone else's, is left alone, and is
named in the warning. Both changes are in the ``Ledger`` before they are made, so a
killed daemon's next start removes them.

IPv6 has no ``rp_filter``: its reverse-path filters are firewall rules (``ip6tables -m
rpfilter``, nft ``fib saddr . iif``, firewalld's at raw priority), most of which run before
conntrack and cannot be helped by a restored mark. The table is ``inet`` all the same, as
wg-quick's are, so a v6 filter that runs later and honours the mark is served too.

``nft`` runs with the daemon's capabilities: under the packaged unit (``User=`` with
``AmbientCapabilities=CAP_NET_ADMIN``) it inherits CAP_NET_ADMIN; after ``--user`` it has
none. Anything that fails is one warning line with the fix (loose filtering), and the
tunnel is set up regardless.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from ..netlink import Netlink
from .ledger import Ledger, OwnedNftTable, OwnedSysctl
from .policy import strict_rp_filter

logger = logging.getLogger(__name__)

NFT_FAMILY: Final = "inet"
TABLE_PREFIX: Final = "secureiod-"
SRC_VALID_MARK: Final = "net/ipv4/conf/all/src_valid_mark"
NFT_TIMEOUT: Final = 10.0
NFT_FALLBACK_PATHS: Final = ("/usr/sbin/nft", "/sbin/nft")
"""Where nft is when PATH (a non-root login's, say) leaves sbin out."""
MAX_ERROR_CHARS: Final = 200


class HostFilterError(Exception):
    """nft or a sysctl refused; ``str()`` is one line for the warning."""


class HostFilterPort(Protocol):
    """The kernel knobs outside netlink that the mark restore needs (the real one is
    ``SystemHostFilter``; tests use a fake)."""

    def strict_rp_filter(self, exclude: tuple[str, ...]) -> list[str]:
        """Devices whose effective IPv4 ``rp_filter`` is strict."""
        ...

    def read_sysctl(self, key: str) -> str | None:
        """``key`` as under /proc/sys (``net/ipv4/conf/all/src_valid_mark``); None if absent."""
        ...

    def write_sysctl(self, key: str, value: str) -> None: ...

    def nft(self, script: str) -> None:
        """Run ``script`` as one ``nft -f -`` transaction; ``HostFilterError`` if refused,
        ``FileNotFoundError`` if there is no nft."""
        ...


class SystemHostFilter:
    """The running kernel's: /proc/sys and the ``nft`` program."""

    def strict_rp_filter(self, exclude: tuple[str, ...]) -> list[str]:
        return strict_rp_filter(exclude=exclude)

    def read_sysctl(self, key: str) -> str | None:
        try:
            return Path("/proc/sys", key).read_text().strip()
        except OSError:
            return None

    def write_sysctl(self, key: str, value: str) -> None:
        try:
            Path("/proc/sys", key).write_text(value + "\n")
        except OSError as exc:
            raise HostFilterError(
                f"cannot set {key.replace('/', '.')}: {exc.strerror or exc}"
            ) from None

    def nft(self, script: str) -> None:
        program = shutil.which("nft") or next(
            (p for p in NFT_FALLBACK_PATHS if os.access(p, os.X_OK)), None
        )
        if program is None:
            raise FileNotFoundError("nft")
        try:
            done = subprocess.run(
                [program, "-f", "-"],
                input=script,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HostFilterError(f"nft did not answer within {NFT_TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise HostFilterError(f"cannot run {program}: {exc.strerror or exc}") from None
        if done.returncode != 0:
            lines = [x.strip() for x in done.stderr.splitlines() if x.strip()]
            first = next((x for x in lines if x.startswith("Error")), lines[0] if lines else "")
            raise HostFilterError(f"nft: {first[:MAX_ERROR_CHARS] or f'exit {done.returncode}'}")


def default_host_filter(netlink: object) -> HostFilterPort | None:
    """The real knobs go with the real netlink (both act on this process's namespace); a
    fake netlink gets none, so an in-memory test never touches the host it runs on."""
    return SystemHostFilter() if isinstance(netlink, Netlink) else None


def table_name(ifname: str) -> str:
    """``secureiod-<ifname>``, with characters nft would not take as a name replaced."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in ifname)
    return TABLE_PREFIX + safe


def restore_script(name: str, mark: int) -> str:
    """The table (module doc): one transaction, refused whole if ``name`` exists."""
    return (
        f"create table {NFT_FAMILY} {name}\n"
        f"add chain {NFT_FAMILY} {name} premangle "
        "{ type filter hook prerouting priority -150; policy accept; }\n"
        f"add chain {NFT_FAMILY} {name} postmangle "
        "{ type filter hook postrouting priority -150; policy accept; }\n"
        f"add rule {NFT_FAMILY} {name} premangle "
        f"meta l4proto udp ct mark {mark:#x} meta mark set ct mark\n"
        f"add rule {NFT_FAMILY} {name} postmangle "
        f"meta l4proto udp meta mark {mark:#x} ct mark set meta mark\n"
    )


def _gone(exc: HostFilterError) -> bool:
    return "No such file or directory" in str(exc)


@dataclass(slots=True)
class MarkRestore:
    """Sets up and removes what the module doc describes, through ``host``, recording
    each change in ``ledger`` before it is made."""

    host: HostFilterPort
    ledger: Ledger
    ifname: str

    def strict_devices(self) -> list[str]:
        return self.host.strict_rp_filter((self.ifname,))

    def apply(self, mark: int, strict: list[str]) -> None:
        """Make the reverse-path check of ``strict`` devices see ``mark`` on the replies
        of the daemon's flow. Raises ``HostFilterError`` (or ``FileNotFoundError`` for a
        missing nft) after undoing what it did."""
        table = OwnedNftTable(NFT_FAMILY, table_name(self.ifname))
        self.ledger.add(table)
        try:
            self.host.nft(restore_script(table.name, mark))
        except HostFilterError as exc:
            self.ledger.discard(table)
            if "File exists" in str(exc):
                raise HostFilterError(
                    f"a table {table.family} {table.name} is already there and is not this "
                    f"daemon's (remove it: nft delete table {table.family} {table.name})"
                ) from None
            raise
        except BaseException:
            self.ledger.discard(table)
            raise
        try:
            self._valid_mark(strict)
        except BaseException:
            try:
                remove(self.host, table)
            except (HostFilterError, OSError) as exc:  # stays recorded: stop tries again
                logger.warning("removing %s: %s", table.describe(), exc)
            else:
                self.ledger.discard(table)
            raise

    def _valid_mark(self, strict: list[str]) -> None:
        old = self.host.read_sysctl(SRC_VALID_MARK)
        if old is None:
            raise HostFilterError(f"{SRC_VALID_MARK.replace('/', '.')} is not there")
        if old != "0":
            return
        own = [self.host.read_sysctl(f"net/ipv4/conf/{d}/src_valid_mark") for d in strict]
        if own and all(v is not None and v != "0" for v in own):
            return  # each strict device already has it (the kernel ORs all and device)
        item = OwnedSysctl(SRC_VALID_MARK, old)
        self.ledger.add(item)
        try:
            self.host.write_sysctl(SRC_VALID_MARK, "1")
        except BaseException:
            self.ledger.discard(item)
            raise


def remove(host: HostFilterPort, item: OwnedNftTable | OwnedSysctl) -> None:
    """Give back one item; a table that is gone already counts as removed, and a sysctl
    someone changed again since is left as they set it."""
    if isinstance(item, OwnedNftTable):
        try:
            host.nft(f"delete table {item.family} {item.name}\n")
        except HostFilterError as exc:
            if not _gone(exc):
                raise
        return
    current = host.read_sysctl(item.key)
    if current is None or current == item.value:
        return
    if current != "1":
        logger.info(
            "%s is %s, not the 1 the daemon set: left as it is",
            item.key.replace("/", "."),
            current,
        )
        return
    host.write_sysctl(item.key, item.value)
