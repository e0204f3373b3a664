"""Reading a pre-shared key file: one policy for the daemon's config and ``secureioctl cat``.

A PSK is a secret, so it is read the way a private key is: a file that others can read is
refused rather than used (the secret is already spread, and silently accepting it teaches
nobody to fix it); the checks run on the opened descriptor (``fstat``), so a path swapped
for a symlink or a FIFO between a check and the open cannot slip through; the size is
bounded and an empty file is refused, because an empty PSK is one everybody knows.
The key is the file's bytes with one trailing newline removed (what ``echo`` and editors
add), so a text key and the same key written with ``printf`` agree.
"""

from __future__ import annotations

import os
import stat
from typing import Final

__all__ = ["MAX_PSK_SIZE", "SecretFileError", "read_psk_file"]

MAX_PSK_SIZE: Final = 64 * 1024
"""Far above any real key; only bounds what a wrong path (a log, a disk image) costs."""
_CHUNK: Final = 65536


class SecretFileError(ValueError):
    """A secret file that cannot be used; the message is one line: file, problem, fix."""


def read_psk_file(path: str | os.PathLike[str]) -> bytes:
    """The PSK in ``path``; raises ``SecretFileError`` for anything the policy refuses."""
    shown = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(
            f"{shown}: pre-shared key file does not exist (both peers need the same file)"
        ) from None
    except PermissionError:
        raise SecretFileError(
            f"{shown}: cannot read the pre-shared key: permission denied (run as its owner)"
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        why = getattr(exc, "strerror", None) or exc
        raise SecretFileError(f"{shown}: cannot open the pre-shared key: {why}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise SecretFileError(f"{shown}: pre-shared key file is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{shown}: pre-shared key file is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretFileError(
                f"{shown}: pre-shared key is accessible by others (mode {mode:04o}); "
                f"fix with: chmod 600 {shown}"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_PSK_SIZE and (chunk := os.read(fd, _CHUNK)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise SecretFileError(
            f"{shown}: cannot read the pre-shared key: {exc.strerror or exc}"
        ) from None
    finally:
        os.close(fd)
    if size > MAX_PSK_SIZE:
        raise SecretFileError(
            f"{shown}: file is too large to be a pre-shared key (over {MAX_PSK_SIZE} bytes)"
        )
    data = b"".join(chunks).removesuffix(b"\n")
    if not data:
        raise SecretFileError(
            f"{shown}: pre-shared key file is empty; create one with: "
            f"(umask 077; head -c 32 /dev/urandom | base64 > {shown})"
        )
    return data
