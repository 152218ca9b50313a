"""Faults around the hub, in namespaces (topology in hubnet.py):

- kill -9 of the hub at moments drawn from a seeded random.Random (mid-traffic, right after an
  add-peer, during start-up, during an access-rule change): after each restart every laptop is
  back, the firewall holds each of the hub's rules once, and the registry passes
  `PRAGMA integrity_check`;
- another program writing legacy iptables rules in a loop (`iptables-legacy -w`) while the hub
  starts and changes access rules live: neither loses a change, and the hub ends with exactly
  the rules a quiet start writes;
- 1,000 peers added and removed through the registry and `sync` (200 of them making a session)
  while a laptop pings and moves 20 MB transfers: no exception, the hub's threads and RSS come
  back, only the laptop is left, the I/O error counters stay zero (tests/test_churn.py checks
  the engine's indexes and objects).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import sqlite3
import subprocess
import time

import pytest

from pytun.server import nat, state

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, OurLaptop, WgGoLaptop
from .netns import ping, process_alive, topology, wait_until  # noqa: F401 (fixture)
from .test_hub_hostile_netns import rss_kib
from .test_hub_netns import tcp_transfer

pytestmark = pytest.mark.netns


def hub_rules(ns) -> list[str]:
    """The hub's lines in iptables-legacy-save (chains, jumps and rules), counters cut."""
    out = ns.run("iptables-legacy-save").stdout
    return [line.split(" [")[0] if line.startswith(":") else line
            for line in out.splitlines() if "PYTUN" in line or "pytun" in line]


def hub_sets(ns) -> list[str]:
    return sorted(ns.run("ipset", "list", "-n").stdout.split())


