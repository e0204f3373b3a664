"""Tests of identity key files: Go-compatible PEM, OpenSSH keys, permissions, hostile input."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureiod.secureio.errors import IdentityError, InvalidKeyError
from secureiod.secureio.identity import (
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Identity,
    PublicKey,
    load_identity,
    load_or_create_identity,
    load_public_key,
    parse_identity,
    parse_public_key,
    resolve_public_key,
    write_identity,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "vectors.json").read_text())
PARTIES = VECTORS["parties"]
SSH_KEYGEN = shutil.which("ssh-keygen")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_private(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)
    return path


def _assert_one_line_error(exc: pytest.ExceptionInfo[IdentityError], *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    for needle in needles:
        assert needle in message, message
    return message


# --- OpenSSH key files, made by ssh-keygen or (if absent) by a tiny builder ------------------


def _ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _build_openssh_private(
    identity: Identity, *, cipher: bytes = b"none", public_blob: bytes | None = None
) -> str:
    """The openssh-key-v1 layout, for hosts without ssh-keygen."""
    if public_blob is None:
        public_blob = _ssh_string(b"ssh-ed25519") + _ssh_string(identity.public_key.raw)
    private = struct.pack(">II", 0x12345678, 0x12345678)
    private += _ssh_string(b"ssh-ed25519") + _ssh_string(identity.public_key.raw)
    private += _ssh_string(identity.private_key_64) + _ssh_string(b"test@host")
    private += bytes(range(1, 1 + (-len(private)) % 8))
    kdf = b"bcrypt" if cipher != b"none" else b"none"
    kdf_options = _ssh_string(b"\x00" * 16) + struct.pack(">I", 16) if cipher != b"none" else b""
    blob = b"openssh-key-v1\x00" + _ssh_string(cipher) + _ssh_string(kdf)
    blob += _ssh_string(kdf_options) + struct.pack(">I", 1) + _ssh_string(public_blob)
    blob += _ssh_string(private)
    body = base64.b64encode(blob).decode()
    lines = "".join(body[i : i + 70] + "\n" for i in range(0, len(body), 70))
    return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{lines}-----END OPENSSH PRIVATE KEY-----\n"


def _ssh_public_line(raw: bytes, comment: str = "") -> str:
    blob = _ssh_string(b"ssh-ed25519") + _ssh_string(raw)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}".rstrip()


def _ssh_keygen(path: Path, key_type: str = "ed25519", passphrase: str = "") -> Path:
    if SSH_KEYGEN is None:
        identity = Identity.generate()
        cipher = b"aes256-ctr" if passphrase else b"none"
        public_blob = _ssh_string(b"ssh-ed25519") + _ssh_string(identity.public_key.raw)
        if key_type == "rsa":  # only the public blob's type matters to the parser
            public_blob = _ssh_string(b"ssh-rsa") + _ssh_string(b"\x01\x00\x01") * 2
        text = _build_openssh_private(identity, cipher=cipher, public_blob=public_blob)
        _write_private(path, text)
        public_line = f"ssh-{key_type} {base64.b64encode(public_blob).decode()} x@y\n"
        Path(f"{path}.pub").write_text(public_line)
        return path
    args = [SSH_KEYGEN, "-t", key_type, "-N", passphrase, "-f", str(path), "-q", "-C", "t@h"]
    if key_type == "rsa":
        args[3:3] = ["-b", "1024"]  # fast; the size is irrelevant to the test
    subprocess.run(args, check=True, capture_output=True)
    return path


# --- vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("party", PARTIES, ids=lambda p: p["name"])
def test_vector_pem_files_load(tmp_path: Path, party: dict[str, str]) -> None:
    key = _write_private(tmp_path / PRIVATE_KEY_FILE, party["pem_id_ed25519"])
    (tmp_path / PUBLIC_KEY_FILE).write_text(party["pem_id_ed25519_pub"])
    for source in (key, tmp_path):
        identity = load_identity(source)
        assert identity.seed.hex() == party["ed25519_seed"]
        assert identity.public_key.raw.hex() == party["ed25519_public_key"]
        assert identity.private_key_64.hex() == party["ed25519_private_key_64"]
    public = load_public_key(tmp_path / PUBLIC_KEY_FILE)
    assert public.raw.hex() == party["ed25519_public_key"]


@pytest.mark.parametrize("party", PARTIES, ids=lambda p: p["name"])
def test_vector_pem_written_byte_for_byte(tmp_path: Path, party: dict[str, str]) -> None:
    identity = Identity.from_seed(bytes.fromhex(party["ed25519_seed"]))
    assert identity == Identity.from_private_key_64(bytes.fromhex(party["ed25519_private_key_64"]))
    write_identity(tmp_path / "id", identity)
    assert (tmp_path / "id" / PRIVATE_KEY_FILE).read_text() == party["pem_id_ed25519"]
    assert (tmp_path / "id" / PUBLIC_KEY_FILE).read_text() == party["pem_id_ed25519_pub"]


def test_repr_hides_seed() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    for text in (repr(identity), str(identity)):
        assert identity.seed.hex() not in text
        assert repr(identity.seed) not in text
        assert base64.b64encode(identity.seed).decode() not in text
    assert str(identity.public_key) in repr(identity)


def test_bad_seed_and_public_key_lengths() -> None:
    with pytest.raises(IdentityError):
        Identity.from_seed(b"\x00" * 31)
    with pytest.raises(IdentityError):
        Identity.from_private_key_64(b"\x00" * 63)
    with pytest.raises(InvalidKeyError):
        PublicKey(b"\x00" * 33)


# --- write / load / create -------------------------------------------------------------------


def test_generate_write_load_round_trip(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "identity"
    identity = Identity.generate()
    write_identity(directory, identity)
    assert _mode(directory) == 0o700
    assert _mode(directory / PRIVATE_KEY_FILE) == 0o600
    assert _mode(directory / PUBLIC_KEY_FILE) == 0o644
    assert load_identity(directory) == identity
    assert load_public_key(directory / PUBLIC_KEY_FILE) == identity.public_key
    assert sorted(p.name for p in directory.iterdir()) == [PRIVATE_KEY_FILE, PUBLIC_KEY_FILE]


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_written_modes_do_not_depend_on_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_identity(tmp_path / "id", Identity.generate())
    finally:
        os.umask(old)
    assert _mode(tmp_path / "id") == 0o700
    assert _mode(tmp_path / "id" / PRIVATE_KEY_FILE) == 0o600
    assert _mode(tmp_path / "id" / PUBLIC_KEY_FILE) == 0o644


def test_write_identity_refuses_to_overwrite(tmp_path: Path) -> None:
    first, second = Identity.generate(), Identity.generate()
    write_identity(tmp_path, first)
    with pytest.raises(IdentityError) as exc:
        write_identity(tmp_path, second)
    _assert_one_line_error(exc, str(tmp_path / PRIVATE_KEY_FILE), "already exists")
    assert load_identity(tmp_path) == first
    write_identity(tmp_path, second, overwrite=True)
    assert load_identity(tmp_path) == second
    assert load_public_key(tmp_path / PUBLIC_KEY_FILE) == second.public_key
    assert _mode(tmp_path / PRIVATE_KEY_FILE) == 0o600


def test_load_or_create_on_missing_path(tmp_path: Path) -> None:
    directory = tmp_path / "new"
    identity = load_or_create_identity(directory)
    assert _mode(directory) == 0o700
    assert _mode(directory / PRIVATE_KEY_FILE) == 0o600
    assert load_public_key(directory / PUBLIC_KEY_FILE) == identity.public_key
    assert load_or_create_identity(directory) == identity


def test_load_or_create_on_existing_dir_keeps_key(tmp_path: Path) -> None:
    party = PARTIES[0]
    key = _write_private(tmp_path / PRIVATE_KEY_FILE, party["pem_id_ed25519"])
    identity = load_or_create_identity(tmp_path)
    assert identity.seed.hex() == party["ed25519_seed"]
    assert key.read_text() == party["pem_id_ed25519"]
    # the missing .pub was written
    assert (tmp_path / PUBLIC_KEY_FILE).read_text() == party["pem_id_ed25519_pub"]
    assert _mode(tmp_path / PUBLIC_KEY_FILE) == 0o644


def test_load_or_create_on_empty_dir_and_on_file(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    assert load_identity(tmp_path / PRIVATE_KEY_FILE) == identity
    assert load_or_create_identity(tmp_path / PRIVATE_KEY_FILE) == identity


def test_write_identity_into_a_file_path_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IdentityError) as exc:
        write_identity(blocker, Identity.generate())
    _assert_one_line_error(exc, str(blocker), "not a directory")


# --- permissions and bad files ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o606, 0o644])
def test_private_key_accessible_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = _write_private(tmp_path / PRIVATE_KEY_FILE, PARTIES[0]["pem_id_ed25519"], mode)
    for path in (key, tmp_path):
        with pytest.raises(IdentityError) as exc:
            load_identity(path)
        _assert_one_line_error(exc, str(key), f"mode {mode:04o}", f"chmod 600 {key}")
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)


def test_missing_and_non_regular_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError) as exc:
        load_identity(tmp_path / "nope")
    _assert_one_line_error(exc, str(tmp_path / "nope"), "does not exist")
    with pytest.raises(IdentityError) as exc:
        load_identity(tmp_path)  # a directory without id_ed25519
    _assert_one_line_error(exc, str(tmp_path / PRIVATE_KEY_FILE), "does not exist")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(IdentityError) as exc:
        load_identity(tmp_path / "fifo")
    _assert_one_line_error(exc, "not a regular file")
    with pytest.raises(IdentityError) as exc:
        load_public_key(tmp_path)
    _assert_one_line_error(exc, "directory")
    for bad_path in ("bad\0path", str(tmp_path / "nul\0")):
        with pytest.raises(IdentityError):
            load_identity(bad_path)
        with pytest.raises(IdentityError):
            resolve_public_key(bad_path)
        with pytest.raises(IdentityError):
            load_or_create_identity(bad_path)


def test_symlinked_key_file_loads(tmp_path: Path) -> None:
    key = _write_private(tmp_path / "real", PARTIES[0]["pem_id_ed25519"])
    (tmp_path / "link").symlink_to(key)
    assert load_identity(tmp_path / "link").seed.hex() == PARTIES[0]["ed25519_seed"]


def test_unreadable_private_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _write_private(tmp_path / PRIVATE_KEY_FILE, PARTIES[0]["pem_id_ed25519"], 0o000)
    if os.geteuid() == 0:  # root reads any file: make the open fail as it would for a user
        real_open = os.open

        def refusing_open(path: object, *args: object, **kwargs: object) -> int:
            if Path(str(path)) == key:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(IdentityError) as exc:
        load_identity(key)
    _assert_one_line_error(exc, str(key), "permission denied")


def _pem(label: str, body: bytes) -> str:
    text = base64.b64encode(body).decode()
    return f"-----BEGIN {label}-----\n{text}\n-----END {label}-----\n"


GOOD_64 = bytes.fromhex(PARTIES[0]["ed25519_private_key_64"])
OTHER_PUBLIC = bytes.fromhex(PARTIES[1]["ed25519_public_key"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "no PEM block"),
        ("just some text\n", "no PEM block"),
        (_pem("RSA PRIVATE KEY", GOOD_64), "RSA"),
        (_pem("PRIVATE KEY", GOOD_64), "PKCS#8"),
        (_pem("ED25519 PUBLIC KEY", GOOD_64[32:]), "public key"),
        (
            "-----BEGIN ED25519 PRIVATE KEY-----\n!!!!\n-----END ED25519 PRIVATE KEY-----\n",
            "base64",
        ),
        (_pem("ED25519 PRIVATE KEY", GOOD_64)[:-30], "no END line"),
        (_pem("ED25519 PRIVATE KEY", GOOD_64[:32]), "64 bytes"),
        (_pem("ED25519 PRIVATE KEY", GOOD_64 + b"\x00"), "got 65"),
        (_pem("ED25519 PRIVATE KEY", GOOD_64[:32] + OTHER_PUBLIC), "does not match its seed"),
        (_pem("OPENSSH PRIVATE KEY", b"garbage"), "openssh-key-v1"),
        (b"\xff\xfe-----BEGIN", "not a text"),
    ],
)
def test_bad_private_files(tmp_path: Path, content: str | bytes, needle: str) -> None:
    key = _write_private(tmp_path / "key", content)
    with pytest.raises(IdentityError) as exc:
        load_identity(key)
    _assert_one_line_error(exc, str(key), needle)


def test_mismatching_public_half_is_refused() -> None:
    with pytest.raises(IdentityError) as exc:
        Identity.from_private_key_64(GOOD_64[:32] + OTHER_PUBLIC)
    _assert_one_line_error(exc, "does not match")
    with pytest.raises(IdentityError):
        Identity(GOOD_64[:32], PublicKey(OTHER_PUBLIC))


# --- OpenSSH ---------------------------------------------------------------------------------


def test_openssh_private_key_loads(tmp_path: Path) -> None:
    key = _ssh_keygen(tmp_path / "key")
    identity = load_identity(key)
    public_line = Path(f"{key}.pub").read_text()
    assert parse_public_key(public_line) == identity.public_key
    assert load_public_key(f"{key}.pub") == identity.public_key
    assert identity.public_key.verify(identity.sign(b"hello"), b"hello")


def test_openssh_builder_matches_parser() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    assert parse_identity(_build_openssh_private(identity)) == identity


def test_openssh_encrypted_key_is_refused(tmp_path: Path) -> None:
    key = _ssh_keygen(tmp_path / "key", passphrase="secretpass")
    with pytest.raises(IdentityError) as exc:
        load_identity(key)
    _assert_one_line_error(exc, str(key), "passphrase", f'ssh-keygen -p -N "" -f {key}', "PEM")


def test_openssh_rsa_key_is_refused(tmp_path: Path) -> None:
    key = _ssh_keygen(tmp_path / "key", key_type="rsa")
    with pytest.raises(IdentityError) as exc:
        load_identity(key)
    _assert_one_line_error(exc, str(key), "ssh-rsa", "ssh-keygen -t ed25519")
    with pytest.raises(IdentityError) as exc:
        load_public_key(f"{key}.pub")
    _assert_one_line_error(exc, "ssh-rsa")


def test_openssh_truncated_blob(tmp_path: Path) -> None:
    text = _build_openssh_private(Identity.generate())
    blob = base64.b64decode("".join(text.splitlines()[1:-1]))
    for cut in (len(blob) - 1, len(blob) - 40, 60, 20):
        key = _write_private(tmp_path / f"key{cut}", _pem("OPENSSH PRIVATE KEY", blob[:cut]))
        with pytest.raises(IdentityError) as exc:
            load_identity(key)
        _assert_one_line_error(exc, str(key))


# --- public keys -----------------------------------------------------------------------------


PUBLIC_RAW = bytes.fromhex(PARTIES[0]["ed25519_public_key"])
PUBLIC_B64 = base64.b64encode(PUBLIC_RAW).decode()
RSA_TYPED_BLOB = base64.b64encode(_ssh_string(b"ssh-rsa") + _ssh_string(PUBLIC_RAW)).decode()


@pytest.mark.parametrize(
    "text",
    [
        PARTIES[0]["pem_id_ed25519_pub"],
        PUBLIC_B64,
        f"  {PUBLIC_B64}\n",
        _ssh_public_line(PUBLIC_RAW),
        _ssh_public_line(PUBLIC_RAW, "alice@example.org"),
        _ssh_public_line(PUBLIC_RAW, "comment with spaces") + "\n",
    ],
)
def test_parse_public_key_forms(text: str) -> None:
    key = parse_public_key(text)
    assert key.raw == PUBLIC_RAW
    assert resolve_public_key(text) == key
    assert str(key) == key.to_base64() == PUBLIC_B64


def test_public_key_files_and_resolve(tmp_path: Path) -> None:
    pem_file = tmp_path / "peer.pub"
    pem_file.write_text(PARTIES[0]["pem_id_ed25519_pub"])
    ssh_file = tmp_path / "peer_ssh.pub"
    ssh_file.write_text(_ssh_public_line(PUBLIC_RAW, "c") + "\n")
    b64_file = tmp_path / "peer.b64"
    b64_file.write_text(PUBLIC_B64 + "\n")
    for path in (pem_file, ssh_file, b64_file):
        assert load_public_key(path).raw == PUBLIC_RAW
        assert resolve_public_key(str(path)).raw == PUBLIC_RAW
    with pytest.raises(IdentityError) as exc:
        resolve_public_key(str(tmp_path / "missing.pub"))
    _assert_one_line_error(exc, "missing.pub", "does not exist")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("hello world", "not a public key"),
        ("AAAA", "32 bytes"),
        (base64.b64encode(b"\x01" * 33).decode(), "32 bytes"),
        ("@@@@", "base64"),
        ("ssh-ed25519", "no key"),
        ("ssh-ed25519 !!!!", "base64"),
        (f"ssh-ed25519 {base64.b64encode(b'xx').decode()}", "truncated"),
        (_ssh_public_line(PUBLIC_RAW[:31]), "truncated"),
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ c", "ssh-rsa"),
        (f"ssh-ed25519 {RSA_TYPED_BLOB}", "ssh-rsa"),
        (PARTIES[0]["pem_id_ed25519"], "private key"),
        (_pem("ED25519 PUBLIC KEY", PUBLIC_RAW + b"\x00"), "got 33"),
        (_pem("PUBLIC KEY", PUBLIC_RAW), "PUBLIC KEY"),
        (base64.b64encode(bytes(32)).decode(), "not a valid"),
        ("ключ", "base64"),
    ],
)
def test_parse_public_key_garbage(text: str, needle: str) -> None:
    with pytest.raises(IdentityError) as exc:
        parse_public_key(text, source="peer")
    message = _assert_one_line_error(exc, needle)
    assert message.startswith("peer: ")


# --- signatures ------------------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert len(signature) == 64
    assert identity.public_key.verify(signature, b"message")
    assert not identity.public_key.verify(signature, b"messagE")
    for bit in (0, 100, 511):
        flipped = bytearray(signature)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not identity.public_key.verify(bytes(flipped), b"message")
    for bad in (b"", signature[:63], signature + b"\x00", b"\x00" * 64, b"\xff" * 64):
        assert not identity.public_key.verify(bad, b"message")
    assert not Identity.generate().public_key.verify(signature, b"message")
    assert not identity.public_key.verify(None, b"message")  # type: ignore[arg-type]


def test_signature_matches_cryptography() -> None:
    seed = bytes.fromhex(PARTIES[1]["ed25519_seed"])
    identity = Identity.from_seed(seed)
    reference = Ed25519PrivateKey.from_private_bytes(seed)
    for message in (b"", b"abc", bytes(range(256)) * 5):
        assert identity.sign(message) == reference.sign(message)
    public = reference.public_key().public_bytes_raw()
    assert identity.public_key.raw == public


# --- fuzz ------------------------------------------------------------------------------------


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif choice == 1 and out:
            del out[rng.randrange(len(out)) :]
        elif choice == 2:
            pos = rng.randint(0, len(out))
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif out:
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 8)]
    return bytes(out)


def _mutate_pem_body(rng: random.Random, text: str) -> str:
    """Mutate the decoded bytes inside a PEM block, to reach the binary parsers."""
    lines = text.splitlines()
    label = lines[0][11:-5]
    body = base64.b64decode("".join(lines[1:-1]))
    return _pem(label, _mutate(rng, body))


def test_fuzz_parse_public_key() -> None:
    rng = random.Random(1234)
    seeds = [
        PARTIES[0]["pem_id_ed25519_pub"],
        PUBLIC_B64,
        _ssh_public_line(PUBLIC_RAW, "comment"),
    ]
    for i in range(3000):
        seed = seeds[i % len(seeds)]
        if i % 3 == 0 and "BEGIN" in seed:
            text = _mutate_pem_body(rng, seed)
        elif i % 3 == 1 and seed.startswith("ssh-"):
            blob = base64.b64decode(seed.split()[1])
            text = f"ssh-ed25519 {base64.b64encode(_mutate(rng, blob)).decode()}"
        else:
            text = _mutate(rng, seed.encode()).decode("utf-8", errors="replace")
        try:
            parse_public_key(text)
        except IdentityError as exc:
            assert "\n" not in str(exc)


def test_fuzz_private_file_parser(tmp_path: Path) -> None:
    rng = random.Random(5678)
    seeds = [PARTIES[0]["pem_id_ed25519"], _build_openssh_private(Identity.from_seed(b"\x07" * 32))]
    key = tmp_path / "key"
    for i in range(2000):
        seed = seeds[i % len(seeds)]
        data = _mutate_pem_body(rng, seed).encode() if i % 2 else _mutate(rng, seed.encode())
        _write_private(key, data)
        try:
            load_identity(key)
        except (IdentityError, InvalidKeyError) as exc:
            assert "\n" not in str(exc)
