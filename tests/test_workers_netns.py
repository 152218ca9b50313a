"""The hub with two data-plane workers, end to end (server/workers.py): real kernel, one
multi-queue TUN device, a steered SO_REUSEPORT group, stock wireguard-go and pytun-client
laptops, in namespaces (hubnet.py).

The laptops' keys are chosen so that each worker owns some: the worker a laptop's key names
holds its sessions, and its `get` answer lists it; the hub's merges both.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from pytun.common import control, keys, steering

from .badnet import io_errors
from .conftest import require_tools
from .hubnet import HUB_INNER, Hub, OurLaptop, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)
from .test_hub_netns import _rules, tcp_transfer

pytestmark = pytest.mark.netns

WORKERS = 2
METRICS = "127.0.0.1:9586"
SCRAPE = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""


def key_for(worker: int) -> tuple[str, str]:
    """A (private, public) key pair, base64, whose public key worker `worker` owns."""
    while True:
        private = keys.generate_private()
        public = keys.public_from_private(private)
        if steering.owner_of(public, WORKERS) == worker:
            return keys.encode_key(private), keys.encode_key(public)


def add_laptop(hub: Hub, name: str, worker: int, *args) -> str:
    """add-peer with a key owned by `worker`; the wg-quick config with its private key."""
    private, public = key_for(worker)
    config = hub.add_peer(name, "--public-key", public, *args)
    return re.sub(r"(?m)^#?\s*PrivateKey\s*=.*$", f"PrivateKey = {private}", config)


def worker_rows(hub: Hub, index: int) -> set[str]:
    path = os.path.join(hub.state_dir, f"worker{index}.sock")
    return {p["name"] for p in control.peers_from_get(control.request(path, [("get", "1")]))}


@pytest.fixture(scope="module")
def net(tmp_path_factory, netns_ok):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save")
    from .netns import Topology
    tmp = tmp_path_factory.mktemp("workers")
    with Topology() as topo:
        hub = Hub(topo, tmp, init_args=("--allow-peer-to-peer", "--metrics", METRICS))
        hub.admin("access", "add", "everyone", "hub", "tcp/5001")
        hub.start(args=("--workers", str(WORKERS)))
        laptops = {}
        for name, worker in (("w0a", 0), ("w0b", 0), ("w1a", 1)):
            ns, _ = hub.connect_laptop()
            laptops[name] = (ns, WgGoLaptop(ns, tmp, add_laptop(hub, name, worker,
                                                               "--keepalive", "1")), worker)
        ns, _ = hub.connect_laptop()
        laptops["ours"] = (ns, OurLaptop(ns, tmp, add_laptop(hub, "ours", 1), "ours"), 1)
        yield hub, laptops, tmp


def test_every_laptop_is_served_by_the_worker_its_key_names(net):
    hub, laptops, _ = net
    for name, (ns, _, _) in laptops.items():
        assert wait_until(lambda: ping(ns, HUB_INNER), timeout=10, what=f"{name} to ping the hub")
    for name, (ns, _, _) in laptops.items():
        tcp_transfer(ns, hub.ns, HUB_INNER, 5 << 20)
    rows = hub.show()
    for name, (_, _, worker) in laptops.items():
        assert rows[name]["latest_handshake"], rows[name]
        assert rows[name]["rx_bytes"] > 5 << 20, rows[name]
        assert name in worker_rows(hub, worker)
        assert name not in worker_rows(hub, 1 - worker)
    stats = hub.stats()
    assert stats["workers"] == "2"
    errors = io_errors(hub)
    assert errors == dict.fromkeys(errors, 0), errors
    assert "hub up:" in hub.log() and "2 workers" in hub.log()


def test_metrics_sum_the_workers(net):
    hub, laptops, _ = net
    text = hub.ns.run(["python3", "-c", SCRAPE, f"http://{METRICS}/metrics"]).stdout
    rows = hub.show()
    for name in laptops:
        line = re.search(rf'^pytun_peer_received_bytes_total{{peer="{name}"}} (\S+)$', text, re.M)
        assert line, name
        assert float(line.group(1)) > 5 << 20  # the worker's count, not zero
        assert abs(float(line.group(1)) - rows[name]["rx_bytes"]) < 1 << 20
    connected = re.search(r'^pytun_peers{state="connected"} (\S+)$', text, re.M)
    assert connected and float(connected.group(1)) == len(laptops), text[:2000]
    completed = re.search(r'^pytun_handshakes_total{result="completed"} (\S+)$', text, re.M)
    assert completed and float(completed.group(1)) >= len(laptops)
    assert re.search(r"^pytun_workers 2\.0$", text, re.M)
    handed = re.search(r'^pytun_handoffs_total{what="initiations_in"} (\S+)$', text, re.M)
    assert handed and float(handed.group(1)) == float(hub.stats().get("handoff_initiations_in", 0))
    assert re.search(r'^pytun_tun_offload_total{what="gso_reads"} 0\.0$', text, re.M)


def test_laptop_to_laptop_across_workers(net):
    """w0a's packets to w1a leave the TUN device on whichever queue the kernel picks: a
    worker without w1a's session hands them to the one that has it."""
    hub, laptops, _ = net
    rows = hub.show()
    a_ns, b_ns = laptops["w0a"][0], laptops["w1a"][0]
    b_addr = rows["w1a"]["address"].split("/")[0]
    a_addr = rows["w0a"]["address"].split("/")[0]
    assert wait_until(lambda: ping(a_ns, b_addr), timeout=10, what="w0a to reach w1a")
    assert ping(b_ns, a_addr, count=5)
    stats = hub.stats()
    print("handoffs:", {k: v for k, v in stats.items() if k.startswith("handoff_")})
    assert int(stats.get("handoff_initiations_out", 0)) == int(
        stats.get("handoff_initiations_in", 0))


