"""Ed25519 identities: the long-term keys that sign every key exchange.

File formats follow the reference Go library's identity directory (``id_ed25519`` holding a PEM
``ED25519 PRIVATE KEY`` with the 64-byte ``seed || public`` body, and ``id_ed25519.pub``), so a
directory made by either implementation works with the other.  We are stricter than Go where
leniency only hides mistakes: PEM labels are checked, the stored public half is recomputed from
the seed, and a private key readable by others is refused.  Every problem with a file surfaces as
one single-line ``IdentityError`` that names the file and, where there is one, the fix, because
these messages end up in front of an administrator starting the daemon.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from .errors import IdentityError, InvalidKeyError

__all__ = [
    "PRIVATE_KEY_FILE",
    "PUBLIC_KEY_FILE",
    "Identity",
    "PublicKey",
    "load_identity",
    "load_or_create_identity",
    "load_public_key",
    "parse_identity",
    "parse_public_key",
    "resolve_public_key",
    "write_identity",
]

PRIVATE_KEY_FILE = "id_ed25519"
PUBLIC_KEY_FILE = "id_ed25519.pub"
PEM_PRIVATE_LABEL = "ED25519 PRIVATE KEY"
PEM_PUBLIC_LABEL = "ED25519 PUBLIC KEY"
_OPENSSH_LABEL = "OPENSSH PRIVATE KEY"
_OPENSSH_MAGIC = b"openssh-key-v1\x00"
_SSH_ED25519 = "ssh-ed25519"
_MAX_KEY_FILE_SIZE = 64 * 1024  # far above any key file; stops us slurping a mistaken path
_SSH_KEY_TYPE_RE = re.compile(r"^(ssh-|ecdsa-|sk-)\S*$")
_BASE64_32_RE = re.compile(r"^[A-Za-z0-9+/]{43}=$")


def _fail(source: object, problem: str) -> IdentityError:
    return IdentityError(f"{source}: {problem}")


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _show(value: str | bytes, limit: int = 40) -> str:
    """Quote untrusted text so an error message stays one short line whatever it contains."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    text = repr(value[:limit])
    return text + "..." if len(value) > limit else text


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A peer's (or our own) Ed25519 public key.

    The nacl ``VerifyKey`` is built once here because verification runs for every key-exchange
    message and the object is otherwise rebuilt from bytes each time.
    """

    raw: bytes
    _verify_key: VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes | bytearray | memoryview):
            kind = type(self.raw).__name__
            raise InvalidKeyError(f"Ed25519 public key must be bytes, not {kind}")
        raw = bytes(self.raw)
        if len(raw) != 32:
            raise InvalidKeyError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "_verify_key", VerifyKey(raw))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Check a detached signature; returns False rather than raising so that hostile
        network input can never turn into an exception path."""
        try:
            if len(signature) != 64:
                return False
            self._verify_key.verify(bytes(data), bytes(signature))
        except (CryptoError, ValueError, TypeError):
            return False
        return True

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def to_pem(self) -> str:
        return _pem_encode(PEM_PUBLIC_LABEL, self.raw)

    def __str__(self) -> str:
        return self.to_base64()

    def __repr__(self) -> str:
        return f"PublicKey({self.to_base64()!r})"


