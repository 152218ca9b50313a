"""Hostile input to pytun-admin and the registry: refused with one line, registry unchanged."""

from __future__ import annotations

import pytest

from pytun.common import config
from pytun.common import control
from pytun.server import state
from pytun.server.registry import RegistryError, check_name


@pytest.mark.parametrize("name", ["alice\n", "alice\r\n", "\nalice", "ali\nce", "alice\x00"])
def test_a_name_with_a_newline_is_refused(name):
    with pytest.raises(RegistryError, match="bad peer name"):
        check_name(name)


def test_other_whole_string_patterns():
    with pytest.raises(state.StateError, match="bad interface name"):
        state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com", interface="pytun0\n")
    with pytest.raises(control.ControlError, match="keys are"):
        control.format_request([("get\n", "1")])  # would have sent a bare "get" line
    assert config._HOSTNAME.fullmatch("vpn.example.com") and not config._HOSTNAME.fullmatch("vpn.example.com\n")


# ---------------------------------------------------------------------------------- pytun-admin

import ipaddress  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from pytun.common import keys  # noqa: E402
from pytun.server import admin  # noqa: E402

ATTACHED = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8:1::/64")]


@pytest.fixture
def hub(tmp_path, capsys, monkeypatch):
    """A hub state dir; this host's interfaces are said to hold ATTACHED (as a hub might)."""
    monkeypatch.setattr(admin, "_attached_networks", lambda: list(ATTACHED))
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com", "--route", "192.168.10.0/24,fd10::/64"]) == 0
    return d, capsys.readouterr().out.strip()


def run(capsys, *argv):
    rc = admin.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def registry_rows(d) -> list:
    db = sqlite3.connect(state.registry_path(d))
    try:
        return db.execute("SELECT * FROM peers ORDER BY id").fetchall()
    finally:
        db.close()


def refused(capsys, d, argv, fragment) -> None:
    before = registry_rows(d)
    rc, out, err = run(capsys, "--state-dir", d, *argv)
    assert rc == 1, (argv, out, err)
    assert err.startswith("pytun-admin: error: ") and fragment in err, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "PrivateKey" not in out, (argv, out)
    assert registry_rows(d) == before, argv


def test_hostile_add_peer_arguments_are_refused(hub, capsys):
    d, hub_public = hub
    assert run(capsys, "--state-dir", d, "add-peer", "alice")[0] == 0
    assert run(capsys, "--state-dir", d, "add-peer", "branch", "--site", "172.16.0.0/16")[0] == 0
    cases = [
        (["add-peer", "alice\n"], "bad peer name"),
        (["add-peer", "Alice"], "a peer named 'alice' already exists (names are case-insensitive)"),
        (["add-peer", "ALICE"], "names are case-insensitive"),
        (["add-peer", "bob", "--public-key", hub_public], "the hub's own public key"),
        (["add-peer", "bob", "--site", "0.0.0.0/0"], "is a default route"),
        (["add-peer", "bob", "--site", "::/0"], "is a default route"),
        (["add-peer", "bob", "--site", "10.1.0.0/16,::/0"], "is a default route"),
        (["add-peer", "bob", "--site", "0.0.0.0/1"], "overlaps the unspecified range"),
        (["add-peer", "bob", "--site", "127.0.0.0/8"], "overlaps loopback"),
        (["add-peer", "bob", "--site", "127.0.0.53/32"], "overlaps loopback"),
        (["add-peer", "bob", "--site", "::1/128"], "overlaps loopback"),
        (["add-peer", "bob", "--site", "169.254.0.0/16"], "overlaps link-local"),
        (["add-peer", "bob", "--site", "fe80::/64"], "overlaps link-local"),
        (["add-peer", "bob", "--site", "224.0.0.0/4"], "overlaps multicast"),
        (["add-peer", "bob", "--site", "239.1.2.0/24"], "overlaps multicast"),
        (["add-peer", "bob", "--site", "ff02::/16"], "overlaps multicast"),
        (["add-peer", "bob", "--site", "192.168.10.0/24"], "a --route network of the hub"),
        (["add-peer", "bob", "--site", "192.168.0.0/16"], "a --route network of the hub"),
        (["add-peer", "bob", "--site", "192.168.10.128/25"], "a --route network of the hub"),
        (["add-peer", "bob", "--site", "fd10::/48"], "a --route network of the hub"),
        (["add-peer", "bob", "--site", "192.0.2.0/24"], "a network this host is attached to"),
        (["add-peer", "bob", "--site", "192.0.2.64/26"], "a network this host is attached to"),
        (["add-peer", "bob", "--site", "2001:db8::/32"], "a network this host is attached to"),
        (["add-peer", "bob", "--site", "10.0.0.0/8"], "overlaps the hub subnet"),
        (["add-peer", "bob", "--site", "172.16.5.0/24"], "overlaps site 172.16.0.0/16 of peer 'branch'"),
    ]
    for argv, fragment in cases:
        refused(capsys, d, argv, fragment)
    # Still fine: a private network nobody routes, in either family.
    assert run(capsys, "--state-dir", d, "add-peer", "bob", "--site", "10.200.0.0/16,fd99::/64")[0] == 0