def integrity(hub: Hub) -> str:
    db = sqlite3.connect(state.registry_path(hub.state_dir), timeout=10)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def start_nowait(hub: Hub) -> None:
    log = open(hub.log_path, "a")
    hub.proc = hub.ns.popen([PY, "-m", "pytun.server.main", "--state-dir", hub.state_dir],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()


def test_kill_9_at_random_moments(topology, tmp_path):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save", "ipset")
    rng = random.Random(2026)
    hub = Hub(topology, tmp_path)
    hub.start()
    laptops, secrets = [], []
    for i in range(3):
        ns, _ = hub.connect_laptop()
        config = hub.add_peer(f"lap{i}", "--psk")
        secrets += [line.split("=", 1)[1].strip() for line in config.splitlines()
                    if line.startswith(("PrivateKey", "PresharedKey"))]
        if i == 0:
            ours = OurLaptop(ns, tmp_path, config, f"lap{i}")
        else:
            WgGoLaptop(ns, tmp_path, config, ipv6=False)
        laptops.append(ns)
    for ns in laptops:
        wait_until(lambda: ping(ns, HUB_INNER, timeout=1), timeout=15, what="a laptop to connect")
    # The write-behind stores each laptop's first handshake at once: the restarted hub calls
    # them back from there.

    def stored() -> bool:
        db = sqlite3.connect(state.registry_path(hub.state_dir), timeout=10)
        try:
            return db.execute("SELECT count(*) FROM peers WHERE endpoint IS NOT NULL AND"
                              " last_handshake IS NOT NULL").fetchone()[0] == len(laptops)
        finally:
            db.close()

    wait_until(stored, timeout=10, what="every laptop's endpoint and handshake to be stored")
    report = []

    def mid_traffic():
        pinger = laptops[1].popen(["ping", "-n", "-q", "-i", "0.01", "-c", "3000", HUB_INNER],
                                  stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.5))
        return pinger

    def after_add_peer():
        hub.add_peer(f"new{len(report)}")
        time.sleep(rng.uniform(0.0, 0.3))

    def during_access_change():
        change = hub.ns.popen([PY, "-m", "pytun.server.admin", "--state-dir", hub.state_dir,
                               "access", "add", "everyone", "hub", f"tcp/{7000 + len(report)}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.4))
        return change

    def during_start_up():
        hub.stop(signal.SIGKILL)
        log_before = len(hub.log())
        start_nowait(hub)
        time.sleep(rng.uniform(0.05, 0.4))
        return "up" if "hub up" in hub.log()[log_before:] else "still starting"

    moments = [mid_traffic, after_add_peer, during_access_change, during_start_up]
    rng.shuffle(moments)
    for moment in moments:
        leftover = moment()
        assert hub.proc.poll() is None, hub.log()
        hub.stop(signal.SIGKILL)
        when = moment.__name__
        if isinstance(leftover, str):
            when, leftover = f"{when} ({leftover})", None
        elif leftover is not None:  # the pinger is stopped; the access change ends by itself
            if moment is mid_traffic:
                leftover.terminate()
            leftover.wait(30)
        try:
            report.append(_restart_and_check(hub, laptops, when))
        except AssertionError as exc:  # say which moment, and what the hub logged
            raise AssertionError(f"after kill -9 {when}: {exc}\n--- earlier rounds: {report}"
                                 f"\n--- hub log (end):\n{hub.log()[-3000:]}") from None
    print("\n" + "; ".join(report))
    # What the crashes left is exactly what a quiet start writes from the same registry.
    crashed, crashed_sets = sorted(hub_rules(hub.ns)), hub_sets(hub.ns)
    assert hub.stop(signal.SIGTERM) == 0
    assert hub_rules(hub.ns) == [] and hub_sets(hub.ns) == []
    hub.start()
    assert sorted(hub_rules(hub.ns)) == crashed and hub_sets(hub.ns) == crashed_sets
    names = set(hub.show())
    assert {"lap0", "lap1", "lap2"} <= names
    assert "Traceback" not in hub.log()
    # Through all that, no private or preshared key in the hub's or pytun-client's log.
    assert len(secrets) == 6
    logs = hub.log() + ours.log_path.read_text()
    assert [s for s in secrets if s in logs] == []


def _restart_and_check(hub: Hub, laptops: list, when: str) -> str:
    t = time.monotonic()
    hub.start()
    started = time.monotonic() - t
    for i, ns in enumerate(laptops):
        wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=20,
                   what=f"lap{i} back (hub show: {hub.show()})")
    back = time.monotonic() - t
    rules = hub_rules(hub.ns)
    check = integrity(hub)
    errors = io_errors(hub)
    assert len(rules) == len(set(rules)), rules
    assert check == "ok"
    assert errors == dict.fromkeys(errors, 0), errors
    return (f"{when}: up in {started:.1f} s, 3 laptops back in {back:.1f} s, "
            f"{len(rules)} rule lines, integrity {check}")


def _forked_children(pid: int) -> list[int]:
    """Children of `pid` that are forks of it (linux.run_apart's set-up steps)."""
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        return [int(k) for k in kids
                if "pytun.server.main" in open(f"/proc/{k}/cmdline").read()]
    except OSError:
        return []


def test_a_set_up_step_dies_with_a_killed_hub(topology, tmp_path):
    """A hub killed while a set-up step runs in its forked child: the child dies with it. (It
    lived on, holding the TUN device open, and the restarted hub failed: "device busy".) The
    test holds the xtables lock for a moment, so the firewall step waits for it."""
    require_tools("iptables-legacy-save")
    hub = Hub(topology, tmp_path)
    hub.add_peer("alice")
    lock = os.open(nat.XTABLES_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        start_nowait(hub)

        def waiting_step():
            kids = _forked_children(hub.proc.pid)
            time.sleep(0.3)
            return [k for k in _forked_children(hub.proc.pid) if k in kids]

        kids = wait_until(waiting_step, timeout=15, what="the firewall step waiting for the lock")
        hub.stop(signal.SIGKILL)
        t = time.monotonic()
        wait_until(lambda: not any(map(process_alive, kids)), timeout=2,
                   what="the set-up step to die with the hub")
        gone_ms = 1000 * (time.monotonic() - t)
        assert hub.ifname not in hub.ns.run("ip", "-o", "link").stdout
    finally:
        os.close(lock)
    hub.start()
    assert "alice" in hub.show()
    print(f"\nset-up step {kids} gone {gone_ms:.0f} ms after the hub; the restart is up")


def _children_running(pid: int, module: str) -> list[int]:
    """Children of `pid`, started from any of its threads, whose command line names `module`."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            kids = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for k in kids:
            try:
                if module in open(f"/proc/{k}/cmdline").read():
                    found.append(int(k))
            except OSError:
                pass
    return found


def test_a_live_firewall_change_dies_with_a_killed_hub(topology, tmp_path):
    """A running hub carries out an access change in a helper interpreter; killed while that
    helper waits for the xtables lock, the helper dies with it instead of writing its rules
    later, over what the restarted hub wrote."""
    require_tools("iptables-legacy-save")
    hub = Hub(topology, tmp_path)
    hub.add_peer("alice")
    hub.start()
    hub.admin("access", "add", "everyone", "hub", "tcp/7101")  # the helper's ordinary work
    assert "7101" in hub.ns.run("iptables-legacy-save").stdout
    lock = os.open(nat.XTABLES_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    change = None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        change = hub.ns.popen([PY, "-m", "pytun.server.admin", "--state-dir", hub.state_dir,
                               "access", "add", "everyone", "hub", "tcp/7100"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        helpers = wait_until(lambda: _children_running(hub.proc.pid, "pytun.server.nat"),
                             timeout=15, what="the hub's firewall helper waiting for the lock")
        hub.stop(signal.SIGKILL)
        wait_until(lambda: not any(map(process_alive, helpers)), timeout=2,
                   what="the firewall helper to die with the hub")
    finally:
        os.close(lock)
        if change is not None:
            change.kill()
            change.wait()
    hub.start()
    saved = hub.ns.run("iptables-legacy-save").stdout
    assert saved.count("--dport 7100") == 1, saved  # the stored rule, written once by the restart


# Adds a rule of its own to INPUT, checks it is there, deletes it, checks it is gone; counts
# what it found missing or left over (a lost update, on either side, shows up here).
WRITER = r"""
import subprocess, sys, time
stop = time.monotonic() + float(sys.argv[1])
n = lost = failed = 0
rule = ["INPUT", "-s", "192.0.2.250", "-m", "comment", "--comment", "other-program", "-j", "ACCEPT"]
def ipt(*args):
    return subprocess.run(["iptables-legacy", "-w", *args], capture_output=True).returncode
while time.monotonic() < stop:
    failed += ipt("-A", *rule) != 0
    lost += ipt("-C", *rule) != 0
    failed += ipt("-D", *rule) != 0
    lost += ipt("-C", *rule) == 0
    n += 1
print(n, lost, failed, flush=True)
"""


def test_a_legacy_iptables_writer_in_a_loop(topology, tmp_path):
    require_tools("iptables-legacy", "iptables-legacy-save", "ipset")
    hub = Hub(topology, tmp_path)
    hub.add_peer("alice")
    writer = hub.ns.popen([PY, "-c", WRITER, "25"], stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    hub.start()
    started = time.monotonic() - t0
    changes = 0
    ids = []
    while time.monotonic() - t0 < 15:
        hub.admin("access", "add", "everyone", "hub", f"tcp/{6000 + changes}")
        changes += 1
        if changes % 2 == 0:  # and one removed, so rules come and go
            listed = hub.admin("access", "list").stdout
            ids = [line.split()[0] for line in listed.splitlines() if "tcp/60" in line]
            hub.admin("access", "remove", ids[0])
            changes += 1
    live = sorted(hub_rules(hub.ns))
    out, _ = writer.communicate(timeout=40)
    loops, lost, failed = map(int, out.split())
    foreign = [line for line in hub.ns.run("iptables-legacy-save").stdout.splitlines()
               if "other-program" in line]
    print(f"\nhub started in {started:.1f} s and made {changes} live access changes while the "
          f"other program ran {loops} add/check/delete loops: {lost} lost, {failed} failed; "
          f"{len(live)} hub rule lines")
    assert loops > 20 and changes >= 10
    assert lost == 0 and failed == 0 and foreign == []
    assert len(live) == len(set(live))
    accepts = [line for line in live
               if line.startswith("-A PYTUN-") and "--comment \"rule " in line]
    rules = [line for line in hub.admin("access", "list").stdout.splitlines()
             if line.split()[0].isdigit()]
    assert len(accepts) == len(rules), (accepts, rules)
    # Exactly the rules a start without the other program writes from the same registry.
    assert hub.stop(signal.SIGTERM) == 0
    assert hub_rules(hub.ns) == []
    hub.start()
    assert sorted(hub_rules(hub.ns)) == live


# Adds PER peers to the registry, has the hub sync, makes a session as the first of them (a
# Device over a UDP socket), removes the PER peers, has the hub sync; ROUNDS times.
CHURN = r"""
import ipaddress, json, socket, sys, time
from pytun.common import control, keys
from pytun.common.device import Device
from pytun.server import state
from pytun.server.registry import Peer, SqliteRegistry
state_dir, hub_host, rounds, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
hub_public = keys.parse_public(state.public_key(state_dir))
settings = state.load_settings(state_dir)
reserved = {a.ip for a in settings.addresses}
registry = SqliteRegistry(state.registry_path(state_dir), create=False)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 0))
sock.settimeout(5)
syncs, sessions = [], 0
def sync():
    t = time.monotonic()
    control.request(state.socket_path(state_dir), [("sync", "1")], timeout=30)
    syncs.append(time.monotonic() - t)
