"""What this daemon added to the host, written down before it is added.

A daemon that is killed (``kill -9``, the OOM killer, a crash systemd restarts) cannot give
back its routes, rules and addresses (nor the nftables table and sysctl of ``nft.py``, nor
a persistent TUN's MTU), and the ones that outlive it are the harmful ones:
policy rules that send the host's traffic into a table nobody serves, routes on a
persistent TUN device. So every such change is recorded here first, and the next start
reads the record and removes exactly those items: never more (nothing is guessed from
names, protocols or table numbers) and never less.

The file is ``<ifname>.owned`` next to the control socket (``/run/secureiod/sio0.owned``
by default; the packaged unit keeps that directory across restarts), JSON, and:

* held under an exclusive ``flock`` for the daemon's life, which the kernel drops however
  the process dies: a second daemon for the same interface is refused instead of tearing
  down the first one's routes;
* write-ahead for routes and rules (recorded before the netlink call that creates them,
  forgotten after the call that removes them: removing something that is not there is
  success, and a route is removed by its device too, so it never hits another's route);
  addresses and DNS are recorded right after they are set, so a crash in between leaks
  rather than removes an address someone else had;
* a journal, one JSON line per change, written through the descriptor opened at start
  (after dropping privileges the daemon may no longer create files in the directory): a
  header line with the items and a generation number, then ``+``/``-`` lines of that
  generation, so a thousand routes cost a thousand short writes, not a thousand rewrites.
  When the changes outnumber twice the items, the header is rewritten in place
  (``pwrite`` at 0, then ``ftruncate``) with the next generation; lines of an older
  generation found after a header (a crash between the two calls) are ignored, and the
  file stays bounded;
* bound to its network namespace: a record written in another namespace names routes
  that are not here, and is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

from ..netlink import RT_TABLE_MAIN, Rule
from .ports import Interface, Network

logger = logging.getLogger(__name__)

RECORD_VERSION: Final = 1
MAX_RECORD_SIZE: Final = 4 << 20
"""A record is a few hundred bytes per peer; anything larger is not one of ours."""
MIN_COMPACT_CHANGES: Final = 64
_NETNS_PATH: Final = "/proc/self/ns/net"


class LedgerError(Exception):
    """The record cannot be used (locked by another daemon, not ours); one line."""


@dataclass(frozen=True, slots=True)
class OwnedRoute:
    dst: Network
    dev: str
    table: int
    metric: int

    def describe(self) -> str:
        where = "" if self.table == 254 else f" table {self.table}"
        return f"route {self.dst} dev {self.dev}{where} metric {self.metric}"


@dataclass(frozen=True, slots=True)
class OwnedRule:
    rule: Rule

    def describe(self) -> str:
        return f"IPv{self.rule.version} rule {self.rule.describe()}"


@dataclass(frozen=True, slots=True)
class OwnedAddress:
    dev: str
    address: Interface

    def describe(self) -> str:
        return f"address {self.address} on {self.dev}"


@dataclass(frozen=True, slots=True)
class OwnedDns:
    dev: str

    def describe(self) -> str:
        return f"DNS settings of {self.dev}"


@dataclass(frozen=True, slots=True)
class OwnedNftTable:
    """An nftables table the daemon created (``nft.py``); removed by family and name."""

    family: str
    name: str

    def describe(self) -> str:
        return f"nftables table {self.family} {self.name}"


@dataclass(frozen=True, slots=True)
class OwnedSysctl:
    """A sysctl the daemon changed: ``key`` as under /proc/sys (``net/ipv4/conf/all/
    src_valid_mark``), ``value`` the one it had before, which stop puts back."""

    key: str
    value: str

    def describe(self) -> str:
        return f"sysctl {self.key.replace('/', '.')} (back to {self.value})"


@dataclass(frozen=True, slots=True)
class OwnedMtu:
    """The MTU a TUN device had before the daemon attached to it: only recorded for a
    device the daemon did not create (a persistent one), which outlives it."""

    dev: str
    mtu: int

    def describe(self) -> str:
        return f"MTU of {self.dev} (back to {self.mtu})"


Owned: TypeAlias = (
    OwnedRoute | OwnedRule | OwnedAddress | OwnedDns | OwnedNftTable | OwnedSysctl | OwnedMtu
)


def _to_json(item: Owned) -> dict[str, Any]:
    if isinstance(item, OwnedRoute):
        return {
            "kind": "route",
            "dst": str(item.dst),
            "dev": item.dev,
            "table": item.table,
            "metric": item.metric,
        }
    if isinstance(item, OwnedRule):
        r = item.rule
        return {
            "kind": "rule",
            "version": r.version,
            "priority": r.priority,
            "table": r.table,
            "fwmark": r.fwmark,
            "fwmask": r.fwmask,
            "invert": r.invert,
            "suppress_prefixlength": r.suppress_prefixlength,
        }
    if isinstance(item, OwnedAddress):
        return {"kind": "address", "dev": item.dev, "address": str(item.address)}
    if isinstance(item, OwnedNftTable):
        return {"kind": "nft-table", "family": item.family, "name": item.name}
    if isinstance(item, OwnedSysctl):
        return {"kind": "sysctl", "key": item.key, "value": item.value}
    if isinstance(item, OwnedMtu):
        return {"kind": "mtu", "dev": item.dev, "mtu": item.mtu}
    return {"kind": "dns", "dev": item.dev}


def _u32(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"not a 32-bit number: {value!r}")
    return value


def _opt_u32(value: object) -> int | None:
    return None if value is None else _u32(value)


def _name(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) < 16:
        raise ValueError(f"not an interface name: {value!r}")
    return value


def _from_json(data: object) -> Owned:
    """One recorded item; ``ValueError`` for anything that is not exactly one."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    kind = data.get("kind")
    if kind == "route":
        return OwnedRoute(
            ipaddress.ip_network(str(data["dst"])),
            _name(data["dev"]),
            _u32(data["table"]),
            _u32(data["metric"]),
        )
    if kind == "rule":
        version = data["version"]
        if version not in (4, 6):
            raise ValueError(f"bad IP version {version!r}")
        return OwnedRule(
            _rule_of_ours(
                Rule(
                    version=version,
                    priority=_u32(data["priority"]),
                    table=_u32(data["table"]),
                    fwmark=_opt_u32(data.get("fwmark")),
                    fwmask=_opt_u32(data.get("fwmask")),
                    invert=bool(data.get("invert")),
                    suppress_prefixlength=_opt_u32(data.get("suppress_prefixlength")),
                )
            )
        )
    if kind == "address":
        return OwnedAddress(_name(data["dev"]), ipaddress.ip_interface(str(data["address"])))
    if kind == "dns":
        return OwnedDns(_name(data["dev"]))
    if kind == "nft-table":
        return OwnedNftTable(_nft_family(data["family"]), _nft_name(data["name"]))
    if kind == "sysctl":
        return OwnedSysctl(_sysctl_key(data["key"]), _sysctl_value(data["value"]))
    if kind == "mtu":
        mtu = _u32(data["mtu"])
        if not MIN_LINK_MTU <= mtu <= MAX_LINK_MTU:
            raise ValueError(f"not a link MTU: {mtu}")
        return OwnedMtu(_name(data["dev"]), mtu)
    raise ValueError(f"unknown kind {kind!r}")


