"""Booted Debian 12 containers for the packaging tests: a cached debootstrap root, an
overlay per container, systemd-nspawn -b inside a network namespace made here, nsenter
into it, and a cleanup that runs whatever failed.

Each container's overlay keeps its writable layer on a tmpfs mounted for it, so this
works where the host's own / or /var/tmp is an overlayfs (a Docker build, a chroot on
overlay, ``make test-fresh``): overlayfs cannot use another overlayfs as its upper layer.

Network: each container lives in its own network namespace created by this module; the
two are joined by one veth pair (198.18.0.1/24 <-> 198.18.0.2/24, RFC 2544 range). No
namespace has a default route or a link to the host, so nothing can leave them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path(os.environ.get("SECUREIOD_TEST_CACHE", "/var/cache/secureiod-test"))
SUITE = "bookworm"
# Everything the .deb depends on must be here: the containers have no network for apt.
INCLUDE = (
    "systemd,systemd-sysv,dbus,iproute2,iputils-ping,libsodium23,libssl3,python3,python3-venv,"
    "ca-certificates,procps,acl"
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Host commands these tests run, and the Debian package of each: scripts/bootstrap.sh
# installs them all (`make test` runs it), so none is ever missing, let alone skipped.
HOST_TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "systemd-analyze": "systemd",
    "lintian": "lintian",
    "dpkg-deb": "dpkg",
    "dpkg-shlibdeps": "dpkg-dev",
    "nsenter": "util-linux",
    "mount": "mount",
    "ip": "iproute2",
}

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def log(message: str) -> None:
    print(f"[systemd-test] {message}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str],
    *,
    timeout: float = 60.0,
    check: bool = True,
    input: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
    return result


def require_host_tools() -> None:
    """Fail (never skip) when a host command is missing, naming its package."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise AssertionError(
            f"missing host packages: {' '.join(missing)}; run `make bootstrap` "
            "(scripts/bootstrap.sh) as root to install them"
        )


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses for bookworm (deb822 or one-line format)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).strip())
                    for m in re.finditer(r"^([A-Za-z-]+):(.*)$", stanza, re.M)
                )
                suites = fields.get("suites", "").split()
                if "deb" in fields.get("types", "").split() and SUITE in suites:
                    uri = fields.get("uris", "").split()
                    if uri and "security" not in uri[0]:
                        return uri[0]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    rest = [w for w in words[1:] if not w.startswith("[")]
                    if len(rest) >= 2 and rest[1] == SUITE:
                        return rest[0]
    return DEFAULT_MIRROR


def cached_root() -> Path:
    """A minbase bookworm root made by debootstrap once and reused (read-only lower layer
    of every container's overlay). Rebuilt when the package list changes."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{SUITE} {INCLUDE}".encode()).hexdigest()[:12]
    root = CACHE_DIR / f"{SUITE}-root-{key}"
    stamp = root.with_name(root.name + ".complete")
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and (root / "usr/lib/systemd/systemd").exists():
            return root
        mirror = apt_mirror()
        log(f"debootstrap {SUITE} from {mirror} into {root} (cached for later runs)")
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
        try:
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={INCLUDE}",
                    SUITE,
                    str(tmp),
                    mirror,
                ],
                timeout=600,
            )
            # No apt sources inside: the containers have no network anyway.
            if root.exists():
                shutil.rmtree(root)
            tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        stamp.write_text(f"{SUITE} {mirror}\n{INCLUDE}\n")
        log(f"debootstrap took {time.monotonic() - started:.1f} s")
        return root


def installed_version(root: Path, package: str) -> str:
    """The version of ``package`` in ``root``'s dpkg database."""
    status = (root / "var/lib/dpkg/status").read_text()
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(package)}$", stanza, re.M):
            m = re.search(r"^Version: (\S+)$", stanza, re.M)
            if m:
                return m.group(1)
    raise AssertionError(f"{package} is not installed in {root}")


def cached_debs(root: Path, packages: Sequence[str]) -> list[Path]:
    """The .deb files that add ``packages`` (``name`` or ``name=version``) and whatever
    they need to the cached root, for ``dpkg -i`` inside a container (which has no network).
    The host's apt plans the install against the root's own dpkg database (so only what
    the root lacks) and ``apt-get download`` fetches each file into ``CACHE_DIR/debs``,
    once: a manifest per root and package list names the files, and later runs use them
    without asking apt (whose lists may since have moved on to a version the root's own
    systemd does not match). The packages stay out of ``INCLUDE`` so that the containers of
    the other tests do not run them."""
    debs = CACHE_DIR / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{root.name} {' '.join(packages)}".encode()).hexdigest()[:12]
    manifest = debs / f"manifest-{key}"
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if manifest.exists():
            files = [debs / name for name in manifest.read_text().split()]
            if files and all(p.exists() for p in files):
                return files
        wanted = _plan_install(root, packages)
        files = [debs / f"{n}_{v.replace(':', '%3a')}_{a}.deb" for n, v, a in wanted]
        missing = [f"{n}={v}" for (n, v, _), p in zip(wanted, files, strict=True) if not p.exists()]
        if missing:
            log(f"apt-get download {' '.join(missing)} into {debs} (cached for later runs)")
            # As root into a directory user _apt cannot write: apt warns and goes on.
            run(["apt-get", "download", "-q", *missing], timeout=300, cwd=debs)
        absent = [str(p) for p in files if not p.exists()]
        if absent:
            raise AssertionError(f"apt-get download did not leave {absent}")
        manifest.write_text("".join(f"{p.name}\n" for p in files))
        return files


