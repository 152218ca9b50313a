"""A laptop fails over between two hubs that share a key and a registry, without a shared
address: its config names the second hub in a `# pytun-endpoint` line.

        +------- hub A -------+                         +------- hub B -------+
        | lo 192.0.2.1:51820  |-- 198.51.100.17/28 --.  | 192.0.2.65:51820    |
        | 10.77.0.1 (TUN)     |                      |  | 10.77.0.1 (TUN)     |
        +---------------------+                      |  +---------------------+
                                                     |     | 192.0.2.65/28
                                          laptop 198.51.100.18/28, 192.0.2.66/28
                                          pytun-client: Endpoint = 192.0.2.1:51820
                                                        # pytun-endpoint = 192.0.2.65:51820

Hub B is restored from hub A's backup (same key, settings and peers) and runs beside it.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, OurLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.netns


def test_a_laptop_moves_to_the_second_hub_when_the_first_dies(topology, tmp_path, netns_ok):
    require_tools("ping")
    hub_a = Hub(topology, tmp_path, name="a")
    laptop_ns, _ = hub_a.connect_laptop()
    text = hub_a.add_peer("alice", "--keepalive", "5")
    # Hub B: a namespace of its own, reached from the laptop over a second link.
    b_ns = topology.netns("hubb")
    topology.veth(b_ns, "192.0.2.65/28", laptop_ns, "192.0.2.66/28")
    backup = tmp_path / "a.backup"
    hub_a.admin("backup", str(backup))
    b_state = str(tmp_path / "b-state")
    b_ns.run([PY, "-m", "pytun.server.admin", "--state-dir", b_state, "restore", str(backup)])
    b_log = open(tmp_path / "b.log", "w")
    hub_b = b_ns.popen([PY, "-m", "pytun.server.main", "--state-dir", b_state],
                       stdout=b_log, stderr=subprocess.STDOUT)
    b_log.close()
    hub_a.start()
    wait_until(lambda: (tmp_path / "b.log").read_text().count("hub up") == 1, timeout=15,
               what="hub B to start")

    text = text.replace("PersistentKeepalive", "# pytun-endpoint = 192.0.2.65:51820\n"
                                                "PersistentKeepalive")
    laptop = OurLaptop(laptop_ns, tmp_path, text, "alice")
    assert wait_until(lambda: ping(laptop_ns, HUB_INNER, timeout=0.5), timeout=10,
                      what="alice through hub A")
    assert hub_a.show()["alice"]["latest_handshake"]

    hub_a.stop(signal.SIGKILL)  # hub A dies; nothing on the laptop changes
    t0 = time.monotonic()
    wait_until(lambda: ping(laptop_ns, HUB_INNER, timeout=0.5), timeout=30,
               what="alice through hub B")
    moved = time.monotonic() - t0
    assert moved < 20.0, f"failed over after {moved:.1f} s"
    log = laptop.log_path.read_text()
    assert "trying 192.0.2.65:51820" in log, log
    rows = {r["name"]: r for r in __import__("json").loads(b_ns.run(
        [PY, "-m", "pytun.server.admin", "--state-dir", b_state, "show", "--json"]).stdout)}
    assert rows["alice"]["latest_handshake"] and rows["alice"]["endpoint"].startswith("192.0.2.66")
    print(f"\nfailed over to hub B {moved:.1f} s after hub A died")
    hub_b.terminate()
    assert hub_b.wait(10) == 0
    b_ns.procs.remove(hub_b)
