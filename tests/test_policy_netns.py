"""The hub's forwarding policy end to end: a running pytun-server, real laptops, real kernel.

                 +------------------------------- hub --------------------------------+
    alice (dev) -| 198.51.100.17/28    lo 192.0.2.1 (UDP 51820)                        |-- inet
    olga  (ops) -| 198.51.100.33/28    TUN 10.77.0.1/24                                |   203.0.113.2
    carol (full,-| 198.51.100.49/28    veth 203.0.113.1/24 (egress, default route) ----|   + 169.254.169.254
    wireguard-go)|                     veth 10.20.3.1/24 ---------------------------- db 10.20.3.4
                 +---------------------------------------------------------------------+

alice and olga run pytun-client (split tunnel: the hub's subnet and --route 10.20.0.0/16);
carol runs stock wireguard-go with a full tunnel. The db host listens on TCP 5432 and 22.
Each test leaves the rules as it found them.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time

import pytest

from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INET, HUB_INNER, INET_HOST, PY, Hub, OurLaptop, WgGoLaptop
from .netns import Topology, ping, unique, wait_until

pytestmark = pytest.mark.netns

DB = "10.20.3.4"
METADATA = "169.254.169.254"

LISTEN = textwrap.dedent("""
    import socket, sys, threading
    def serve(port):
        srv = socket.create_server(("0.0.0.0", port))
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
    def echo(conn):
        while data := conn.recv(100):
            conn.sendall(data)
    for port in map(int, sys.argv[1:]):
        threading.Thread(target=serve, args=(port,), daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()
""")

# One TCP connection kept open; each stdin line is sent and its echo printed, or "timeout".
SESSION = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    s.settimeout(float(sys.argv[3]))
    print("connected", flush=True)
    for line in sys.stdin:
        try:
            s.sendall(line.encode())
            print(s.recv(100).decode().strip(), flush=True)
        except OSError:
            print("timeout", flush=True)
""")

CONNECT = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        print("open")
    except OSError:
        print("closed")
