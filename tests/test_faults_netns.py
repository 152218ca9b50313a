"""Faults around the hub, in namespaces (topology in hubnet.py):

- kill -9 of the hub at moments drawn from a seeded random.Random (mid-traffic, right after an
  add-peer, during start-up, during an access-rule change): after each restart every laptop is
  back, the firewall holds each of the hub's rules once, and the registry passes
  `PRAGMA integrity_check`;
- another program writing legacy iptables rules in a loop (`iptables-legacy -w`) while the hub
  starts and changes access rules live: neither loses a change, and the hub ends with exactly
  the rules a quiet start writes.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time

import pytest

from pytun.server import state

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, OurLaptop, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)

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
    laptops = []
    for i in range(3):
        ns, _ = hub.connect_laptop()
        config = hub.add_peer(f"lap{i}")
        if i == 0:
            OurLaptop(ns, tmp_path, config, f"lap{i}")
        else:
            WgGoLaptop(ns, tmp_path, config, ipv6=False)
        laptops.append(ns)
    for ns in laptops:
        wait_until(lambda: ping(ns, HUB_INNER, timeout=1), timeout=15, what="a laptop to connect")
    # The write-behind stores each laptop's first handshake at once: the restarted hub calls
    # them back from there.
    time.sleep(1.5)
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
        start_nowait(hub)
        time.sleep(rng.uniform(0.1, 0.8))

    moments = [mid_traffic, after_add_peer, during_access_change, during_start_up]
    rng.shuffle(moments)
    for moment in moments:
        leftover = moment()
        assert hub.proc.poll() is None, hub.log()
        hub.stop(signal.SIGKILL)
        if leftover is not None:  # the pinger is stopped; the access change ends by itself
            if moment is mid_traffic:
                leftover.terminate()
            leftover.wait(30)
        t = time.monotonic()
        hub.start()
        started = time.monotonic() - t
        for ns in laptops:
            wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=20,
                       what=f"every laptop back after kill -9 {moment.__name__}")
        back = time.monotonic() - t
        rules = hub_rules(hub.ns)
        check = integrity(hub)
        report.append(f"{moment.__name__}: up in {started:.1f} s, 3 laptops back in {back:.1f} s, "
                      f"{len(rules)} rule lines, integrity {check}")
        assert len(rules) == len(set(rules)), rules
        assert check == "ok"
        assert io_errors(hub) == dict.fromkeys(io_errors(hub), 0)
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
    accepts = [line for line in live if line.startswith("-A PYTUN-") and "--comment \"rule " in line]
    rules = [line for line in hub.admin("access", "list").stdout.splitlines()
             if line.split()[0].isdigit()]
    assert len(accepts) == len(rules), (accepts, rules)
    # Exactly the rules a start without the other program writes from the same registry.
    assert hub.stop(signal.SIGTERM) == 0
    assert hub_rules(hub.ns) == []
    hub.start()
    assert sorted(hub_rules(hub.ns)) == live
