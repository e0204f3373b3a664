"""The protocol core stays sans-IO: importing it pulls in no socket, asyncio or threads."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("socket", "asyncio", "selectors", "threading", "ssl")


def test_core_imports_no_io_modules() -> None:
    code = (
        "import sys, secureiod.secureio, pkgutil, importlib\n"
        "import secureiod.secureio as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        "    importlib.import_module('secureiod.secureio.' + m.name)\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"secureiod.secureio imported {out}"


def test_core_imports_nothing_from_the_daemon() -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        "import secureiod.secureio as pkg\n"
        "for m in pkgutil.iter_modules(pkg.__path__):\n"
        "    importlib.import_module('secureiod.secureio.' + m.name)\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('secureiod.')\n"
        "    and not m.startswith('secureiod.secureio'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
