"""The exceptions the secureio core raises.

Every failure that input from the network can provoke is one of these, so a caller can
catch ``SecureioError`` around a parser and know that nothing else (IndexError,
struct.error, ...) can escape: the fuzz tests hold the core to that.
"""

from __future__ import annotations


class SecureioError(Exception):
    """Base class of every error raised by ``secureiod.secureio``."""


class MalformedError(SecureioError):
    """Bytes that cannot be a valid structure (too short, lengths that run past the end)."""


class AuthenticationError(SecureioError):
    """A MAC or signature did not verify: the bytes were not made by a holder of the key."""


class InvalidKeyError(SecureioError):
    """A public key that must not be used: wrong length, all zero, or of low order."""


class IdentityError(SecureioError):
    """An identity or public-key file that cannot be used; the message names the file and fix."""


class PayloadTooBigError(SecureioError):
    """A message is larger than the session may send without fragmentation."""