""")


def tcp_open(ns, host: str, port: int, timeout: float = 1.0) -> bool:
    return ns.run([PY, "-c", CONNECT, host, str(port), str(timeout)]).stdout.strip() == "open"


@pytest.fixture(scope="module")
def net(tmp_path_factory, netns_ok):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save", "ipset")
    tmp = tmp_path_factory.mktemp("policy")
    with Topology() as topo:
        hub = Hub(topo, tmp, init_args=("--route", "10.20.0.0/16"))
        db = topo.netns("db")
        topo.veth(hub.ns, "10.20.3.1/24", db, f"{DB}/24")
        db.run("ip route add default via 10.20.3.1")
        server = db.popen([PY, "-u", "-c", LISTEN, "5432", "22"], stdout=subprocess.PIPE,
                          text=True)
        assert server.stdout.readline().strip() == "listening"
        hub.inet.run("ip", "addr", "add", f"{METADATA}/32", "dev", "lo")
        # The operator narrows the default "everyone -> 10.20.0.0/16" to per-group rules.
        hub.admin("access", "remove", str(rule_ids(hub)["everyone 10.20.0.0/16 any"]))
        hub.admin("group", "add", "dev")
        hub.admin("group", "add", "ops")
        hub.admin("access", "add", "dev", "10.20.3.0/24", "tcp/5432", "--comment", "database")
        hub.admin("access", "add", "ops", "10.20.3.0/24", "tcp")
        assert hub.ns.sysctl("net.ipv4.ip_forward") == "0"
        hub.start()
        laptops = {}
        for name, group in (("alice", "dev"), ("olga", "ops")):
            ns, _ = hub.connect_laptop()
            laptops[name] = ns
            OurLaptop(ns, tmp, hub.add_peer(name, "--group", group), name)
        ns, _ = hub.connect_laptop()
        WgGoLaptop(ns, tmp, hub.add_peer("carol", "--keepalive", "1", "--full-tunnel"),
                   ipv6=False)
        laptops["carol"] = ns
        for name, ns in laptops.items():
            try:
                wait_until(lambda: ping(ns, HUB_INNER), timeout=10, what=f"{name}'s tunnel")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- hub log\n{hub.log()}") from None
        yield hub, laptops, db, tmp


def rule_ids(hub) -> dict[str, int]:
    rows = json.loads(hub.admin("access", "list", "--json").stdout)
    return {f"{r['source']} {r['destination']} {r['protocol']}": r["id"] for r in rows}


def explain(hub, *args) -> tuple[int, str]:
    done = hub.admin("access", "explain", *args, check=False)
    return done.returncode, done.stdout.strip()


def test_nothing_on_the_uplink_reaches_a_laptop_or_spoofs_one(net):
    """A host that routes the VPN subnet to the hub's uplink gets nowhere."""
    hub, laptops, _, _ = net
    alice = hub.show()["alice"]["address"].split("/")[0]
    olga = hub.show()["olga"]["address"].split("/")[0]
    hub.inet.run(f"ip route replace 10.77.0.0/24 via {HUB_INET}")
    try:
        assert ping(laptops["alice"], HUB_INNER)
        assert not ping(hub.inet, alice, count=2, timeout=0.5)
        assert not tcp_open(hub.inet, alice, 22, timeout=0.5)
        assert not ping(hub.inet, HUB_INNER, timeout=0.5)  # the hub's tunnel address, too
        # A datagram from the uplink that claims olga's inner address never reaches alice.
        listener = laptops["alice"].popen([PY, "-u", "-c", textwrap.dedent("""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 7777))
            s.settimeout(2)
            print("ready", flush=True)
            try:
                print("got", s.recvfrom(100)[1][0], flush=True)
            except socket.timeout:
                print("nothing", flush=True)
        """)], stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "ready"
        hub.inet.run("ip", "addr", "add", f"{olga}/32", "dev", "lo")
        try:
            hub.inet.run([PY, "-c", "import socket; s = socket.socket(socket.AF_INET,"
                          f" socket.SOCK_DGRAM); s.bind(('{olga}', 0));"
                          f" [s.sendto(b'x', ('{alice}', 7777)) for _ in range(5)]"])
        finally:
            hub.inet.run("ip", "addr", "del", f"{olga}/32", "dev", "lo")
        assert listener.stdout.readline().strip() == "nothing"
        counters = hub.ns.run(f"iptables-legacy -t raw -L PYTUN-{hub.ifname}-RAW -v -n -x").stdout
        assert int(counters.splitlines()[4].split()[0]) >= 5, counters  # the anti-spoof drop
    finally:
        hub.inet.run("ip route del 10.77.0.0/24", check=False)


def test_the_host_does_not_start_forwarding_between_its_other_networks(net):
    """ip_forward was 0 before the hub: laptops' underlay cannot reach the internet host
    through the hub, while a laptop's tunnel can."""
    hub, laptops, _, _ = net
    assert hub.ns.sysctl("net.ipv4.ip_forward") == "1"
    carol = laptops["carol"]
    underlay = [a["local"] for link in carol.ip_json("addr show") for a in link["addr_info"]
                if a["local"].startswith("198.51.100.")][0]
    hub_side = underlay.rsplit(".", 1)[0] + "." + str(int(underlay.rsplit(".", 1)[1]) - 1)
    carol.run(f"ip route add {INET_HOST}/32 via {hub_side} metric 5")  # beats the tunnel route
    try:
        assert not ping(carol, INET_HOST, timeout=0.5)
    finally:
        carol.run(f"ip route del {INET_HOST}/32 via {hub_side} metric 5")
    assert ping(carol, INET_HOST)  # through the tunnel and the hub's NAT


def test_metadata_service_is_closed_until_a_rule_names_it(net):
    hub, laptops, _, _ = net
    carol = laptops["carol"]
    assert ping(carol, INET_HOST)  # full tunnel: the internet is open to carol
    assert not ping(carol, METADATA, count=2, timeout=0.5)
    assert explain(hub, "carol", METADATA)[0] == 3
    hub.admin("access", "add", "peer:carol", f"{METADATA}/32", "--comment", "cloud-init")
    try:
        assert ping(carol, METADATA)
        code, text = explain(hub, "carol", METADATA)
        assert code == 0 and "peer:carol -> 169.254.169.254/32" in text
    finally:
        hub.admin("access", "remove", str(rule_ids(hub)[f"peer:carol {METADATA}/32 any"]))
    assert not ping(carol, METADATA, timeout=0.5)


def test_a_laptop_cannot_claim_the_hubs_port_through_nat(net):
    """CVE-2021-3773 class: a laptop's flow from inner port 51820 to X:P must not steal a real
    WireGuard peer at X:P, which then handshakes with the hub as usual."""
    hub, laptops, _, tmp = net
    port = 40123
    laptops["carol"].run([PY, "-c", "import socket; s = socket.socket(socket.AF_INET,"
                          " socket.SOCK_DGRAM); s.bind(('0.0.0.0', 51820));"
                          f" [s.sendto(b'claim', ('{INET_HOST}', {port})) for _ in range(3)]"])
    entries = hub.ns.run("conntrack -L -p udp --orig-port-dst " + str(port), check=False)
    if entries.returncode == 0:  # conntrack(8) shows which port the hub chose
        assert "sport=51820" in entries.stdout and "dport=51820 " not in entries.stdout, entries
    config = hub.add_peer("inetpeer", "--keepalive", "0")
    peer = WgGoLaptop(hub.inet, tmp, config, routes=["10.77.0.1/32"], ipv6=False)
    try:
        hub.inet.run("wg", "set", peer.ifname, "listen-port", str(port))
        hub_key = re.search(r"\[Peer\]\s*PublicKey\s*=\s*(\S+)", config).group(1)
        hub.inet.run("wg", "set", peer.ifname, "peer", hub_key, "endpoint", f"{HUB_INET}:51820")
        assert wait_until(lambda: ping(hub.inet, HUB_INNER, timeout=1), timeout=10,
                          what="the WireGuard peer behind the same port to handshake")
        assert hub.show()["inetpeer"]["endpoint"] == f"{INET_HOST}:{port}"
    finally:
        hub.admin("remove-peer", "inetpeer")


def test_groups_and_rules_decide_and_a_removed_rule_cuts_a_live_connection(net):
    hub, laptops, _, _ = net
    alice, olga = laptops["alice"], laptops["olga"]
    assert tcp_open(alice, DB, 5432) and not tcp_open(alice, DB, 22, timeout=0.5)
    assert tcp_open(olga, DB, 5432) and tcp_open(olga, DB, 22)
    ids = rule_ids(hub)
    assert explain(hub, "alice", DB, "tcp/5432") == (
        0, f"allow: rule #{ids['dev 10.20.3.0/24 tcp']} dev -> 10.20.3.0/24 tcp/5432")
    assert explain(hub, "alice", DB, "tcp/22") == (3, "deny: no rule allows it (default deny)")
    assert explain(hub, "olga", DB, "tcp/22") == (
        0, f"allow: rule #{ids['ops 10.20.3.0/24 tcp']} ops -> 10.20.3.0/24 tcp")

    sessions = {}
    for name, ns in (("alice", alice), ("olga", olga)):
        proc = ns.popen([PY, "-u", "-c", SESSION, DB, "5432", "1.0"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "connected"
        sessions[name] = proc

    def say(name: str, word: str) -> str:
        sessions[name].stdin.write(word + "\n")
        sessions[name].stdin.flush()
        return sessions[name].stdout.readline().strip()

    assert say("alice", "one") == "one" and say("olga", "one") == "one"
    dev_rule = rule_ids(hub)["dev 10.20.3.0/24 tcp"]
    hub.admin("access", "remove", str(dev_rule))  # returns once the kernel holds the change
    try:
        t0 = time.monotonic()
        assert say("alice", "two") == "timeout"  # the 1 s receive timeout
        assert time.monotonic() - t0 < 1.5
        assert say("olga", "two") == "two"  # ops' connection goes on
        assert not tcp_open(alice, DB, 5432, timeout=0.5)
        assert explain(hub, "alice", DB, "tcp/5432")[0] == 3
        rows = hub.show()
        assert rows["alice"]["latest_handshake"] and rows["olga"]["latest_handshake"]
        assert ping(alice, HUB_INNER) and ping(olga, HUB_INNER)  # sessions untouched
    finally:
        for proc in sessions.values():
            proc.stdin.close()
            proc.wait(5)
        hub.admin("access", "add", "dev", "10.20.3.0/24", "tcp/5432", "--comment", "database")
    assert tcp_open(alice, DB, 5432)


def test_a_second_hub_in_the_namespace_comes_and_goes_without_touching_the_first(net):
    hub, laptops, _, tmp = net
    before = sorted(_ours(hub.ns, hub.ifname))
    hub.ns.run("iptables-legacy -I FORWARD -m comment --comment pytun -j ACCEPT")  # an operator's
    state = str(tmp / "second-state")
    ifname = unique("ps")
    admin = [PY, "-m", "pytun.server.admin", "--state-dir", state]
    hub.ns.run([*admin, "init", "--subnet", "10.78.0.0/24", "--endpoint", f"{HUB_ENDPOINT}:51821",
                "--listen-port", "51821", "--interface", ifname])
    log = open(tmp / "second.log", "w")
    second = hub.ns.popen([PY, "-m", "pytun.server.main", "--state-dir", state], stdout=log,
                          stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: f"PYTUN-{ifname}-FWD" in hub.ns.run("iptables-legacy-save").stdout,
                   timeout=15, what="the second hub's rules")
        # A SIGTERM during start-up waits until the hub is up, then stops it cleanly.
        assert sorted(_ours(hub.ns, hub.ifname)) == before
        second.terminate()
        assert second.wait(10) == 0
        hub.ns.procs.remove(second)
        # Its --cleanup leaves the first hub alone, and a device of that name that is not
        # a TUN device (an operator's) too.
        hub.ns.run(f"ip link add {ifname} type veth peer name {ifname}p")
        done = hub.ns.run([PY, "-m", "pytun.server.main", "--state-dir", state, "--cleanup"])
        assert "not the hub's TUN device" in done.stderr
        assert ifname in hub.ns.run("ip -o link").stdout
        assert f"PYTUN-{ifname}-" not in hub.ns.run("iptables-legacy-save").stdout
        assert sorted(_ours(hub.ns, hub.ifname)) == before
        assert "-A FORWARD -m comment --comment pytun -j ACCEPT" in \
            hub.ns.run("iptables-legacy-save").stdout
        assert hub.ns.sysctl("net.ipv4.ip_forward") == "1"
        for name, ns in laptops.items():
            assert ping(ns, HUB_INNER), name
        # init refuses an interface name that exists and is not a TUN device.
        done = hub.ns.run([*admin[:-2], "--state-dir", str(tmp / "third"), "init", "--subnet",
                           "10.79.0.0/24", "--endpoint", HUB_ENDPOINT, "--interface", ifname],
                          check=False)
        assert done.returncode == 1 and "is not a TUN device" in done.stderr, done.stderr
    finally:
        hub.ns.run(f"ip link del {ifname}", check=False)
        hub.ns.run("iptables-legacy -D FORWARD -m comment --comment pytun -j ACCEPT",
                   check=False)


def _ours(ns, tag: str) -> list[str]:
    return [line for line in ns.run("iptables-legacy-save").stdout.splitlines()
            if f"PYTUN-{tag}-" in line or f"pytun:{tag}" in line]