# A record is read back as root and its items are handed to nft and written under
# /proc/sys: only the shapes the daemon itself writes are accepted, so an edited record
# cannot make a start remove someone else's table or set an arbitrary sysctl.
MIN_LINK_MTU: Final = 68
MAX_LINK_MTU: Final = 65535
NFT_FAMILIES: Final = frozenset({"inet"})
NFT_TABLE_PREFIX: Final = "secureiod-"
SYSCTL_KEYS: Final = frozenset({"net/ipv4/conf/all/src_valid_mark"})


MAX_RULE_PRIORITY: Final = 32765
"""``policy.RULE_PRIORITY_TOP``: the daemon's rules sit below the main table's (32766)."""
RESERVED_TABLES: Final = frozenset({0, 253, 255})
"""unspec, default, local: never the full tunnel's table."""


def _rule_of_ours(rule: Rule) -> Rule:
    """``rule`` if it has one of the two shapes ``policy.policy_rules`` writes, else
    ``ValueError``: a rule is deleted by its attributes, so a record naming ``lookup
    main`` at 32766 would otherwise take the host's main table away."""
    suppress = (
        rule.table == RT_TABLE_MAIN
        and rule.suppress_prefixlength == 0
        and rule.fwmark is None
        and not rule.invert
    )
    mark = (
        rule.invert
        and rule.fwmark is not None
        and rule.fwmask == 0xFFFFFFFF
        and rule.suppress_prefixlength is None
        and rule.table not in RESERVED_TABLES | {RT_TABLE_MAIN}
    )
    if not (suppress or mark) or not 1 <= rule.priority <= MAX_RULE_PRIORITY:
        raise ValueError(f"not a rule the daemon adds: {rule.describe()}")
    return rule


