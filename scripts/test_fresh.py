#!/usr/bin/env python3
"""``make test-fresh``: does the committed project work for a newcomer on a fresh Debian 12?

The developer's own machine hides what a newcomer lacks: packages installed long ago, a
warm ``.venv``, caches, ``../shared``, a ``/dev/net/tun`` that udev made 0666. This check
runs the project where none of that exists:

1. a minimal Debian 12 root (``debootstrap --variant=minbase`` plus git, make, python3,
   iproute2), built once and cached in ``/var/cache/secureiod-test/fresh``;
2. a throwaway overlay of it whose writable layer is a tmpfs, so its root is an overlayfs,
   as in a Docker build or a chroot on overlay;
3. the committed HEAD of this repository cloned into it (``/root/secureiod``: no
   ``../shared``, no work-tree changes);
4. ``make test``, then ``make demo``, run there as root (chrooted), with the host's
   ``/dev`` (whatever mode its ``/dev/net/tun`` has), a fresh ``/proc`` and ``/run``, the
   host's ``/sys`` and the host's network (apt and pip download), with what any machine
   on that network needs to reach it: the host's name servers, proxy variables and
   trusted CA certificates (as a local CA file, for HTTPS through intercepting proxies).
   Nothing else of the host's environment goes in.

It prints one summary line last and exits non-zero unless both passed.

Cleanup, even when interrupted: everything runs in a private mount namespace and a new
PID namespace (``unshare``) whose first process is this script. When it exits (normally,
on Ctrl-C, or SIGKILLed: the namespace's init then takes every process in it along, and a
SIGKILLed parent takes the init along through PR_SET_PDEATHSIG), the kernel kills every
process left inside (daemons, containers, pytest) and drops every mount made inside (the
tmpfs, the overlay, the binds, ``/run/netns``), freeing the network namespaces the tests
named there and the links in them. Nothing deletes a namespace or link by name, so
nothing the run did not create is touched. The one thing on the host filesystem is an
empty mount-point directory in /var/tmp, removed at the end (and by the next run if this
one was SIGKILLed).

What is cached between runs (downloads and roots, never results), in the cache directory:
the minimal root, apt's downloaded .debs, pip's download cache and the packaging tests'
own container root. ``--no-download-cache`` starts those three empty (on the tmpfs) and
``--rebuild`` rebuilds the minimal root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("SECUREIOD_FRESH_CACHE", "/var/cache/secureiod-test/fresh"))
SUITE = "bookworm"
# What the newcomer starts from: minbase plus the tools to fetch and run the
# project. Everything else must come from `make`'s own bootstrap.
INCLUDE = "git,make,python3,iproute2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CLONE = "/root/secureiod"
STEPS = ("test", "demo")
TIMEOUTS = {"test": 60 * 60.0, "demo": 15 * 60.0}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_PREFIX = "secureiod-fresh-"
# pytest's last line, e.g. "== 301 passed, 2 skipped in 412.34s (0:06:52) ==" (or -q's).
PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|errors?)\b.* in [\d.]+s\b.*?)\s*=*$")
PR_SET_PDEATHSIG = 1
# The host's network settings that the root inherits (a machine on this network has them).
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


def log(message: str) -> None:
    print(f"test-fresh: {message}", file=sys.stderr, flush=True)


@dataclass
class StepResult:
    name: str
    exit_code: int | None = None
    seconds: float = 0.0
    pytest: str = ""
    """The last pytest summary the step printed, if any."""
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


@dataclass
class Outcome:
    head: str = ""
    steps: list[StepResult] = field(default_factory=list)
    error: str = ""


# --- outer: the cached root, the namespaces, the summary ----------------------------------


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {output}")
    return result


def apt_mirror() -> str:
    """The mirror this host's apt uses for bookworm (the packaging tests' own lookup)."""
    sys.path.insert(0, str(REPO / "packaging" / "tests"))
    try:
        from secureiod_nspawn import apt_mirror as lookup
    except ImportError:
        return DEFAULT_MIRROR
    finally:
        sys.path.pop(0)
    return lookup()


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap") is not None:
        return
    log("installing debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        run(["apt-get", "update", "-qq"], env=env)
        run(cmd, env=env)


def cached_root(rebuild: bool) -> Path:
    """The minimal root, debootstrapped once (under a lock) and reused read-only."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE}".encode()).hexdigest()[:12]
    root = CACHE / f"{SUITE}-minbase-{key}"
    stamp = root.with_name(root.name + ".complete")
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if rebuild:
            stamp.unlink(missing_ok=True)
        if stamp.exists() and (root / "usr/bin/make").exists():
            return root
        ensure_debootstrap()
        mirror = apt_mirror()
        log(f"debootstrap {SUITE} (minbase + {INCLUDE}) from {mirror} into {root}")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE))
        try:
            argv = ["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(tmp)]
            run([*argv, mirror], timeout=1800)
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        stamp.write_text(f"{SUITE} {mirror}\n{INCLUDE}\n")
        log(f"debootstrap took {time.monotonic() - started:.0f} s")
        return root


def head_commit() -> str:
    return run(["git", "-C", str(REPO), "rev-parse", "HEAD"]).stdout.strip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_mountpoints() -> None:
    """Empty mount points of runs that were SIGKILLed (their mounts died with them)."""
    for entry in Path("/var/tmp").glob(f"{MOUNT_PREFIX}*"):
        m = re.match(rf"^{re.escape(MOUNT_PREFIX)}(\d+)-", entry.name)
        if m and not _pid_alive(int(m.group(1))) and not os.path.ismount(entry):
            with contextlib.suppress(OSError):
                entry.rmdir()


def _die_with_parent() -> None:
    """In the unshare child: SIGKILL when this script dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _signal_children(pid: int, signum: int) -> None:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), signum)


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def summary(outcome: Outcome, total: float) -> tuple[str, bool]:
    passed = not outcome.error and [s.name for s in outcome.steps] == list(STEPS)
    parts = []
    for step in outcome.steps:
        passed = passed and step.passed
        if step.exit_code is None:
            state = f"did not finish ({step.note})" if step.note else "did not finish"
        else:
            state = "passed" if step.passed else f"FAILED (exit {step.exit_code})"
        detail = f"{step.pytest}; " if step.pytest else ""
        parts.append(f"make {step.name} {state} ({detail}{format_seconds(step.seconds)})")
    said = outcome.steps and outcome.steps[-1].note == outcome.error
    if outcome.error and not said:
        parts.append(outcome.error)
    head = outcome.head[:12] or "?"
    verdict = "PASSED" if passed else "FAILED"
    text = f"test-fresh {verdict}: HEAD {head}: {', '.join(parts) or 'nothing ran'}"
    return f"{text}; total {format_seconds(total)}", passed


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("test-fresh: error: run as root (debootstrap, chroot, mounts)", file=sys.stderr)
        return 2
    started = time.monotonic()
    outcome = Outcome()
    mountpoint: Path | None = None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` acts as Ctrl-C
    try:
        outcome.head = head_commit()
        root = cached_root(args.rebuild)
        remove_stale_mountpoints()
        for d in ("apt-archives", "pip", "nspawn"):
            (CACHE / d).mkdir(parents=True, exist_ok=True)
        mountpoint = Path(tempfile.mkdtemp(prefix=f"{MOUNT_PREFIX}{os.getpid()}-", dir="/var/tmp"))
        read_fd, write_fd = os.pipe()
        argv = [
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
            sys.executable, str(Path(__file__).resolve()), "--inner",
            "--lower", str(root), "--mountpoint", str(mountpoint), "--head", outcome.head,
            "--result-fd", str(write_fd),
        ]  # fmt: skip
        if args.no_download_cache:
            argv.append("--no-download-cache")
        log(f"HEAD {outcome.head[:12]}: make test, then make demo, in a fresh {SUITE} root")
        with subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, pass_fds=(write_fd,), preexec_fn=_die_with_parent
        ) as proc:
            os.close(write_fd)
            with os.fdopen(read_fd) as results:
                try:
                    report = results.read()
                except KeyboardInterrupt:
                    # unshare does not pass signals on: tell the run itself, which stops,
                    # reports how far it got and ends (a second Ctrl-C stops waiting).
                    _signal_children(proc.pid, signal.SIGTERM)
                    report = results.read()
            proc.wait()
        if report.strip():
            data = json.loads(report)
            outcome.steps = [StepResult(**s) for s in data["steps"]]
            outcome.error = data["error"]
        if proc.returncode != 0 and not outcome.error:
            outcome.error = f"the run ended with exit {proc.returncode}"
    except KeyboardInterrupt:
        outcome.error = "interrupted"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        outcome.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        if mountpoint is not None:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
    line, passed = summary(outcome, time.monotonic() - started)
    print(line, flush=True)
    return 0 if passed else 1


# --- inner: PID 1 of the new PID namespace, in a private mount namespace ------------------


def mount(*argv: str) -> None:
    run(["mount", *argv])


def prepare_root(args: argparse.Namespace) -> Path:
    """The overlay root with what a booted Debian would have mounted, and the clone."""
    top = Path(args.mountpoint)
    mount("-t", "tmpfs", "-o", "mode=0755", "secureiod-fresh", str(top))
    for d in ("upper", "work", "root"):
        (top / d).mkdir()
    root = top / "root"
    mount(
        "-t", "overlay", "secureiod-fresh", "-o",
        f"lowerdir={args.lower},upperdir={top}/upper,workdir={top}/work", str(root),
    )  # fmt: skip
    mount("--rbind", "/dev", str(root / "dev"))
    mount("-t", "proc", "proc", str(root / "proc"))
    mount("--rbind", "/sys", str(root / "sys"))
    mount("-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", str(root / "run"))
    # Caches of downloads (and of the packaging tests' container root), not of results.
    caches = {
        "apt-archives": root / "var/cache/apt/archives",
        "pip": root / "root/.cache/pip",
        "nspawn": root / "var/cache/secureiod-test",
    }
    for name, target in caches.items():
        target.mkdir(parents=True, exist_ok=True)
        source = top / "caches" / name if args.no_download_cache else CACHE / name
        source.mkdir(parents=True, exist_ok=True)
        mount("--bind", str(source), str(target))
    (caches["apt-archives"] / "partial").mkdir(exist_ok=True)
    # What a real host has and a debootstrap root lacks: name resolution for apt and pip,
    # and (as in every chroot or container build) no service starts from package scripts.
    etc = root / "etc"
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
    if not (etc / "hosts").exists() or not (etc / "hosts").read_text().strip():
        (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    # A machine on this network trusts what this host trusts: where HTTPS goes through an
    # intercepting proxy, pip reaches PyPI only with the proxy's CA. Debian's own way in:
    # a local CA file, which update-ca-certificates adds to the system bundle when
    # `make test` installs ca-certificates.
    host_trust = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_trust.is_file():
        local = root / "usr/local/share/ca-certificates"
        local.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host_trust, local / "test-fresh-host-trust.crt")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\n# test-fresh: no service starts inside the chroot\nexit 101\n")
    policy.chmod(0o755)
    # The committed HEAD only: a clone, checked out at that commit.
    run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(root) + CLONE])
    run(["git", "-C", str(root) + CLONE, "checkout", "-q", "--detach", args.head])
    return root


class Tee(threading.Thread):
    """Copies a child's output to ours, remembering the last pytest summary line."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.pytest = ""

    def run(self) -> None:
        with os.fdopen(self.fd, "rb", buffering=0) as stream:
            for raw in iter(stream.readline, b""):
                sys.stdout.buffer.write(raw)
                sys.stdout.buffer.flush()
                m = PYTEST_SUMMARY.match(raw.decode(errors="replace").strip())
                if m:
                    self.pytest = m.group(1)


def run_step(result: StepResult) -> None:
    """``make NAME`` in the clone, filling in ``result`` as it goes (so an interrupted
    step still reports its time); as PID 1 this also reaps every orphan it inherits."""
    name = result.name
    log(f"make {name}")
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen(
        ["make", name],
        cwd=CLONE,
        env={
            "PATH": PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            **{k: v for k, v in os.environ.items() if k.lower() in PROXY_VARIABLES},
        },
        stdin=subprocess.DEVNULL,
        stdout=write_fd,
        stderr=subprocess.STDOUT,
    )
    os.close(write_fd)
    tee = Tee(read_fd)
    tee.start()
    deadline = started + TIMEOUTS[name]
    try:
        while result.exit_code is None:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == proc.pid:
                result.exit_code = os.waitstatus_to_exitcode(status)
                proc.returncode = result.exit_code
            elif pid == 0:
                if time.monotonic() > deadline:
                    result.note = f"timed out after {format_seconds(TIMEOUTS[name])}"
                    proc.kill()
                    os.waitpid(proc.pid, 0)
                    break
                time.sleep(0.2)
    except KeyboardInterrupt:
        result.note = "interrupted"
        raise
    finally:
        result.seconds = time.monotonic() - started
    # A daemon the step left behind may hold the pipe open: do not wait for it for long.
    tee.join(timeout=5)
    result.pytest = tee.pytest
    log(f"make {name}: exit {result.exit_code} after {format_seconds(result.seconds)}")


def inner(args: argparse.Namespace) -> int:
    outcome = Outcome(head=args.head)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        root = prepare_root(args)
        # PID 1 itself enters the root, so inside it / is the root of PID 1 too, as on a
        # booted machine (systemd's tools check that to detect a chroot). Everything this
        # script still needs is imported by now.
        os.chroot(root)
        os.chdir("/")
        for name in STEPS:
            outcome.steps.append(StepResult(name))
            run_step(outcome.steps[-1])
    except KeyboardInterrupt:
        outcome.error = "interrupted"
    except (RuntimeError, OSError) as exc:
        outcome.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    with contextlib.suppress(OSError), os.fdopen(args.result_fd, "w") as out:
        json.dump({"steps": [asdict(s) for s in outcome.steps], "error": outcome.error}, out)
    # Returning ends PID 1: the kernel kills whatever is left in the namespace, and the
    # mount namespace, with every mount made in it, goes with its last process.
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached root")
    parser.add_argument(
        "--no-download-cache",
        action="store_true",
        help="start with empty apt, pip and container-root caches (slower)",
    )
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lower", help=argparse.SUPPRESS)
    parser.add_argument("--mountpoint", help=argparse.SUPPRESS)
    parser.add_argument("--head", help=argparse.SUPPRESS)
    parser.add_argument("--result-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
