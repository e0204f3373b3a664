"""``secureioctl cat``: netcat over one secureio session, without a daemon.

A test client for interoperability and debugging: each stdin line is one message, each
received message one stdout line. It talks to another ``secureioctl cat``, to a program
using ``secureiod.aio``, or to a Go program using xaionaro-go/secureio on a UDP socket.

When it ends:

* ``--count N``: after the N-th received message (exit 0);
* ``--timeout SEC``: when the time is up, exit 1 if ``--count`` was not reached (or stdin
  messages could not be sent), else 0;
* otherwise, at EOF on stdin once everything read was handed to the socket (exit 0), unless
  ``--echo`` makes it a server that runs until killed;
* the session closing by itself (e.g. the peer never answered the key exchange): exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import BinaryIO, Final

from ..aio import SecureSession, SendInfo, connect, listen
from ..endpoint import format_endpoint, parse_endpoint
from ..logs import setup_cli_logging
from ..secretfile import SecretFileError, read_psk_file
from ..secureio.constants import DEFAULT_PAYLOAD_SIZE_LIMIT
from ..secureio.errors import IdentityError, PayloadTooBigError, SecureioError
from ..secureio.identity import Identity, PublicKey, load_or_create_identity, resolve_public_key
from ..secureio.keyexchange import KeyExchangeOptions
from ..secureio.negotiation import MIN_PROBE_SIZE, NegotiationOptions
from ..secureio.session import QueueFullError, SessionOptions
from ..secureio.wire import MessageType
from . import EXIT_FAILURE, EXIT_OK, CliError, add_logging_arguments

NAME: Final = "cat"
HELP: Final = "send stdin lines to a peer and print what it sends, over one secureio session"
DESCRIPTION: Final = (
    HELP
    + """

Each stdin line (without its newline) is one message; each received message is printed
as one line. Both sides need each other's public key. Example, two terminals:

  secureioctl cat --identity ~/.secureio/bob --peer alice.pub --listen :5000 --echo
  secureioctl cat --identity ~/.secureio/alice --peer bob.pub --connect 10.0.0.2:5000

