"""Dropping root: become an unprivileged user that keeps only the capabilities it needs.

It knows nothing of secureio. The daemon needs root only to open the TUN device and to
bind, and CAP_NET_ADMIN for the rest of its life (link MTU, addresses and routes as peers
come and go). Everything else — reading any file, loading modules, ptrace — is what a bug
in packet parsing would hand an attacker, so it is given up once startup is done:

1. ``PR_SET_KEEPCAPS`` so ``setuid`` keeps the permitted set instead of clearing it;
2. drop every other capability from the bounding set (while CAP_SETPCAP is still held), so
   nothing can come back through ``execve`` of a file with capabilities;
3. supplementary groups, gid, then uid (in that order: after ``setuid`` we may no longer
   change groups);
4. ``capset`` so permitted and effective hold exactly the kept capabilities;
5. ``PR_SET_NO_NEW_PRIVS`` so no set-uid program can raise privileges again.

Capabilities are per thread on Linux, so this must run before any thread is started; it
refuses otherwise. ``capget``/``capset`` come from libc through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CAPABILITIES",
    "PrivilegeError",
    "bounding_set",
    "capability_mask",
    "current_capabilities",
    "drop_privileges",
    "permitted_capabilities",
]

logger = logging.getLogger(__name__)

# include/uapi/linux/capability.h, in bit order.
CAPABILITIES: Final = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_CAP_BITS: Final = {name: bit for bit, name in enumerate(CAPABILITIES)}
_CAP_SETPCAP: Final = _CAP_BITS["CAP_SETPCAP"]

_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_PR_CAPBSET_READ: Final = 23
_PR_CAPBSET_DROP: Final = 24
_PR_SET_KEEPCAPS: Final = 8
_PR_SET_NO_NEW_PRIVS: Final = 38


class PrivilegeError(Exception):
    """Dropping privileges failed or was refused; ``str()`` is one line for the operator.

    After a failure part-way through, the process is in an unknown state and should exit.
    """


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


@dataclass(frozen=True, slots=True)
class _Libc:
    """The few libc entry points we call, loaded on use (nothing at import time)."""

    cdll: ctypes.CDLL

    @classmethod
    def load(cls) -> _Libc:
        return cls(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))

    def prctl(self, option: int, arg: int, what: str) -> int:
        result = int(self.cdll.prctl(option, ctypes.c_ulong(arg), 0, 0, 0))
        if result < 0:
            code = ctypes.get_errno()
            raise PrivilegeError(f"{what} failed: {os.strerror(code)}")
        return result

    def capget(self) -> tuple[int, int, int]:
        """(effective, permitted, inheritable) masks of the calling thread."""
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        if self.cdll.capget(ctypes.byref(header), data) != 0:
            raise PrivilegeError(f"capget failed: {os.strerror(ctypes.get_errno())}")
        return tuple(  # type: ignore[return-value]
            getattr(data[0], part) | (getattr(data[1], part) << 32)
            for part in ("effective", "permitted", "inheritable")
        )

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for index in (0, 1):
            shift = 32 * index
            data[index].effective = (effective >> shift) & 0xFFFFFFFF
            data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
            data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
        if self.cdll.capset(ctypes.byref(header), data) != 0:
            raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def capability_mask(names: Iterable[str]) -> int:
    """The bit mask for capability names (``CAP_NET_ADMIN`` or ``net_admin``)."""
    mask = 0
    for name in names:
        key = name.strip().upper()
        if not key.startswith("CAP_"):
            key = "CAP_" + key
        bit = _CAP_BITS.get(key)
        if bit is None:
            raise ValueError(f"unknown capability {name!r}")
        mask |= 1 << bit
    return mask


def _names(mask: int) -> set[str]:
    return {
        CAPABILITIES[bit] if bit < len(CAPABILITIES) else f"CAP_{bit}"
        for bit in range(mask.bit_length())
        if mask >> bit & 1
    }


def _status_field(field: str) -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise PrivilegeError(f"/proc/self/status has no {field} line")


def _status_mask(field: str) -> int:
    return int(_status_field(field), 16)


def current_capabilities() -> set[str]:
    """The effective capabilities (``CapEff``) of this process: what it can do right now."""
    return _names(_status_mask("CapEff"))


def permitted_capabilities() -> set[str]:
    """``CapPrm``: what this process could still make effective."""
    return _names(_status_mask("CapPrm"))


def bounding_set() -> set[str]:
    """``CapBnd``: the most this process or anything it executes can ever hold."""
    return _names(_status_mask("CapBnd"))


def _resolve(user: str, group: str | None) -> tuple[str, int, int]:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise PrivilegeError(
            f"user {user!r} does not exist: create it (e.g. `useradd --system {user}`) "
            "or choose another in the configuration"
        ) from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, OverflowError):
            raise PrivilegeError(f"group {group!r} does not exist") from None
    return entry.pw_name, entry.pw_uid, gid


def drop_privileges(
    user: str,
    keep_caps: Iterable[str] = ("CAP_NET_ADMIN",),
    *,
    group: str | None = None,
    no_new_privs: bool = True,
) -> None:
    """Become ``user`` (name or uid; its primary group unless ``group``), keeping only
    ``keep_caps`` in the permitted and effective sets (see the module doc for the steps).

    Must be called as root, before any thread starts; descriptors opened earlier (the TUN
    device, bound sockets) stay usable. Raises ``PrivilegeError`` with one line otherwise.
    """
    keep = capability_mask(keep_caps)
    name, uid, gid = _resolve(user, group)
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to user {name!r}: not running as root")
    threads = int(_status_field("Threads"))
    if threads != 1:
        raise PrivilegeError(
            f"cannot drop privileges with {threads} threads running: capabilities are per "
            "thread, so drop them before starting any"
        )
    libc = _Libc.load()
    _, permitted, _ = libc.capget()
    missing = keep & ~permitted
    if missing:
        raise PrivilegeError(f"cannot keep {', '.join(sorted(_names(missing)))}: not held now")

    if permitted >> _CAP_SETPCAP & 1:
        for bit in range(len(CAPABILITIES)):
            if not keep >> bit & 1 and libc.prctl(_PR_CAPBSET_READ, bit, "PR_CAPBSET_READ") == 1:
                libc.prctl(_PR_CAPBSET_DROP, bit, f"dropping {CAPABILITIES[bit]} from bounding")
    else:
        logger.debug("no CAP_SETPCAP: the capability bounding set is left as it is")

    libc.prctl(_PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {name!r}: {exc.strerror or exc}") from None
    libc.capset(keep, keep, 0)
    libc.prctl(_PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    if no_new_privs:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")

    # Trust, but verify: a silent partial drop is the worst outcome.
    effective, permitted, _ = libc.capget()
    if effective != keep or permitted != keep or os.getresuid() != (uid, uid, uid):
        raise PrivilegeError(f"privileges were not dropped as asked for user {name!r}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("still able to become root after dropping privileges")
    logger.info(
        "running as %s (uid %d, gid %d) with %s",
        name,
        uid,
        gid,
        ", ".join(sorted(_names(keep))) or "no capabilities",
    )