def test_attached_networks_are_read_from_this_host():
    nets = admin._attached_networks()
    assert ipaddress.ip_network("127.0.0.0/8") in nets  # lo, in any namespace


def test_names_differing_in_case_only_already_stored_still_load(tmp_path):
    """No UNIQUE index on lower(name): a registry that has both keeps working."""
    from pytun.server.registry import Peer, SqliteRegistry
    path = str(tmp_path / "r.db")
    reg = SqliteRegistry(path)
    pub = lambda i: keys.encode_key(keys.public_from_private(bytes([i]) * 32))  # noqa: E731
    reg.add(Peer(name="alice", public_key=pub(1), address="10.77.0.2"))
    db = sqlite3.connect(path)
    db.execute("INSERT INTO peers (name, public_key, address, created) VALUES (?, ?, ?, 0)",
               ("Alice", pub(2), "10.77.0.3/32"))
    db.commit()
    db.close()
    reg.close()
    reg = SqliteRegistry(path)
    assert [p.name for p in reg.list()] == ["alice", "Alice"]
    with pytest.raises(RegistryError, match="case-insensitive"):
        reg.add(Peer(name="ALICE", public_key=pub(3), address="10.77.0.4"))
    reg.close()


# ---------------------------------------------------------------------------------- stdout

ADD_TO_STDOUT = """
import sys
from pytun.server import admin
sys.exit(admin.main(["--state-dir", sys.argv[1], "add-peer", sys.argv[2]]))
"""


def _add_to(d, name, stdout, **kw):
    return subprocess.run([sys.executable, "-c", ADD_TO_STDOUT, d, name], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, **kw)


def test_a_config_printed_into_a_file_is_made_private(hub, tmp_path):
    d, _ = hub
    target = tmp_path / "x.conf"
    with open(target, "w") as f:  # `pytun-admin add-peer x > x.conf` under umask 022
        os.chmod(target, 0o644)
        done = _add_to(d, "x", f)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert "PrivateKey = " in target.read_text()
    print(f"\nstdout file: 0644 -> {stat.S_IMODE(os.stat(target).st_mode):04o}, "
          f"{target.stat().st_size} bytes")
    piped = _add_to(d, "y", subprocess.PIPE)  # a pipe stays as it is
    assert piped.returncode == 0 and "PrivateKey = " in piped.stdout