def _of_interface(item: Owned, ifname: str) -> bool:
    """Whether ``item`` could be something the daemon for ``ifname`` added: its routes,
    addresses, DNS settings and MTU are all on its own device, its nftables table is
    named after it. A record naming another device's route or address (edited, or
    copied from another interface's) must not make the start delete it."""
    if isinstance(item, OwnedRoute | OwnedAddress | OwnedDns | OwnedMtu):
        return item.dev == ifname
    if isinstance(item, OwnedNftTable):
        return item.name == NFT_TABLE_PREFIX + _nft_safe(ifname)
    return True


def _nft_safe(ifname: str) -> str:
    """As ``nft.table_name`` spells ``ifname`` (not imported: nft.py imports this module)."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in ifname)


def _nft_family(value: object) -> str:
    if value not in NFT_FAMILIES:
        raise ValueError(f"not an nftables family of ours: {value!r}")
    return str(value)


def _nft_name(value: object) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith(NFT_TABLE_PREFIX)
        or not value[len(NFT_TABLE_PREFIX) :]
        or len(value) > 64
        or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value)
    ):
        raise ValueError(f"not an nftables table of ours: {value!r}")
    return value


def _sysctl_key(value: object) -> str:
    if value not in SYSCTL_KEYS:
        raise ValueError(f"not a sysctl the daemon changes: {value!r}")
    return str(value)


def _sysctl_value(value: object) -> str:
    if not isinstance(value, str) or not value.isdigit() or len(value) > 10:
        raise ValueError(f"not a sysctl value: {value!r}")
    return value


def current_netns() -> int | None:
    """The inode of this process's network namespace (what tells namespaces apart)."""
    try:
        return os.stat(_NETNS_PATH).st_ino
    except OSError:
        return None


def record_path(control_socket: Path, ifname: str) -> Path:
    """``<ifname>.owned`` next to the control socket (``/run/secureiod/sio0.owned``)."""
    return control_socket.parent / f"{ifname}.owned"


