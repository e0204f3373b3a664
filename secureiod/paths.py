"""Where secureiod keeps things on the host: one place for every default path.

``/etc/secureiod/<interface>.toml`` is an interface's config (``secureiod -i IFNAME``);
``/run/secureiod/`` holds the control sockets (``<interface>.sock``) and whatever else a
running daemon must find again after a crash. The unit's ``RuntimeDirectory=secureiod`` and
the packaging use the same names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

CONFIG_DIR: Final = Path("/etc/secureiod")
RUN_DIR: Final = Path("/run/secureiod")


def config_path(interface: str) -> Path:
    """The config file ``secureiod -i <interface>`` reads."""
    return CONFIG_DIR / f"{interface}.toml"


def control_socket_path(interface: str) -> Path:
    """The control socket a daemon for ``<interface>`` serves unless its config says else."""
    return RUN_DIR / f"{interface}.sock"