def test_roaming_and_live_changes_with_workers(net):
    hub, laptops, tmp = net
    ns, laptop, _ = laptops["w1a"]
    before = hub.show()["w1a"]["endpoint"]
    ns.run("wg", "set", laptop.ifname, "listen-port", "47123")  # a new source port
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5)
                      and hub.show()["w1a"]["endpoint"].endswith(":47123"),
                      timeout=15, what=f"the hub to follow w1a from {before}")
    for worker in (0, 1):
        lap_ns, _ = hub.connect_laptop()
        WgGoLaptop(lap_ns, tmp, add_laptop(hub, f"new{worker}", worker))
        assert wait_until(lambda: ping(lap_ns, HUB_INNER, timeout=0.5), timeout=15,
                          what=f"new{worker} to connect")
        assert f"new{worker}" in worker_rows(hub, worker)
        hub.admin("remove-peer", f"new{worker}")
        assert wait_until(lambda: not ping(lap_ns, HUB_INNER, timeout=0.3), timeout=15,
                          what=f"new{worker}'s traffic to stop")
    for name, (lap, _, _) in laptops.items():
        assert ping(lap, HUB_INNER), f"{name} lost its tunnel"


def test_a_worker_that_dies_stops_the_hub_and_its_rules(topology, tmp_path):
    require_tools("iptables-legacy-save")
    hub = Hub(topology, tmp_path)
    hub.start(args=("--workers", "2"))
    assert _rules(hub.ns)
    children = hub.ns.run("ps", "-o", "pid=", "--ppid", str(hub.pid)).stdout.split()
    assert len(children) == 2, children
    os.kill(int(children[1]), signal.SIGKILL)
    hub.proc.wait(15)
    code = hub.proc.returncode
    hub.ns.procs.remove(hub.proc)
    hub.proc = None
    assert code == 1
    assert "worker 1 exited" in hub.log()
    assert _rules(hub.ns) == []
    assert hub.ifname not in hub.ns.run("ip", "-o", "link").stdout
    hub.start(args=("--workers", "2"))  # and it starts again whole
    running = sorted(_rules(hub.ns))
    hub.stop(signal.SIGKILL)  # the supervisor killed: its workers go with it
    assert wait_until(lambda: not hub.ns.pids(), timeout=10, what="the workers to go")
    hub.start(args=("--workers", "2"))
    assert sorted(_rules(hub.ns)) == running, "a restart after a crash duplicated rules"
    assert hub.stop(signal.SIGTERM) == 0
    assert _rules(hub.ns) == []
    assert hub.ifname not in hub.ns.run("ip", "-o", "link").stdout
    assert not [f for f in os.listdir(hub.state_dir) if f.endswith(".sock")]
    assert not hub.ns.pids(), "a worker outlived the hub"


def test_hot_standby_roles_reach_every_worker(topology, tmp_path):
    """With the ha setting, the standby hub's workers answer nothing; `ha master` makes
    every worker active and `ha backup` ends every session."""
    require_tools("wireguard-go", "wg")
    hub = Hub(topology, tmp_path, init_args=("--service-address", "192.0.2.99",
                                             "--start-as", "standby"))
    hub.start(args=("--workers", "2"))
    laptops = []
    for worker in (0, 1):
        ns, _ = hub.connect_laptop()
        WgGoLaptop(ns, tmp_path, add_laptop(hub, f"s{worker}", worker, "--keepalive", "1"))
        laptops.append(ns)
    assert not ping(laptops[0], HUB_INNER, timeout=1)
    assert dict(control.request(hub.control_path, [("ha", "status")]))["role"] == "standby"
    assert int(hub.stats().get("drop_standby", 0)) > 0
    hub.admin("ha", "master")
    for ns in laptops:
        assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=15,
                          what="a laptop to connect once the hub is master")
    answer = dict(control.request(hub.control_path, [("ha", "status")]))
    assert answer["role"] == "active"
    hub.admin("ha", "backup")
    for ns in laptops:
        assert not ping(ns, HUB_INNER, timeout=1)
    assert hub.stop() == 0
