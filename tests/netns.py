"""Network namespaces for tests, shaped like WireGuard's netns.sh.

    with Topology() as topo:                 # or the `topology` fixture
        hub, laptop = topo.netns("hub"), topo.netns("lap")
        topo.veth(hub, "192.0.2.1/24", laptop, "192.0.2.2/24")
        assert ping(laptop, "192.0.2.1")

Rules every helper here keeps, so tests can run on a developer's machine:
- only namespaces made here (`ip netns add`) are touched, joined by veth pairs created directly
  inside them; the root namespace's addresses, routes, firewall and sysctls are never changed,
  and no namespace gets a path out of the machine;
- underlay addresses come from the documentation ranges (UNDERLAY);
- every process started here is stopped by its PID, then any other process still inside the
  namespace (`ip netns pids`), then the namespace is deleted, also when the test fails;
- readiness is polled (`wait_until`), never slept for.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence, TypeVar

try:
    import pytest
except ImportError:  # scripts/demo and bench/ use these helpers with the installed product
    pytest = None

UNDERLAY = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
IFNAMSIZ = 16

T = TypeVar("T")

_counter = itertools.count()
_live: dict[str, "Netns"] = {}


class CommandFailed(AssertionError):
    """A command in a namespace failed; the message carries its output."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str):
        self.argv, self.returncode = list(argv), returncode
        self.stdout, self.stderr = stdout, stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(
            f"{shlex.join(self.argv)} {status}\n--- stdout\n{stdout}--- stderr\n{stderr}"
        )


def unique(prefix: str) -> str:
    """A name no other live process or call uses: letters, the PID, '-', a counter.

    It fits an interface name (15 bytes) because wireguard-go's /run/wireguard/IFACE.sock is
    shared by all namespaces, so interface names must be unique machine-wide.
    """
    if not re.fullmatch(r"[a-z]{1,5}", prefix):
        raise ValueError(f"prefix {prefix!r} must be 1 to 5 lowercase letters")
    name = f"{prefix}{os.getpid()}-{next(_counter):x}"
    if len(name) >= IFNAMSIZ:
        raise ValueError(f"{name!r} is longer than {IFNAMSIZ - 1}; use a shorter prefix")
    return name


def _argv(args: tuple) -> list[str]:
    if len(args) == 1 and isinstance(args[0], str):
        return shlex.split(args[0])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return [str(a) for a in args[0]]
    return [str(a) for a in args]


def _words(args: tuple) -> list[str]:
    return [w for a in args for w in shlex.split(str(a))]


def _run(argv: list[str], *, check=True, timeout=30.0, input=None, env=None):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        raise CommandFailed(argv, None, out or "", err or "") from None
    if check and done.returncode != 0:
        raise CommandFailed(argv, done.returncode, done.stdout, done.stderr)
    return done


def process_alive(pid: int) -> bool:
    """Running; an exited process or a zombie waiting for a parent that is not us is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Netns:
    """One network namespace with lo up; remembers the processes started in it."""

    def __init__(self, name: str | None = None):
        self.name = name or unique("ns")
        self.procs: list[subprocess.Popen] = []
        _live[self.name] = self  # before it exists, so an interrupt cannot leak it
        _note_for_the_leak_check(self.name)
        try:
            _run(["ip", "netns", "add", self.name])
        except BaseException:
            del _live[self.name]
            _run(["ip", "netns", "del", self.name], check=False)
            raise
        try:
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *args, check: bool = True, timeout: float = 30.0, input: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command inside; `run("ip -4 addr")`, `run("ip", "-4", "addr")` or a list."""
        return _run(self.exec_argv(_argv(args)), check=check, timeout=timeout, input=input,
                    env=env)

    def popen(self, *args, **kw) -> subprocess.Popen:
        """Start a background process inside; close() stops it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(_argv(args)), **kw)
        self.procs.append(proc)
        return proc

    def python(self, code_or_args: str | Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run this interpreter inside: a code string, or a list of arguments after it."""
        if isinstance(code_or_args, str):
            argv = [sys.executable, "-c", code_or_args]
        else:
            argv = [sys.executable, *code_or_args]
        return self.run(argv, **kw)

    def ip(self, *args) -> str:
        """`ns.ip("addr show dev", name)`: every argument is split on whitespace."""
        return self.run(["ip", *_words(args)]).stdout

    def ip_json(self, *args) -> list:
        """`ip -j ...` parsed, e.g. `ns.ip_json("addr show dev", name)`."""
        return json.loads(self.run(["ip", "-j", *_words(args)]).stdout or "[]")

    def sysctl(self, key: str) -> str:
        """Read a sysctl of this namespace, e.g. "net.ipv4.ip_forward"."""
        return self.run("cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    def pids(self) -> list[int]:
        done = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in done.stdout.split() if p.isdigit()]

    def close(self) -> None:
        """Stop our processes (SIGTERM, then SIGKILL), then any stragglers, then delete."""
        if self.name not in _live:
            return
        try:
            for proc in reversed(self.procs):
                _stop(proc)
            self.procs.clear()
            stragglers = self.pids()
            for pid in stragglers:
                _signal(pid, signal.SIGTERM)
            if not _poll(lambda: not any(map(process_alive, stragglers)), 2.0):
                for pid in stragglers:
                    _signal(pid, signal.SIGKILL)
                _poll(lambda: not any(map(process_alive, stragglers)), 2.0)
        finally:
            del _live[self.name]
            _run(["ip", "netns", "del", self.name], check=False)


