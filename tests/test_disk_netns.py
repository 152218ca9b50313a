"""The hub's state directory in trouble, in namespaces (topology in hubnet.py):

- a full disk (a small tmpfs, mounted in a private mount namespace that the hub and
  pytun-admin join, so the machine's mounts are never touched) and then a read-only state
  directory (a read-only bind mount there): with the hub running, every admin command that
  would change something fails with one line and exit status 1 and changes nothing; the hub
  keeps serving a laptop, and once the disk has room again, changes work again;
- a damaged registry (garbage, a damaged table page, a damaged index page, cut short): the
  hub refuses to start with one line, leaves the file byte for byte as it was, and leaves no
  interface or firewall rule behind.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sqlite3
import subprocess

import pytest

from pytun.server import state

from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)
from .test_faults_netns import hub_rules, start_nowait

pytestmark = pytest.mark.netns

# What the registry says, less what the hub writes behind (endpoints, handshakes).
CONTENT = r"""
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10)
peers = db.execute("SELECT name, public_key, address, disabled, preshared_key, keepalive, "
                   "groups, expires FROM peers ORDER BY name").fetchall()
rules = db.execute("SELECT * FROM rules ORDER BY id").fetchall()
groups = db.execute("SELECT name FROM groups ORDER BY name").fetchall()
print(json.dumps([peers, rules, groups]))
"""

CHANGES = [("add-peer", "bob"), ("remove-peer", "alice"), ("disable-peer", "alice"),
           ("rotate-key", "alice"), ("renew", "alice", "--ttl", "3d"),
           ("access", "add", "everyone", "hub", "tcp/80"), ("set-groups", "alice", "dev")]


def _in_mount_ns(ns, holder: int) -> None:
    """Make every command run in `ns` also join the mount namespace of process `holder`."""
    name = ns.name
    ns.exec_argv = lambda argv: ["nsenter", "-t", str(holder), "-m", "--",
                                 "ip", "netns", "exec", name, *argv]


def test_a_full_disk_and_a_read_only_state_directory(topology, tmp_path):
    require_tools("unshare", "nsenter", "mount", "wireguard-go", "wg", "ping")
    hub = Hub(topology, tmp_path)
    alice = hub.add_peer("alice")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # slave: the namespaces made later (bind mounts under /run/netns) are seen in there too
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "slave", "sh", "-c",
         f"mount -t tmpfs -o size=4m,mode=0700 pytun-test {mnt} && echo ready && exec sleep 600"],
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        _in_mount_ns(hub.ns, holder.pid)
        new_dir = f"{mnt}/state"
        hub.ns.run("cp", "-a", hub.state_dir, new_dir)
        hub.state_dir = new_dir
        assert "pytun-test" in hub.ns.run("df", new_dir).stdout
        assert not (mnt / "state").exists()  # not in the machine's own mount namespace
        _full_and_read_only(hub, tmp_path, new_dir, alice, holder.pid)
    finally:
        if hub.proc is not None:
            hub.stop()
        holder.kill()
        holder.wait(10)


def _full_and_read_only(hub, tmp_path, state_dir, alice_config: str, holder: int) -> None:
    def mount(*args) -> None:  # in the private mount namespace itself (`ip netns exec` copies it)
        subprocess.run(["nsenter", "-t", str(holder), "-m", "--", "mount", *args], check=True,
                       timeout=30)

    registry = state.registry_path(state_dir)
    hub.start()

    def content() -> str:
        return hub.ns.run([PY, "-c", CONTENT, registry]).stdout

    def refused(kind: str) -> list[str]:
        lines = []
        for argv in CHANGES:
            done = hub.admin(*argv, check=False)
            err = done.stderr.strip().splitlines()
            assert done.returncode == 1 and done.stdout == "" and len(err) == 1, (kind, argv, done)
            assert err[0].startswith("pytun-admin: error: "), err
            lines.append(err[0])
        return lines

    before = content()
    hub.ns.run("sh", "-c", f"dd if=/dev/zero of={state_dir}/../fill bs=64k 2>/dev/null; true")
    assert hub.ns.run("df", "--output=avail", state_dir).stdout.split()[-1] == "0"
    full = refused("full disk")
    # The running hub still serves a laptop; what it writes behind fails and is logged.
    lap, _ = hub.connect_laptop()
    WgGoLaptop(lap, tmp_path, alice_config, ipv6=False)
    wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=15, what="alice to connect")
    wait_until(lambda: "could not record" in hub.log(), timeout=10,
               what="the hub to log that it could not record the handshake")
    assert content() == before
    hub.ns.run("rm", f"{state_dir}/../fill")
    mount("--bind", state_dir, state_dir)
    mount("-o", "remount,ro,bind", state_dir)
    try:
        read_only = refused("read-only")
    finally:
        subprocess.run(["nsenter", "-t", str(holder), "-m", "--", "umount", state_dir],
                       check=True, timeout=30)
    assert content() == before
    assert hub.proc.poll() is None and ping(lap, HUB_INNER)
    print(f"\nfull disk: {len(full)} changes refused, e.g. {sorted(set(full))[:2]}; read-only: "
          f"{len(read_only)} refused, e.g. {sorted(set(read_only))[:2]}")
    # Room again: changes work, and the hub applies them.
    hub.add_peer("bob")
    assert "bob" in hub.show()
    assert "Traceback" not in hub.log()
    # No hub running: a change on a full disk fails with a line that says the disk is full
    # (SQLite itself says only "disk I/O error" when it cannot create its journal).
    hub.stop()
    before = content()
    hub.ns.run("sh", "-c", f"dd if=/dev/zero of={state_dir}/../fill bs=64k 2>/dev/null; true")
    done = hub.admin("add-peer", "carol", check=False)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(err) == 1, done.stderr
    assert "is full" in err[0].rsplit(": ", 1)[-1], err  # not only in the path
    hub.ns.run("rm", f"{state_dir}/../fill")
    assert content() == before
    print(f"no hub, full disk: {err[0]}")


def _damage(path, how: str, rng: random.Random) -> None:
    data = bytearray(open(path, "rb").read())
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    pages = dict(db.execute("SELECT name, rootpage FROM sqlite_master WHERE rootpage > 0"))
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    if how == "garbage":
        data[:] = rng.randbytes(len(data))
    elif how == "cut short":
        del data[len(data) // 2:]
    else:  # a table's page, or an index page the hub does not read at start
        page = pages["peers" if how == "damaged table page" else
                     "sqlite_autoindex_handshake_timestamps_1"]
        off = (page - 1) * size
        data[off:off + size] = rng.randbytes(size)
    open(path, "wb").write(data)


def test_a_damaged_registry_is_refused_and_left_as_it_is(topology, tmp_path):
    require_tools("iptables-legacy-save")
    hub = Hub(topology, tmp_path)
    for name in ("alice", "bob", "carol"):
        hub.add_peer(name)
    registry = state.registry_path(hub.state_dir)
    good = tmp_path / "good.db"
    shutil.copy(registry, good)
    rng = random.Random(4)
    report = []
    for how in ("garbage", "damaged table page", "damaged index page", "cut short"):
        shutil.copy(good, registry)
        _damage(registry, how, rng)
        digest = hashlib.sha256(open(registry, "rb").read()).hexdigest()
        start_nowait(hub)
        try:
            code = hub.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the hub started on a registry with a {how}") from None
        hub.ns.procs.remove(hub.proc)
        hub.proc = None
        lines = hub.log().strip().splitlines()
        hub.log_path.write_text("")
        report.append(f"{how}: exit {code}, {lines[-1]!r}")
        assert code == 1, (how, lines)
        assert len(lines) == 1 and lines[0].startswith("pytun-server: error: "), (how, lines)
        assert "damaged" in lines[0] or "not a database" in lines[0], lines
        assert hashlib.sha256(open(registry, "rb").read()).hexdigest() == digest, how
        assert hub.ifname not in hub.ns.run("ip", "-o", "link").stdout
        assert hub_rules(hub.ns) == []
    print("\n" + "; ".join(report))
    shutil.copy(good, registry)
    hub.start()
    assert set(hub.show()) == {"alice", "bob", "carol"}