class LedgerFile:
    """The locked journal (see module doc); ``open`` returns it with the leftovers of a
    previous instance, which its first header already holds."""

    def __init__(self, path: Path, fd: int, netns: int | None) -> None:
        self.path = path
        self._fd: int | None = fd
        self._netns = netns
        self._generation = 0
        self._size = 0
        self._changes = 0
        self._warned = False

    @classmethod
    def open(cls, path: Path, ifname: str | None = None) -> tuple[LedgerFile, list[Owned]]:
        """Lock ``path`` (created 0600 if missing) and read what a previous instance in
        this network namespace recorded and did not give back; with ``ifname``, only
        what a daemon for that interface could have added (``_of_interface``)."""
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise LedgerError(
                f"cannot open the record of added routes {path}: {exc.strerror or exc}; "
                "if no secureiod is running for this interface, remove it"
            ) from None
        try:
            info = os.fstat(fd)
            if (
                not stat.S_ISREG(info.st_mode)
                or info.st_uid != os.geteuid()
                or info.st_mode & 0o022
            ):
                raise LedgerError(
                    f"{path} is not a regular file owned by uid {os.geteuid()} and writable "
                    "only by it; it cannot be the daemon's record of added routes: remove it"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise LedgerError(
                    f"{path} is locked: another secureiod is running for this interface; "
                    "stop it first"
                ) from None
            data = os.pread(fd, MAX_RECORD_SIZE + 1, 0)
        except BaseException:
            os.close(fd)
            raise
        netns = current_netns()
        store = cls(path, fd, netns)
        store._generation, leftovers = _parse(path, data, netns, ifname)
        store.compact(leftovers)
        return store, leftovers

    def record(self, op: str, item: Owned, items: Collection[Owned]) -> None:
        """Journal one change (``+`` or ``-``); ``items`` is the state after it."""
        if self._fd is None:
            return
        if self._changes >= max(MIN_COMPACT_CHANGES, 2 * len(items)):
            self.compact(items)
            return
        line = _line({"gen": self._generation, "op": op, "item": _to_json(item)})
        if self._write(line, self._size):
            self._size += len(line)
            self._changes += 1

    def compact(self, items: Iterable[Owned]) -> None:
        """Rewrite the journal as one header line of the next generation."""
        if self._fd is None:
            return
        self._generation += 1
        header = _line(
            {
                "version": RECORD_VERSION,
                "netns": self._netns,
                "gen": self._generation,
                "pid": os.getpid(),
                "items": [_to_json(i) for i in items],
            }
        )
        if self._write(header, 0, truncate=True):
            self._size = len(header)
            self._changes = 0

    def _write(self, data: bytes, offset: int, *, truncate: bool = False) -> bool:
        assert self._fd is not None
        try:
            os.pwrite(self._fd, data, offset)
            if truncate:
                os.ftruncate(self._fd, len(data))
        except OSError as exc:
            if not self._warned:  # the routes are still tracked in memory
                self._warned = True
                logger.warning("cannot update %s: %s", self.path, exc.strerror or exc)
            return False
        return True

    def close(self, *, clean: bool) -> None:
        """Release the lock; ``clean`` (nothing left to give back): empty the file and
        remove it if this process may."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if clean:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                with contextlib.suppress(OSError):
                    if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                        self.path.unlink()
        finally:
            os.close(fd)


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _parse(
    path: Path, data: bytes, netns: int | None, ifname: str | None = None
) -> tuple[int, list[Owned]]:
    """(generation, items) of a journal; (0, []) for none or one that is not ours."""
    if not data:
        return 0, []
    if len(data) > MAX_RECORD_SIZE:
        logger.warning("%s: larger than any record of ours; ignored", path)
        return 0, []
    lines = data.split(b"\n")
    try:
        header = json.loads(lines[0])
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict) or header.get("version") != RECORD_VERSION:
        logger.warning("%s: not a record of added routes that this version reads; ignored", path)
        return 0, []
    generation = header.get("gen")
    if not isinstance(generation, int) or isinstance(generation, bool):
        generation = 0
    if header.get("netns") != netns:
        logger.warning(
            "%s: written by a daemon in another network namespace; its routes are not here "
            "and are left alone",
            path,
        )
        return generation, []
    items: list[Owned] = []
    raw_items = header.get("items")
    for raw in raw_items if isinstance(raw_items, list) else []:
        _apply(path, items, "+", raw, ifname)
    for raw_line in lines[1:]:
        if not raw_line:
            continue
        try:
            change = json.loads(raw_line)
        except (UnicodeDecodeError, ValueError):
            break  # a torn last line
        if isinstance(change, dict) and change.get("gen") == generation:
            _apply(path, items, change.get("op"), change.get("item"), ifname)
    return generation, items


def _apply(
    path: Path, items: list[Owned], op: object, raw: object, ifname: str | None = None
) -> None:
    try:
        item = _from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("%s: skipping an unreadable item (%s)", path, exc)
        return
    if ifname is not None and not _of_interface(item, ifname):
        logger.warning(
            "%s: skipping %s: not something the daemon for %s adds; left alone",
            path,
            item.describe(),
            ifname,
        )
        return
    if op == "+" and item not in items:
        items.append(item)
    elif op == "-" and item in items:
        items.remove(item)


class Ledger:
    """What the daemon added, in order; persisted through a ``LedgerFile`` when given
    (in-memory otherwise, as in unit tests)."""

    def __init__(self, store: LedgerFile | None = None, items: list[Owned] | None = None) -> None:
        """``items``: what ``store`` already holds (a previous instance's leftovers)."""
        self._items: dict[Owned, None] = dict.fromkeys(items or ())
        """In the order added (a dict: membership in O(1) for thousands of routes)."""
        self._store = store

    def items(self) -> list[Owned]:
        return list(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: Owned) -> None:
        if item not in self._items:
            self._items[item] = None
            if self._store is not None:
                self._store.record("+", item, self._items)

    def discard(self, item: Owned) -> None:
        if item in self._items:
            del self._items[item]
            if self._store is not None:
                self._store.record("-", item, self._items)

    def close(self) -> None:
        """Release the record; it stays on disk if anything could not be given back."""
        if self._store is not None:
            self._store.close(clean=not self._items)
            self._store = None