Without --count or --timeout the command ends at EOF on stdin once everything was sent
(not with --echo, which keeps serving). State changes are reported on stderr."""
)

logger = logging.getLogger("secureiod.cli.cat")

_LINGER: Final = 10.0
"""Seconds to wait at EOF for the last messages to go out when no --timeout bounds it: a
handshake with retries takes a few seconds at worst; longer means no peer."""
_STDIN_CHUNK: Final = 65536
_STDIN_QUEUE: Final = 16
"""Chunks of lines in flight between the stdin thread and the loop: the back pressure
that keeps a fast producer from filling memory while the session is not yet up."""
_SEND_WINDOW: Final = 64
"""Messages written before waiting for an earlier one to reach the socket."""


@dataclass(frozen=True)
class CatConfig:
    """Everything the run needs, validated: building it is where bad input is caught."""

    identity: Identity
    peer: PublicKey
    endpoint: tuple[str, int]
    listen: bool
    options: SessionOptions
    message_type: int
    echo: bool
    hex: bool
    count: int | None
    timeout: float | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity",
        required=True,
        metavar="PATH",
        help="identity directory (id_ed25519 inside; created if missing) or private key file",
    )
    parser.add_argument(
        "--peer",
        required=True,
        metavar="KEY",
        help="the peer's public key: a file (PEM or OpenSSH) or the key itself "
        "(base64, or an 'ssh-ed25519 ...' line)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="HOST:PORT", help="send to the peer at this address")
    where.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="wait for the peer on this address (':PORT' for all IPv4 addresses)",
    )
    parser.add_argument(
        "--psk-file",
        metavar="FILE",
        help="pre-shared key: the file's bytes, one trailing newline removed; both sides "
        "need the same; the file must not be readable by others (chmod 600)",
    )
    parser.add_argument(
        "--channel",
        type=_channel,
        metavar="N",
        help="use user channel N instead of the default read/write stream",
    )
    parser.add_argument("--echo", action="store_true", help="send every received message back")
    parser.add_argument(
        "--hex", action="store_true", help="messages are hex on stdin and stdout (binary data)"
    )
    parser.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit 0 after receiving N messages"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SEC",
        help="give up after SEC seconds (exit 1 unless the work is done)",
    )
    parser.add_argument(
        "--negotiation",
        choices=("auto", "on", "off"),
        default="auto",
        help="path-size probing after the key exchange; must match the peer. auto = on, as "
        "the reference does on UDP (default: auto)",
    )
    parser.add_argument(
        "--fragment",
        action="store_true",
        help="split messages above the payload size into fragments and accept the peer's "
        "(a Go peer sends them outside session encryption)",
    )
    parser.add_argument(
        "--payload-limit",
        type=_payload_limit,
        metavar="N",
        help=f"largest payload per packet before negotiation; must match the peer "
        f"(default: {SessionOptions().payload_size_limit}, the reference's UDP value)",
    )
    parser.add_argument(
        "--key-update-interval",
        type=_positive_float,
        metavar="SEC",
        help=f"seconds between key rotations (default: "
        f"{KeyExchangeOptions().key_update_interval:g})",
    )
    add_logging_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_cli_logging(
        f"secureioctl {NAME}",
        args.verbose,
        args.quiet,
        informative=("secureiod.aio", logger.name),
    )
    config = build_config(args)
    return asyncio.run(_Cat(config).run())


# -- validation ----------------------------------------------------------------------------


def _channel(text: str) -> int:
    try:
        return MessageType.channel(int(text, 0))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"channel must be a number in 0..{MessageType.MAX_CHANNEL}, got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _payload_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not MIN_PROBE_SIZE <= value <= DEFAULT_PAYLOAD_SIZE_LIMIT:
        raise argparse.ArgumentTypeError(
            f"payload limit must be in {MIN_PROBE_SIZE}..{DEFAULT_PAYLOAD_SIZE_LIMIT}, got {text!r}"
        )
    return value


def _read_psk(path: str) -> bytes:
    """The daemon's PSK policy (``secretfile``): a key ``cat`` accepts works in a config."""
    try:
        return read_psk_file(path)
    except SecretFileError as exc:
        raise CliError(f"--psk-file: {exc}") from None


def build_config(args: argparse.Namespace) -> CatConfig:
    """Turn arguments into a ``CatConfig``; every problem is a one-line ``CliError``."""
    is_listen = args.listen is not None
    option, text = ("--listen", args.listen) if is_listen else ("--connect", args.connect)
    try:
        endpoint = parse_endpoint(text)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}") from None
    if not is_listen and (not endpoint[0] or endpoint[1] == 0):
        raise CliError(f"--connect {text}: give the peer's host and a non-zero port")
    try:
        peer = resolve_public_key(args.peer)
    except (IdentityError, SecureioError, ValueError) as exc:
        raise CliError(f"--peer: {exc}") from None
    try:
        identity = load_or_create_identity(args.identity)
    except (IdentityError, SecureioError) as exc:
        raise CliError(f"--identity: {exc}") from None
    except OSError as exc:
        raise CliError(f"--identity {args.identity}: {exc.strerror or exc}") from None
    psk = _read_psk(args.psk_file) if args.psk_file is not None else None

    kx = KeyExchangeOptions()
    kx_changes: dict[str, object] = {}
    if args.key_update_interval is not None:
        kx_changes["key_update_interval"] = args.key_update_interval
    if is_listen:
        # A listener waits for a peer that may come later than the first rotation's timeout.
        kx_changes["timeout"] = None
    kx = KeyExchangeOptions(**{**_fields(kx), **kx_changes})
    if args.fragment:
        logger.warning(
            "--fragment accepts fragments in packets outside session encryption (as a Go "
            "peer sends them): without a PSK they are unauthenticated and anyone can inject "
            "messages"
        )
    defaults = SessionOptions()
    options = SessionOptions(
        payload_size_limit=args.payload_limit or defaults.payload_size_limit,
        key_exchange=kx,
        psk=psk,
        negotiation=NegotiationOptions(enabled=args.negotiation != "off"),
        enable_fragmentation=args.fragment,
        accept_unencrypted_fragments=args.fragment,
    )
    return CatConfig(
        identity=identity,
        peer=peer,
        endpoint=endpoint,
        listen=is_listen,
        options=options,
        message_type=args.channel if args.channel is not None else MessageType.READ_WRITE,
        echo=args.echo,
        hex=args.hex,
        count=args.count,
        timeout=args.timeout,
    )