@dataclass(frozen=True, slots=True, repr=False)
class Identity:
    """The local Ed25519 key pair.

    The constructor insists that ``public_key`` is the one derived from ``seed``: a mismatched
    pair would sign with one key while advertising another, and peers would reject us with no
    hint why.
    """

    seed: bytes
    public_key: PublicKey
    _signing_key: SigningKey = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise IdentityError("Ed25519 seed must be 32 bytes")
        signing_key = SigningKey(self.seed)
        if bytes(signing_key.verify_key) != self.public_key.raw:
            raise IdentityError("public key does not match the seed of the private key")
        object.__setattr__(self, "_signing_key", signing_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if not isinstance(seed, bytes | bytearray) or len(seed) != 32:
            raise IdentityError("Ed25519 seed must be 32 bytes")
        seed = bytes(seed)
        return cls(seed, PublicKey(bytes(SigningKey(seed).verify_key)))

    @classmethod
    def from_private_key_64(cls, blob: bytes) -> Identity:
        """Accept Go's ``seed || public`` layout, recomputing the public half instead of
        trusting it as Go does, so a corrupted or spliced file is caught at load time."""
        return _identity_from_64(blob, None)

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(bytes(SigningKey.generate()))

    @property
    def private_key_64(self) -> bytes:
        return self.seed + self.public_key.raw

    def sign(self, data: bytes) -> bytes:
        """Return a detached, deterministic (pure Ed25519) 64-byte signature."""
        return self._signing_key.sign(bytes(data)).signature

    def to_pem(self) -> str:
        return _pem_encode(PEM_PRIVATE_LABEL, self.private_key_64)

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key})"


def _identity_from_64(blob: bytes, source: str | None) -> Identity:
    where = "" if source is None else f"{source}: "
    if len(blob) != 64:
        raise IdentityError(
            f"{where}private key must be 64 bytes (seed || public), got {len(blob)}"
        )
    identity = Identity.from_seed(bytes(blob[:32]))
    if identity.public_key.raw != bytes(blob[32:]):
        raise IdentityError(
            f"{where}the public half of the private key does not match its seed "
            "(file corrupted or spliced from two keys)"
        )
    return identity


# --- PEM -----------------------------------------------------------------------------------


def _pem_encode(label: str, data: bytes) -> str:
    """Byte-for-byte what Go's encoding/pem writes, so files diff cleanly between the two."""
    body = base64.b64encode(data).decode("ascii")
    lines = "".join(body[i : i + 64] + "\n" for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}-----END {label}-----\n"


