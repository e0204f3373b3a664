"""Where the tunnel's routes go, and the rules that keep the daemon's own datagrams out.

``table = "auto"`` (the default) is wg-quick's design:

* the daemon's UDP socket carries a firewall mark M (``SO_MARK``);
* a default route (0.0.0.0/0, ::/0) goes into a table T of its own, never into the main
  table, so the host's default route is not touched;
* rule ``lookup main suppress_prefixlength 0`` (priority P-1): every main-table route
  except a default route still wins, so the LAN and the host's specific routes stay;
* rule ``not fwmark M lookup T`` (priority P): all other unmarked traffic enters the
  tunnel, while the daemon's marked datagrams skip it and leave by the main table's
  default route, as before the tunnel existed;
* every other prefix goes into the main table as an ordinary route, where the kernel's
  longest-prefix match weighs it against the host's own routes (a site-to-site tunnel).

Why this and not a host route to each peer's endpoint via the current gateway (OpenVPN's
``def1``): that route must follow endpoints that roam or are DNS names and a gateway that
DHCP changes, and it goes stale without a sound; the mark follows the socket wherever its
datagrams go. T is the first table number from 51820 that no route and no rule uses (as
wg-quick picks it); M is ``fwmark`` if configured, else T. P is the highest free pair of
priorities below the main table's 32766, which is where ``ip rule add`` would put them.

``table = "off"`` installs nothing; ``table = N`` puts every route (default routes too)
into table N and adds no rule: the administrator's own rules decide what reaches it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ..netlink import RT_TABLE_MAIN, Rule
from .ports import Network

if TYPE_CHECKING:
    from ..config import InterfaceConfig
    from .ports import NetlinkPort

logger = logging.getLogger(__name__)

POLICY_TABLE_BASE: Final = 51820
"""The first table number tried for the full tunnel's default routes (wg-quick's)."""
MAX_POLICY_TABLE: Final = 0xFFFFFFFF
RULE_PRIORITY_TOP: Final = 32765
"""Just above the main table's rule (32766): where ``ip rule add`` puts a first rule."""
ALL_MARK_BITS: Final = 0xFFFFFFFF

MODE_AUTO: Final = "auto"
MODE_OFF: Final = "off"
MODE_TABLE: Final = "table"


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """How this run places routes (see module doc); decided once at start."""

    mode: str
    """``MODE_AUTO``, ``MODE_OFF`` or ``MODE_TABLE``."""
    table: int
    """The full tunnel's table T (auto) or the configured table (table); main for off."""
    fwmark: int | None
    """The UDP socket's mark, or None for no mark."""

    def table_for(self, net: Network) -> int | None:
        """The table ``net``'s route goes into, or None for no route."""
        if self.mode == MODE_OFF:
            return None
        if self.mode == MODE_TABLE:
            return self.table
        return self.table if net.prefixlen == 0 else RT_TABLE_MAIN

    def needs_rules(self, net: Network) -> bool:
        """Whether ``net``'s route only works with the policy rules (a full tunnel)."""
        return self.mode == MODE_AUTO and net.prefixlen == 0

    def describe(self) -> str:
        mark = f", fwmark {self.fwmark:#x}" if self.fwmark is not None else ""
        if self.mode == MODE_OFF:
            return f"table off (no routes){mark}"
        if self.mode == MODE_TABLE:
            return f"table {self.table} (no rules){mark}"
        return f"table auto (default routes in table {self.table}){mark}"


def decide_plan(interface: InterfaceConfig, netlink: NetlinkPort) -> RoutingPlan:
    """The plan for ``interface``'s ``table`` and ``fwmark``; with "auto", T is the first
    free table from ``POLICY_TABLE_BASE`` (run after a previous instance's leftovers are
    gone, so a restart finds the same T)."""
    table = interface.table
    if table == MODE_OFF:
        return RoutingPlan(MODE_OFF, RT_TABLE_MAIN, interface.fwmark)
    if table != MODE_AUTO:
        return RoutingPlan(MODE_TABLE, int(table), interface.fwmark)
    number = free_table(netlink)
    return RoutingPlan(MODE_AUTO, number, interface.fwmark or number)


def free_table(netlink: NetlinkPort) -> int:
    """The first table number from ``POLICY_TABLE_BASE`` that no route of either family
    and no rule refers to."""
    used = {route.table for route in netlink.list_routes()}
    for version in (4, 6):
        used.update(rule.table for rule in netlink.rules(version))
    number = POLICY_TABLE_BASE
    while number in used and number < MAX_POLICY_TABLE:
        number += 1
    return number


def policy_rules(version: int, plan: RoutingPlan, taken: Iterable[int]) -> tuple[Rule, Rule]:
    """(the suppress rule, the mark rule) for IP ``version``, at the highest pair of
    priorities below ``RULE_PRIORITY_TOP`` + 1 that no existing rule uses."""
    used = set(taken)
    priority = RULE_PRIORITY_TOP
    while priority > 1 and (priority in used or priority - 1 in used):
        priority -= 1
    assert plan.fwmark is not None, "a full tunnel needs a mark"
    suppress = Rule(version, priority - 1, RT_TABLE_MAIN, suppress_prefixlength=0)
    mark = Rule(
        version, priority, plan.table, fwmark=plan.fwmark, fwmask=ALL_MARK_BITS, invert=True
    )
    return suppress, mark


ProcReader = Callable[[str], str | None]


def _read_proc(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def strict_rp_filter(
    exclude: Iterable[str] = (),
    read: ProcReader = _read_proc,
    names: Iterable[str] | None = None,
) -> list[str]:
    """Devices whose effective IPv4 reverse-path filter is strict (``max(all, dev) == 1``).

    A full tunnel routes unmarked traffic into the tunnel, and the kernel's reverse-path
    check looks up a received datagram's source without a mark: a peer's datagrams
    arriving on a strict device then look as if they came in the wrong way and are dropped
    (``nft.py`` gives them their mark back, as wg-quick does)."""
    conf = "/proc/sys/net/ipv4/conf"
    all_value = read(f"{conf}/all/rp_filter")
    base = int(all_value) if all_value and all_value.isdigit() else 0
    skip = {"all", "default", "lo", *exclude}
    if names is None:
        try:
            names = sorted(p.name for p in Path(conf).iterdir())
        except OSError:
            names = []
    strict = []
    for name in names:
        if name in skip:
            continue
        value = read(f"{conf}/{name}/rp_filter")
        dev = int(value) if value and value.isdigit() else 0
        if max(base, dev) == 1:
            strict.append(name)
    return strict