def _plan_install(root: Path, packages: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, version, arch) of each package apt would install into ``root``; runs
    ``apt-get update`` once if the host's lists do not know them (a fresh host)."""
    argv = [
        "apt-get",
        "-s",
        "-q",
        "--no-install-recommends",
        "-o",
        f"Dir::State::status={root / 'var/lib/dpkg/status'}",
        "install",
        *packages,
    ]
    plan = run(argv, check=False)
    if plan.returncode != 0:
        run(["apt-get", "update", "-qq"], timeout=300)
        plan = run(argv, check=False)
    if plan.returncode != 0:
        raise AssertionError(
            f"the host's apt cannot plan {' '.join(packages)} for {root.name}; if a "
            f"version is no longer in the archive, remove {root} and its .complete file "
            f"so that the next run debootstraps a current root:\n{plan.stdout}{plan.stderr}"
        )
    wanted = re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) .*\[(\S+)\]\)", plan.stdout, re.M)
    if not wanted:
        raise AssertionError(f"apt plans nothing for {packages}:\n{plan.stdout}")
    return wanted


@dataclass
class Container:
    name: str
    workdir: Path
    lower: Path
    netns: str
    log_path: Path = field(init=False)
    root: Path = field(init=False)
    nspawn: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    mounts: list[Path] = field(default_factory=list)
    """What is mounted for this container, in mount order (unmounted in reverse)."""

    def __post_init__(self) -> None:
        self.root = self.workdir / "root"
        self.log_path = self.workdir / "console.log"

    # --- lifecycle -------------------------------------------------------------------------

    def mount(self) -> None:
        """The root: an overlay of the cached root, written to a tmpfs of its own."""
        layers = self.workdir / "layers"
        layers.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        run(["mount", "-t", "tmpfs", "-o", "mode=0700", f"secureiod-{self.name}", str(layers)])
        self.mounts.append(layers)
        for d in ("upper", "work"):
            (layers / d).mkdir()
        opts = f"lowerdir={self.lower},upperdir={layers}/upper,workdir={layers}/work"
        run(["mount", "-t", "overlay", f"secureiod-{self.name}", "-o", opts, str(self.root)])
        self.mounts.append(self.root)

    def boot(self) -> None:
        with open(self.log_path, "wb") as out:
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                    f"--machine={self.name}",
                    f"--hostname={self.name}",
                    f"--directory={self.root}",
                    f"--network-namespace-path=/run/netns/{self.netns}",
                    # The daemon needs CAP_NET_ADMIN (TUN, rtnetlink); nspawn drops it
                    # by default.
                    "--capability=CAP_NET_ADMIN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = "(no systemd process found)"
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise AssertionError(
                    f"systemd-nspawn for {self.name} exited {self.nspawn.returncode}:\n"
                    + self.console_tail()
                )
            if self.leader is None:
                self.leader = self._find_leader()
            if self.leader is not None:
                out = self.sh("systemctl is-system-running 2>&1", check=False, timeout=10)
                state = (out.stdout + out.stderr).strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        jobs = ""
        if self.leader is not None:
            out = self.sh("systemctl list-jobs --no-pager 2>&1", check=False, timeout=10)
            jobs = f"\nsystemctl list-jobs:\n{out.stdout.strip()}"
        raise AssertionError(
            f"container {self.name} did not boot in {BOOT_TIMEOUT:.0f} s (last state: "
            f"{state}){jobs}\nconsole:\n{self.console_tail()}"
        )

    def _find_leader(self) -> int | None:
        assert self.nspawn is not None
        try:
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            for pid in children.read_text().split():
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
        except OSError:
            return None
        return None

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn = orderly shutdown); kill it if it
        does not stop in time. Never raises."""
        proc = self.nspawn
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no clean shutdown in {STOP_TIMEOUT:.0f} s, killing it")
                if self.leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)  # kills its whole PID namespace
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self.nspawn = None

    def unmount(self) -> bool:
        """Unmount the overlay, then its tmpfs; False if something stays mounted."""
        while self.mounts:
            if not _unmount(self.mounts[-1]):
                return False
            self.mounts.pop()
        return True

    # --- inside the container ----------------------------------------------------------------

    def sh(
        self, script: str, *, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell script in all of the container's namespaces (as its root)."""
        assert self.leader is not None, f"{self.name} is not running"
        # -r -w: the container's root and working directory, explicitly. Entering its mount
        # namespace alone lands on that namespace's root mount, which is the container's
        # root only when nspawn was not itself run in a chroot (nspawn moves the container
        # root onto its own "/", so in a chroot it is stacked on the chroot, not on the
        # namespace's root: `make test-fresh` runs these tests in a chroot).
        argv = ["nsenter", "-t", str(self.leader), "-a", "-r", "-w", "--", "/bin/sh", "-c", script]
        result = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TERM": "dumb"},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"[{self.name}] {script!r} exited {result.returncode}\n"
                f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
            )
        return result

    def write(self, path: str, text: str, mode: int = 0o644, owner: str = "root") -> None:
        self.sh(
            f"umask 077; cat > {path} && chown {owner}: {path} && chmod {mode:o} {path}",
            input=text,
        )

    def console_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)
        return "\n".join(text.splitlines()[-lines:])

    def journal(self, lines: int = 150) -> str:
        if self.leader is None or self.nspawn is None or self.nspawn.poll() is not None:
            return f"(container {self.name} not running)\n" + self.console_tail()
        try:
            out = self.sh(
                f"journalctl -b --no-pager -o short-monotonic -n {lines}", check=False, timeout=20
            )
            return out.stdout + out.stderr
        except Exception as exc:  # diagnostics must not raise
            return f"(journalctl failed: {exc})"