def _note_for_the_leak_check(name: str) -> None:
    """Under pytest (also in its subprocesses), tests/conftest.py checks at the end of the
    session that every namespace named in this file is gone."""
    log = os.environ.get("PYTUN_TEST_NETNS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(name + "\n")


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def _poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@atexit.register
def _close_leftovers() -> None:
    for ns in list(_live.values()):
        ns.close()


def _addresses(addrs: str | Iterable[str] | None) -> list[str]:
    if addrs is None:
        return []
    return [addrs] if isinstance(addrs, str) else list(addrs)


def veth(ns_a: Netns, addr_a: str | Iterable[str] | None, ns_b: Netns,
         addr_b: str | Iterable[str] | None, *, name_a: str | None = None,
         name_b: str | None = None, mtu: int | None = None) -> tuple[str, str]:
    """A veth pair created directly inside the two namespaces, addressed and up."""
    name_a, name_b = name_a or unique("va"), name_b or unique("vb")
    _run(["ip", "link", "add", name_a, "netns", ns_a.name, "type", "veth",
          "peer", "name", name_b, "netns", ns_b.name])
    for ns, name, addrs in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if mtu is not None:
            ns.run("ip", "link", "set", name, "mtu", mtu)
        for addr in _addresses(addrs):
            ns.run("ip", "addr", "add", addr, "dev", name, *(["nodad"] if ":" in addr else []))
        ns.run("ip", "link", "set", name, "up")
    return name_a, name_b


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll until predicate() is truthy and return its value; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def ping(ns: Netns, addr: str, count: int = 1, timeout: float = 2.0, *, size: int | None = None,
         dont_fragment: bool = False, interval: float | None = None,
         source: str | None = None) -> bool:
    """True when all `count` echo requests were answered (each waited for up to `timeout`)."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout)]
    if ":" in addr:
        argv.append("-6")
    if count > 1:
        argv += ["-i", str(interval if interval is not None else 0.05)]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    if source is not None:
        argv += ["-I", source]
    done = ns.run(argv + [addr], check=False, timeout=count * (timeout + 1) + 5)
    m = re.search(r"(\d+) received", done.stdout)
    return done.returncode == 0 and m is not None and int(m.group(1)) == count


class Topology:
    """Every namespace of one test; all are closed on exit, also when the test fails."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []

    def netns(self, prefix: str = "ns") -> Netns:
        ns = Netns(unique(prefix))
        self.namespaces.append(ns)
        return ns

    def veth(self, *args, **kw) -> tuple[str, str]:
        return veth(*args, **kw)

    def close(self) -> None:
        errors = []
        for ns in reversed(self.namespaces):
            try:
                ns.close()
            except Exception as exc:  # close the others, then report
                errors.append(exc)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


if pytest is not None:
    @pytest.fixture
    def topology(netns_ok):
        """A Topology closed after the test; import it into a test module to use it."""
        with Topology() as topo:
            yield topo
