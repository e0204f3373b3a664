"""secureiod: a VPN daemon that carries IP packets over secureio sessions."""

__version__ = "0.1.0"