def send(dev):
    for datagram, endpoint in dev.net_out:
        sock.sendto(datagram, endpoint)
    dev.net_out.clear()
print("start", flush=True)
t0 = time.monotonic()
for r in range(rounds):
    batch = []
    for i in range(per):
        private = keys.generate_private()
        registry.add(Peer(name=f"c{r}-{i}", public_key=keys.encode_key(
            keys.public_from_private(private)), address=ipaddress.ip_interface(
            f"10.77.0.{100 + i}/32"), preshared_key=keys.encode_key(keys.generate_psk())
            if i == 1 else None), subnet=settings.subnet, reserved=reserved)
        batch.append((f"c{r}-{i}", private))
    sync()
    dev = Device(batch[0][1])
    peer = dev.add_peer(hub_public, endpoint=(hub_host, 51820), allowed_ips=[])
    dev.initiate(peer, time.monotonic())
    send(dev)
    data, src = sock.recvfrom(2000)
    dev.receive(data, src, time.monotonic())
    send(dev)  # the keepalive that confirms the session
    sessions += peer.current is not None
    for name, _ in batch:
        registry.remove(name)
    sync()
syncs.sort()
print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "sessions": sessions,
                  "syncs": len(syncs), "sync_median_ms": round(syncs[len(syncs) // 2] * 1000, 1),
                  "sync_max_ms": round(syncs[-1] * 1000, 1)}), flush=True)