@dataclass
class Pair:
    """Two containers, a and b, in namespaces joined by one veth pair."""

    workdir: Path
    a: Container
    b: Container
    netns: tuple[str, str]

    def diagnostics(self) -> str:
        parts = []
        for c in (self.a, self.b):
            parts.append(f"===== journal of container {c.name} =====\n{c.journal()}")
        return "\n".join(parts)


UNDERLAY = ("198.18.0.1/24", "198.18.0.2/24")


def _make_netns(names: tuple[str, str]) -> None:
    a, b = names
    for ns in names:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", a, "link", "add", "u0", "type", "veth", "peer", "name", "u0", "netns", b])
    for ns, address in zip(names, UNDERLAY, strict=True):
        run(["ip", "-n", ns, "address", "add", address, "dev", "u0"])
        run(["ip", "-n", ns, "link", "set", "u0", "up"])


def _delete_netns(names: Sequence[str]) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unmount(path: Path) -> bool:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        if subprocess.run(args, capture_output=True, timeout=30).returncode == 0:
            return True
    log(f"could not unmount {path}")
    return False


def _same_pid_namespace(pid: str) -> bool:
    """Whether process ``pid`` (as /proc shows it) is in our PID namespace. The pid in a
    container's name is only meaningful there: a run inside another PID namespace (such
    as ``make test-fresh``'s) has names whose pids say nothing about ours."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def cleanup_orphans(tag: str = "siot") -> None:
    """Containers, namespaces, mounts and directories of earlier runs whose test process
    is gone (SIGKILLed): their names carry that process's pid."""
    name_re = re.compile(rf"^{re.escape(tag)}(\d+)-[ab]$")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not _same_pid_namespace(proc.name):
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"systemd-nspawn"):
            continue
        for arg in argv:
            m = name_re.match(arg.decode(errors="replace").removeprefix("--machine="))
            if m and arg.startswith(b"--machine=") and not _pid_alive(int(m.group(1))):
                log(f"stopping orphaned container {arg.decode()[10:]} (nspawn pid {proc.name})")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGTERM)
                deadline = time.monotonic() + STOP_TIMEOUT
                while _pid_alive(int(proc.name)) and time.monotonic() < deadline:
                    time.sleep(0.2)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30
    ).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = name_re.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_netns([name])
    for entry in Path("/var/tmp").glob(f"secureiod-{tag}*-*"):
        m = re.match(rf"^secureiod-{re.escape(tag)}(\d+)-", entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        # Innermost first: each container's overlay, then the tmpfs under it.
        mounted = [
            path
            for side in ("a", "b")
            for path in (entry / side / "root", entry / side / "layers")
            if os.path.ismount(path)
        ]
        # all() stops at the first failure: never unmount a tmpfs under a live overlay,
        # nor delete a directory through a mount.
        if all(_unmount(path) for path in mounted):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def booted_pair(tag: str = "siot") -> Iterator[Pair]:
    """Boot two containers; always stop them, unmount, delete the namespaces and files."""
    root = cached_root()
    cleanup_orphans(tag)
    unique = f"{tag}{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix=f"secureiod-{unique}-", dir="/var/tmp"))
    netns = (f"{unique}-a", f"{unique}-b")
    a = Container(f"{unique}-a", workdir / "a", root, netns[0])
    b = Container(f"{unique}-b", workdir / "b", root, netns[1])
    pair = Pair(workdir, a, b, netns)
    try:
        _make_netns(netns)
        for c in (a, b):
            c.mount()
        started = time.monotonic()
        for c in (a, b):
            c.boot()
        log(f"booted {a.name} and {b.name} in {time.monotonic() - started:.1f} s")
        yield pair
    finally:
        for c in (a, b):
            c.stop()
        unmounted = all([c.unmount() for c in (a, b)])
        _delete_netns(netns)
        if unmounted:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"left {workdir} in place: an overlay is still mounted")