def test_a_config_printed_into_someone_elses_file_is_refused(hub, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file owned by someone else")
    d, _ = hub
    target = tmp_path / "x.conf"
    target.write_text("")
    os.chown(target, 65534, 65534)  # nobody
    os.chmod(target, 0o666)
    before = registry_rows(d)
    with open(target, "w") as f:
        done = _add_to(d, "x", f)
    assert done.returncode == 1
    assert done.stderr.strip() == ("pytun-admin: error: stdout is a file owned by someone else, "
                                   "who could read the private key; use -o FILE")
    assert target.read_text() == "" and registry_rows(d) == before


def test_the_docs_show_dash_o():
    import pathlib
    root = pathlib.Path(__file__).parent.parent
    assert "add-peer alice -o alice.conf" in (root / "server" / "admin.py").read_text()
    assert "add-peer alice -o alice.conf" in (root / "README.md").read_text()
    assert "add-peer alice > " not in (root / "server" / "admin.py").read_text()


# ---------------------------------------------------------------------------------- concurrency

WORKER = r"""
import io, os, sys
from pytun.server import admin
d, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_out = os.dup(1)
mine = []
for i in range(n):
    if i % 3 == 2 and mine:
        argv, name = ["remove-peer", mine[0]], mine.pop(0)
    else:
        argv, name = ["add-peer", f"{prefix}-{i}"], f"{prefix}-{i}"
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    os.write(real_out, f"start {argv[0]} {name}\n".encode())
    rc = admin.main(["--state-dir", d, *argv])
    out, err = sys.stdout.getvalue(), sys.stderr.getvalue()
    if rc != 0:
        os.write(real_out, f"fail {argv[0]} {name} {err.strip()!r}\n".encode())
    elif argv[0] == "add-peer":
        address = [l for l in out.splitlines() if l.startswith("Address = ")][0].split()[-1]
        mine.append(name)
        os.write(real_out, f"added {name} {address}\n".encode())
    else:
        os.write(real_out, f"removed {name}\n".encode())
"""


def test_concurrent_admins_killed_mid_write_leave_a_sound_registry(hub, tmp_path):
    """Four pytun-admin processes add and remove at once; some are killed with SIGKILL."""
    d, _ = hub
    rng = random.Random(11)
    outputs, procs, kills, workers = [], [], 0, 0
    per_worker, deadline = 30, time.monotonic() + 40

    def spawn():
        nonlocal workers
        workers += 1
        log = open(tmp_path / f"w{workers}.out", "w+")
        outputs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, d, f"w{workers}",
                                       str(per_worker)], stdout=log, stderr=subprocess.STDOUT))

    for _ in range(4):
        spawn()
    while time.monotonic() < deadline and (kills < 6 or any(p.poll() is None for p in procs)):
        time.sleep(rng.uniform(0.05, 0.3))
        running = [p for p in procs if p.poll() is None]
        if kills < 6:
            if running:
                os.kill(rng.choice(running).pid, signal.SIGKILL)
                kills += 1
            spawn()
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    added, removed, failed, in_flight, unknown = {}, set(), [], 0, set()
    for log in outputs:
        log.seek(0)
        lines = log.read().splitlines()
        log.close()
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "added":
                name, address = rest.split()
                added[name] = address
            elif kind == "removed":
                removed.add(rest)
            elif kind == "fail":
                failed.append(rest)
        if lines and lines[-1].startswith("start"):
            in_flight += 1  # killed during this command: it may or may not have happened
            _, command, name = lines[-1].split()
            unknown.add(name)
    db = sqlite3.connect(state.registry_path(d))
    integrity = db.execute("PRAGMA integrity_check").fetchall()
    rows = dict(db.execute("SELECT name, address FROM peers").fetchall())
    db.close()
    print(f"\n{workers} admin processes, {kills} killed ({in_flight} mid-command), "
          f"{len(added)} adds and {len(removed)} removes exited 0, {len(failed)} failed, "
          f"{len(rows)} rows, integrity_check {integrity}")
    assert integrity == [("ok",)]
    assert failed == []  # concurrent adds never collide on an address
    for name, address in added.items():
        if name in unknown:
            assert rows.get(name) in (None, address), name
        elif name in removed:
            assert name not in rows, name
        else:
            assert rows.get(name) == address.split("/")[0] + "/32", (name, address, rows.get(name))
    assert len(set(rows.values())) == len(rows)
    assert len(added) >= 30 and kills == 6
    live = [a for n, a in added.items() if n not in removed and n not in unknown]
    assert len(set(live)) == len(live), "an address was handed out twice"


def test_the_allocation_lock_is_held_until_close(tmp_path):
    from pytun.server.registry import SqliteRegistry
    path = str(tmp_path / "r.db")
    first, second = SqliteRegistry(path), SqliteRegistry(path)
    first.hold_allocation_lock()
    t = time.monotonic()
    with pytest.raises(RegistryError, match="another pytun-admin is still adding a peer"):
        second.hold_allocation_lock(timeout=0.2)
    assert 0.2 <= time.monotonic() - t < 2
    assert stat.S_IMODE(os.stat(path + ".lock").st_mode) == 0o600
    first.close()
    second.hold_allocation_lock(timeout=1)
    second.close()
