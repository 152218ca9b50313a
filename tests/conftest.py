"""Shared test set-up.

Tests that need root, /dev/net/tun and network namespaces use the `netns_ok` fixture and carry
the `netns` mark (checked at collection). They skip cleanly elsewhere; with
PYTUN_REQUIRE_NETNS=1 (CI sets it) such a skip becomes a failure, and so does every other skip
for a missing tool, root or installed product (`skip_or_fail`).

At the end of the session, every namespace a test made (tests/netns.py notes each in a file
named by PYTUN_TEST_NETNS_LOG, also from subprocesses such as the demo) and every process the
run started (a descendant of pytest, or one carrying this run's PYTUN_TEST_SESSION) must be
gone. Whatever is left is reported, removed by name and PID, and fails the run.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile

import pytest

VECTORS = pathlib.Path(__file__).parent / "vectors"


def load_vector(name: str):
    return json.loads((VECTORS / name).read_text())


# ---------------------------------------------------------------------------------- skips


def skip_or_fail(why: str) -> None:
    """Skip this test, or under PYTUN_REQUIRE_NETNS=1 (CI) fail it: nothing may skip there."""
    if os.environ.get("PYTUN_REQUIRE_NETNS") == "1":
        pytest.fail(f"PYTUN_REQUIRE_NETNS=1 but this test {why}")
    pytest.skip(why)


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("ip",):
        if shutil.which(tool) is None:
            return f"needs the {tool} command"
    return None


@pytest.fixture(scope="session")
def netns_ok():
    why = _netns_missing()
    if why:
        skip_or_fail(why)
    return True


def require_tools(*tools: str) -> None:
    """Skip (or fail under PYTUN_REQUIRE_NETNS=1) when a system tool a test drives is absent."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        skip_or_fail("needs " + ", ".join(missing))


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        skip_or_fail(f"needs root: it {why}")


def require_installed(why: str) -> None:
    """The product as scripts/install-deps installs it (/opt/pytun, /usr/local/bin) is absent."""
    skip_or_fail(f"needs the installed product: {why}")


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if "netns_ok" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("netns") is None]
    if unmarked:
        raise pytest.UsageError("tests that build namespaces (netns_ok) must carry "
                                "@pytest.mark.netns:\n  " + "\n  ".join(unmarked))


# ---------------------------------------------------------------------------------- leaks


def _netns_names() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
                found[int(entry.name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue
    return found


def _carries(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _our_processes() -> set[int]:
    """Running descendants of this pytest, and any process that inherited this run's mark."""
    me = os.getpid()
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), list(children.get(me, []))
    while todo:
        pid = todo.pop()
        ours.add(pid)
        todo.extend(children.get(pid, []))
    marker = f"PYTUN_TEST_SESSION={me}".encode()
    ours |= {pid for pid in procs if pid != me and _carries(pid, marker)}
    return {pid for pid in ours if pid in procs and procs[pid][1] not in ("Z", "X")}


def pytest_sessionstart(session):
    fd, log = tempfile.mkstemp(prefix="pytun-test-netns-", suffix=".log")
    os.close(fd)
    os.environ["PYTUN_TEST_NETNS_LOG"] = log
    os.environ["PYTUN_TEST_SESSION"] = str(os.getpid())
    session.config.stash[_BEFORE] = (_netns_names(), _our_processes())


_BEFORE = pytest.StashKey[tuple]()


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_BEFORE, None)
    log = os.environ.get("PYTUN_TEST_NETNS_LOG")
    if before is None or not log:
        return
    netns_before, procs_before = before
    try:
        made = set(pathlib.Path(log).read_text().split())
        os.unlink(log)
    except OSError:
        made = set()
    leaked_netns = sorted((made & _netns_names()) - netns_before)
    leaked_procs = sorted(_our_processes() - procs_before)
    if not leaked_netns and not leaked_procs:
        return
    lines = ["", "=" * 30 + " LEAKED BY THIS TEST RUN " + "=" * 30]
    lines += [f"namespace still there: {name}" for name in leaked_netns]
    lines += [f"process still running: {pid} {_cmdline(pid)}" for pid in leaked_procs]
    lines.append("removed now (processes by PID, namespaces by name); the run fails")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True, bold=True)
        else:
            print(line)
    for pid in leaked_procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for name in leaked_netns:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ---------------------------------------------------------------------------------- registries


@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL cluster for the whole run (tests/pgserver.py), started on first
    use; skipped (a failure under PYTUN_REQUIRE_NETNS=1) where none can be started."""
    from . import pgserver

    why = pgserver.missing()
    if why:
        skip_or_fail(f"runs against PostgreSQL and {why}")
    with pgserver.PgServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database in the throwaway cluster, dropped after the test."""
    if not pg_server.running:  # a test that stopped it failed before starting it again
        pg_server.start()
    url = pg_server.create_database()
    yield url
    if not pg_server.running:
        pg_server.start()
    pg_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request, tmp_path):
    """Where a registry is, once for each backend: a SQLite file's path, or a PostgreSQL URL.
    open_registry(registry_location) opens it (again, for a second connection)."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    return request.getfixturevalue("pg_url")