"""


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_thousand_peers_come_and_go_while_traffic_flows(topology, tmp_path):
    require_tools("wireguard-go", "wg", "ping")
    hub = Hub(topology, tmp_path)
    hub.admin("access", "add", "everyone", "hub", "tcp/5001")
    hub.start()
    lap, _ = hub.connect_laptop()
    WgGoLaptop(lap, tmp_path, hub.add_peer("steady"), ipv6=False)
    wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=15, what="the laptop to connect")
    churner, _ = hub.connect_laptop("chu")
    pid = hub.proc.pid
    threads_before, (rss_before, _) = _threads(pid), rss_kib(pid)
    churn = churner.popen([PY, "-u", "-c", CHURN, hub.state_dir, "192.0.2.1", "200", "5"],
                          stdout=subprocess.PIPE, text=True)
    assert churn.stdout.readline().strip() == "start"
    pinger = lap.popen(["ping", "-n", "-q", "-i", "0.05", "-c", "200", HUB_INNER],
                       stdout=subprocess.PIPE, text=True)
    transfers = 0
    while churn.poll() is None and transfers < 5:
        tcp_transfer(lap, hub.ns, HUB_INNER, 20 << 20)
        transfers += 1
    out, _ = churn.communicate(timeout=300)
    stats = json.loads(out.strip().splitlines()[-1])
    ping_out, _ = pinger.communicate(timeout=60)
    answered = int(ping_out.split(" received")[0].rsplit(" ", 1)[1])
    rss_after, hwm = rss_kib(pid)
    threads = wait_until(lambda: (n := _threads(pid)) <= threads_before and n, timeout=20,
                         what="the hub's worker threads to go back to what they were")
    log = hub.log()
    errors = io_errors(hub)
    print(f"\n1000 peers added and removed in {stats['seconds']} s ({stats['syncs']} syncs, "
          f"median {stats['sync_median_ms']} ms, max {stats['sync_max_ms']} ms), "
          f"{stats['sessions']} sessions made on them; steady laptop: {transfers} x 20 MB, "
          f"{answered}/200 pings; hub threads {threads_before} -> {threads}, RSS {rss_before} "
          f"-> {rss_after} KiB (VmHWM {hwm}); {len(log.splitlines())} log lines; I/O errors "
          f"{errors}")
    assert stats["sessions"] == 200 and transfers >= 1 and answered >= 196
    assert set(hub.show()) == {"steady"}
    assert "Traceback" not in log and "error" not in log.lower(), log[-2000:]
    churned = [line for line in log.splitlines() if "peer c" in line]
    assert sum(" added (" in x for x in churned) == 1000
    assert sum(x.endswith(" removed") for x in churned) == 1000
    assert rss_after - rss_before < 16 * 1024
    assert errors == dict.fromkeys(errors, 0), errors