def _fields(options: KeyExchangeOptions) -> dict[str, object]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


# -- the run -------------------------------------------------------------------------------


class _Cat:
    """One run: the session, the stdin pump, the stdout printer and the end conditions."""

    def __init__(self, config: CatConfig) -> None:
        self._cfg = config
        self._out: BinaryIO = sys.stdout.buffer
        self._received = 0
        self._last_sent: SendInfo | None = None
        """The newest message from stdin: FIFO, so once it is out, all are."""
        self._finished: asyncio.Future[int] | None = None
        self._session: SecureSession | None = None

    async def run(self) -> int:
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        session = self._session = await self._open()
        try:
            session.set_handler(cfg.message_type, self._on_message)
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, self._finish, 128 + signum)
            tasks = [
                asyncio.create_task(self._pump_stdin(session)),
                asyncio.create_task(self._watch_close(session)),
            ]
            try:
                code = await asyncio.wait_for(asyncio.shield(self._finished), cfg.timeout)
            except TimeoutError:
                code = self._timed_out()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            await session.close()
        return code

    async def _open(self) -> SecureSession:
        cfg = self._cfg
        host, port = cfg.endpoint
        text = format_endpoint(cfg.endpoint) if host else f":{port}"
        try:
            if cfg.listen:
                session = await listen(cfg.identity, cfg.peer, cfg.endpoint, options=cfg.options)
                logger.info("listening on %s", format_endpoint(session.local_address))
            else:
                session = await connect(cfg.identity, cfg.peer, cfg.endpoint, options=cfg.options)
                logger.info("connecting to %s", format_endpoint(session.remote_address or ("", 0)))
        except socket.gaierror as exc:
            option = "--listen" if cfg.listen else "--connect"
            raise CliError(f"{option} {text}: cannot resolve {host!r}: {exc.strerror}") from None
        except OSError as exc:
            what = f"--listen {text}: cannot listen" if cfg.listen else f"--connect {text}"
            raise CliError(f"{what}: {_explain(exc)}") from None
        return session

    # -- receiving --------------------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        cfg = self._cfg
        line = payload.hex().encode("ascii") if cfg.hex else payload
        try:
            self._out.write(line + b"\n")
            self._out.flush()
        except BrokenPipeError:
            # The reader went away (e.g. `| head`): stop quietly, as cat does.
            _silence_stdout()
            self._finish(EXIT_OK)
            return
        if cfg.echo and self._session is not None and not self._session.closed:
            try:
                self._session.write_message_async(cfg.message_type, payload)
            except (PayloadTooBigError, QueueFullError) as exc:
                logger.warning("cannot echo a %d-byte message: %s", len(payload), exc)
        self._received += 1
        if cfg.count is not None and self._received >= cfg.count:
            self._finish(EXIT_OK)

    async def _watch_close(self, session: SecureSession) -> None:
        await session.wait_closed()
        logger.error(
            "the session ended by itself (%s): is the peer running, with this key and the "
            "same PSK, payload limit and negotiation setting?",
            session.close_reason,
        )
        self._finish(EXIT_FAILURE)

    # -- sending ----------------------------------------------------------------------

    async def _pump_stdin(self, session: SecureSession) -> None:
        """Send stdin's lines; at EOF decide, per the end rules, whether that ends the run."""
        cfg = self._cfg
        queue: asyncio.Queue[list[bytes] | None] = asyncio.Queue(_STDIN_QUEUE)
        _start_stdin_thread(asyncio.get_running_loop(), queue)
        lineno = 0
        sent_since_wait = 0
        last: SendInfo | None = None
        while (chunk := await queue.get()) is not None:
            for raw in chunk:
                lineno += 1
                payload = self._decode(raw, lineno)
                if payload is None:
                    continue
                info = await self._send(session, payload, lineno)
                if info is None:
                    continue
                sent_since_wait += 1
                if sent_since_wait >= _SEND_WINDOW and last is not None:
                    await last.wait()
                    sent_since_wait = 0
                last = self._last_sent = info
        if cfg.count is not None or cfg.timeout is not None or cfg.echo:
            if last is not None:
                await last.wait()
            return
        if last is not None:
            try:
                await asyncio.wait_for(last.wait(), _LINGER)
            except TimeoutError:
                logger.error(
                    "messages from stdin were not sent within %g s (session %s): is the peer "
                    "running, with this key?",
                    _LINGER,
                    session.state.name.lower().replace("_", "-"),
                )
                self._finish(EXIT_FAILURE)
                return
            if last.error is not None:
                logger.error("the last message was not sent: %s", last.error)
                self._finish(EXIT_FAILURE)
                return
        self._finish(EXIT_OK)

    def _decode(self, raw: bytes, lineno: int) -> bytes | None:
        if not self._cfg.hex:
            return raw
        try:
            return bytes.fromhex(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            logger.warning("stdin line %d skipped: not hex (--hex is on)", lineno)
            return None

    async def _send(self, session: SecureSession, payload: bytes, lineno: int) -> SendInfo | None:
        mtype = self._cfg.message_type
        while True:
            try:
                return session.write_message_async(mtype, payload)
            except QueueFullError:
                # More lines than the session holds before the handshake: wait for it.
                await session.wait_established()
            except PayloadTooBigError:
                logger.warning(
                    "stdin line %d skipped: %d bytes is more than the session's %d-byte payload "
                    "size (use --fragment on both sides)",
                    lineno,
                    len(payload),
                    session.payload_size,
                )
                return None

    # -- ending -----------------------------------------------------------------------

    def _finish(self, code: int) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(code)

    def _timed_out(self) -> int:
        cfg = self._cfg
        session = self._session
        state = session.state.name.lower().replace("_", "-") if session else "?"
        if cfg.count is not None and self._received < cfg.count:
            logger.error(
                "timed out after %g s: received %d of %d messages (session %s)",
                cfg.timeout,
                self._received,
                cfg.count,
                state,
            )
            return EXIT_FAILURE
        last = self._last_sent
        if last is not None and (not last.done() or last.error is not None):
            logger.error(
                "timed out after %g s: messages from stdin were not sent (session %s)",
                cfg.timeout,
                state,
            )
            return EXIT_FAILURE
        return EXIT_OK


def _start_stdin_thread(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[bytes] | None]
) -> None:
    """Read stdin in a daemon thread with plain ``os.read``.

    A thread, because stdin may be a regular file, which an event loop cannot watch; raw
    ``os.read``, because a daemon thread blocked inside ``sys.stdin.buffer`` holds its lock
    and aborts the interpreter at exit.
    """

    def put(item: list[bytes] | None) -> bool:
        try:
            asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            return False  # the loop is closed or shutting down: we are exiting
        return True

    def reader() -> None:
        pending = bytearray()
        while True:
            try:
                chunk = os.read(0, _STDIN_CHUNK)
            except OSError as exc:
                logger.warning("cannot read stdin: %s", exc.strerror or exc)
                chunk = b""
            if not chunk:
                break
            pending += chunk
            if b"\n" not in chunk:
                continue
            lines = pending.split(b"\n")
            pending = bytearray(lines.pop())
            if not put([bytes(line) for line in lines]):
                return
        if pending:  # a last line without its newline is still a message
            put([bytes(pending)])
        put(None)

    threading.Thread(target=reader, name="stdin", daemon=True).start()


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not
    print a BrokenPipeError traceback (the recipe from the Python signal docs)."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _explain(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"{reason} (another process uses that port; pick another)"
    if exc.errno == errno.EACCES:
        return f"{reason} (ports below 1024 need root; pick a higher port)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{reason} (that address is not on this host)"
    return reason