def _b64decode(text: str, source: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII str input
        raise _fail(source, f"bad base64 in {what}") from None


def _pem_decode(text: str, source: str) -> tuple[str, bytes]:
    """Decode the first PEM block (as Go does) and return its label with the body."""
    lines = [line.strip() for line in text.splitlines()]
    begins = (i for i, line in enumerate(lines) if line.startswith("-----BEGIN "))
    start = next(begins, None)
    if start is None or not lines[start].endswith("-----") or len(lines[start]) <= 16:
        raise _fail(source, "no PEM block found (expected a '-----BEGIN ...-----' line)")
    label = lines[start][11:-5]
    end = f"-----END {label}-----"
    body: list[str] = []
    for stripped in lines[start + 1 :]:
        if stripped == end:
            break
        if stripped.startswith("-----"):
            raise _fail(source, f"PEM block {_show(label)} has a mismatched END line")
        if ":" in stripped:
            raise _fail(source, "PEM headers are not supported (is the key encrypted?)")
        body.append(stripped)
    else:
        raise _fail(source, f"PEM block {_show(label)} has no END line (file truncated?)")
    return label, _b64decode("".join(body), source, "the PEM body")


_FOREIGN_PRIVATE_LABELS = {
    "RSA PRIVATE KEY": "an RSA key",
    "EC PRIVATE KEY": "an EC key",
    "DSA PRIVATE KEY": "a DSA key",
    "PRIVATE KEY": "a PKCS#8 key",
    "ENCRYPTED PRIVATE KEY": "an encrypted PKCS#8 key",
}


def parse_identity(text: str, *, source: str = "<inline>") -> Identity:
    """Parse the text of a private key file: Go-style PEM or unencrypted OpenSSH."""
    label, body = _pem_decode(text, source)
    if label == PEM_PRIVATE_LABEL:
        return _identity_from_64(body, source)
    if label == _OPENSSH_LABEL:
        return _parse_openssh_private(body, source)
    if label in (PEM_PUBLIC_LABEL, "PUBLIC KEY"):
        raise _fail(source, f"this is a public key ({label}); an identity needs the private key")
    kind = _FOREIGN_PRIVATE_LABELS.get(label, "not a supported key")
    raise _fail(
        source,
        f"PEM label is {_show(label)} ({kind}); expected {PEM_PRIVATE_LABEL!r} or an OpenSSH "
        "ed25519 key (ssh-keygen -t ed25519)",
    )


# --- OpenSSH -------------------------------------------------------------------------------


@dataclass(slots=True)
class _SSHReader:
    """Cursor over SSH wire encoding; any overrun becomes one 'truncated' error."""

    data: bytes
    source: str
    what: str
    pos: int = 0

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise self.truncated()
        (value,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return value

    def string(self) -> bytes:
        length = self.u32()
        if self.pos + length > len(self.data):
            raise self.truncated()
        value = self.data[self.pos : self.pos + length]
        self.pos += length
        return value

    def rest(self) -> bytes:
        return self.data[self.pos :]

    def truncated(self) -> IdentityError:
        return _fail(self.source, f"{self.what} is truncated or corrupt")


def _parse_ssh_public_blob(blob: bytes, source: str, what: str) -> bytes:
    reader = _SSHReader(blob, source, what)
    key_type = reader.string()
    if key_type != _SSH_ED25519.encode():
        raise _wrong_ssh_type(source, key_type)
    raw = reader.string()
    if len(raw) != 32 or reader.rest():
        raise reader.truncated()
    return raw


def _wrong_ssh_type(source: str, key_type: bytes | str) -> IdentityError:
    return _fail(
        source,
        f"OpenSSH key is of type {_show(key_type)}, not ssh-ed25519; "
        "create one with: ssh-keygen -t ed25519",
    )


def _parse_openssh_private(blob: bytes, source: str) -> Identity:
    if not blob.startswith(_OPENSSH_MAGIC):
        raise _fail(source, "OPENSSH PRIVATE KEY block lacks the openssh-key-v1 magic")
    reader = _SSHReader(blob, source, "OpenSSH private key")
    reader.pos = len(_OPENSSH_MAGIC)
    cipher, _kdf, _kdf_options = reader.string(), reader.string(), reader.string()
    count = reader.u32()
    if count != 1:
        raise _fail(source, f"OpenSSH file holds {count} keys; expected exactly 1")
    public = _parse_ssh_public_blob(reader.string(), source, "OpenSSH public key section")
    if cipher != b"none":
        raise _fail(
            source,
            f'key is passphrase-protected; remove the passphrase with: ssh-keygen -p -N "" '
            f"-f {source} (or use a PEM identity)",
        )
    private = _SSHReader(reader.string(), source, "OpenSSH private section")
    if reader.rest():
        raise reader.truncated()
    if private.u32() != private.u32():
        raise _fail(source, "OpenSSH private section is corrupt (check integers differ)")
    key_type = private.string()
    if key_type != _SSH_ED25519.encode():
        raise _wrong_ssh_type(source, key_type)
    public_again, secret, _comment = private.string(), private.string(), private.string()
    padding = private.rest()
    if len(padding) >= 255 or padding != bytes(range(1, len(padding) + 1)):
        raise private.truncated()
    if public_again != public or len(secret) != 64:
        raise private.truncated()
    return _identity_from_64(secret, source)


# --- public keys ---------------------------------------------------------------------------

_PUBLIC_FORMS = "expected base64 of 32 bytes, an 'ssh-ed25519 AAAA...' line, or a PEM public key"


def parse_public_key(text: str, *, source: str = "<inline>") -> PublicKey:
    """Parse a public key given as PEM, an OpenSSH public line, or bare base64 of 32 bytes.

    Beyond the length we require a canonical point of the prime-order subgroup: every real key
    is one, and a mistyped base64 key is caught here rather than as a silent handshake failure.
    """
    if not isinstance(text, str):
        raise _fail(source, f"public key must be text, not {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise _fail(source, f"empty public key; {_PUBLIC_FORMS}")
    if "-----BEGIN " in stripped:
        label, raw = _pem_decode(stripped, source)
        if label != PEM_PUBLIC_LABEL:
            hint = " (that is a private key; give the public key)" if "PRIVATE" in label else ""
            raise _fail(source, f"PEM label is {_show(label)}, expected {PEM_PUBLIC_LABEL!r}{hint}")
        what = "PEM public key"
    else:
        words = stripped.split(maxsplit=2)
        if _SSH_KEY_TYPE_RE.match(words[0]):
            if words[0] != _SSH_ED25519:
                raise _wrong_ssh_type(source, words[0])
            if len(words) < 2:
                raise _fail(source, "ssh-ed25519 line has no key after the type")
            blob = _b64decode(words[1], source, "the ssh-ed25519 line")
            raw = _parse_ssh_public_blob(blob, source, "ssh-ed25519 key blob")
            what = "ssh-ed25519 key"
        elif len(words) == 1:
            raw = _b64decode(stripped, source, f"the public key; {_PUBLIC_FORMS}")
            what = "base64 public key"
        else:
            raise _fail(source, f"not a public key; {_PUBLIC_FORMS}")
    if len(raw) != 32:
        raise _fail(source, f"{what} must be 32 bytes, got {len(raw)}")
    if not nacl.bindings.crypto_core_ed25519_is_valid_point(raw):
        raise _fail(source, f"{what} is not a valid Ed25519 public key (not a curve point)")
    return PublicKey(raw)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    return parse_public_key(_read_key_file(Path(path), private=False), source=str(path))


def _looks_inline(value: str) -> bool:
    stripped = value.strip()
    if "-----BEGIN " in stripped or _BASE64_32_RE.match(stripped):
        return True
    words = stripped.split()
    return bool(words) and bool(_SSH_KEY_TYPE_RE.match(words[0]))


def resolve_public_key(value: str) -> PublicKey:
    """Accept a key written inline in a config or a path to a key file.

    Text that looks like a key (PEM, ``ssh-...`` line, 44-character base64) is parsed inline and
    its error is reported as such; anything else is taken as a path, so a typo in a path gives
    "no such file" rather than a confusing base64 error.
    """
    if _looks_inline(value):
        return parse_public_key(value)
    return load_public_key(value)


# --- files ---------------------------------------------------------------------------------


def _read_key_file(path: Path, *, private: bool) -> str:
    what = "private key" if private else "public key"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            kind = "a directory" if os.path.isdir(path) else "not a regular file"
            raise _fail(path, f"{what} file is {kind}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise _fail(path, f"{what} file does not exist") from None
    except PermissionError:
        raise _fail(path, f"cannot read the {what}: permission denied (run as its owner)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise _fail(path, f"cannot open the {what}: {_why(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _fail(path, f"{what} file is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if private and mode & 0o077:
            raise _fail(
                path,
                f"private key is accessible by others (mode {mode:04o}); "
                f"fix with: chmod 600 {path}",
            )
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_KEY_FILE_SIZE and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _fail(path, f"cannot read the {what}: {_why(exc)}") from None
    finally:
        os.close(fd)
    if size > _MAX_KEY_FILE_SIZE:
        raise _fail(path, f"file is too large to be a {what} (over {_MAX_KEY_FILE_SIZE} bytes)")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, f"not a text {what} file (expected PEM or OpenSSH text)") from None


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a private key from a key file (PEM or OpenSSH) or an identity directory, whose key
    is ``id_ed25519`` as in the reference layout."""
    key_path = Path(path)
    if os.path.isdir(key_path):
        key_path = key_path / PRIVATE_KEY_FILE
    return parse_identity(_read_key_file(key_path, private=True), source=str(key_path))


def _write_atomic(path: Path, data: bytes, mode: int, *, replace: bool) -> bool:
    """Write via a temp file created with its final mode, so a reader never sees a partial
    file and a private key is never world-readable.  With ``replace=False`` the file is
    published with link(), which fails if it exists: two daemons racing to create an identity
    then agree on one key.  Returns False if the file existed and was left alone."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # umask may have narrowed it; never widens beyond ``mode``
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links
            if os.path.lexists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _make_dir(directory: Path) -> None:
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
    except (OSError, ValueError) as exc:
        raise _fail(directory, f"cannot create the identity directory: {_why(exc)}") from None
    if not os.path.isdir(directory):
        raise _fail(directory, "identity path exists but is not a directory")


def _write_file(path: Path, text: str, mode: int, *, replace: bool) -> bool:
    try:
        return _write_atomic(path, text.encode("ascii"), mode, replace=replace)
    except (OSError, ValueError) as exc:
        raise _fail(path, f"cannot write: {_why(exc)}") from None


def _write_identity(directory: Path, identity: Identity, *, overwrite: bool) -> bool:
    _make_dir(directory)
    if not _write_file(directory / PRIVATE_KEY_FILE, identity.to_pem(), 0o600, replace=overwrite):
        return False
    _write_file(directory / PUBLIC_KEY_FILE, identity.public_key.to_pem(), 0o644, replace=True)
    _fsync_dir(directory)
    return True


def write_identity(
    directory: str | os.PathLike[str], identity: Identity, *, overwrite: bool = False
) -> None:
    """Write ``id_ed25519`` (0600) and ``id_ed25519.pub`` (0644) into ``directory`` (created
    0700).  An existing private key is kept unless ``overwrite`` is set, because replacing it
    silently would lock this host out of every peer that knows the old public key."""
    directory = Path(directory)
    if not _write_identity(directory, identity, overwrite=overwrite):
        raise _fail(
            directory / PRIVATE_KEY_FILE,
            "private key already exists; refusing to overwrite it (move it away first)",
        )


def write_identity_file(
    path: str | os.PathLike[str], identity: Identity, *, overwrite: bool = False
) -> Path:
    """Write the private key to ``path`` (0600) and its public key to ``path.pub`` (0644),
    creating the parent directory (0700) if needed; for configs that name a key file, as
    ``private_key = "/etc/secureiod/id_ed25519"`` does. Returns the public file's path."""
    path = Path(path)
    if os.path.isdir(path):
        raise _fail(path, "is a directory; give a file name, e.g. " + str(path / PRIVATE_KEY_FILE))
    _make_dir(path.parent)
    if not _write_file(path, identity.to_pem(), 0o600, replace=overwrite):
        raise _fail(
            path, "private key already exists; refusing to overwrite it (move it away first)"
        )
    public = path.with_name(path.name + ".pub")
    _write_file(public, identity.public_key.to_pem(), 0o644, replace=True)
    _fsync_dir(path.parent)
    return public


def load_or_create_identity(path: str | os.PathLike[str]) -> Identity:
    """Load the identity at ``path``, creating one on first start (Go's ``NewIdentity(dir)``).

    - an existing file is loaded as a key file (PEM or OpenSSH), never modified;
    - an existing directory has its ``id_ed25519`` loaded; if that is missing, a new key pair is
      generated into both files; if only ``id_ed25519.pub`` is missing, it is written (best
      effort: a read-only directory does not stop the daemon, the public file is a convenience);
    - a path that does not exist is created as a directory (0700) and a key pair generated in it.
    """
    path = Path(path)
    if os.path.isdir(path):
        key_path = path / PRIVATE_KEY_FILE
        if os.path.lexists(key_path):
            identity = load_identity(key_path)
            public_path = path / PUBLIC_KEY_FILE
            if not os.path.lexists(public_path):
                with contextlib.suppress(IdentityError):
                    pem = identity.public_key.to_pem()
                    _write_file(public_path, pem, 0o644, replace=False)
            return identity
    elif os.path.lexists(path):
        return load_identity(path)
    identity = Identity.generate()
    if _write_identity(path, identity, overwrite=False):
        return identity
    return load_identity(path / PRIVATE_KEY_FILE)  # another process created it first
