"""Taking over a running WireGuard server without touching a laptop.

A stock wireguard-go hub (interface from a wg0.conf, the way wg-quick would set it up) serves
three stock wireguard-go laptops. `pytun-admin import-wg wg0.conf --live IFACE` reads its config
and the live endpoints, the WireGuard hub stops, pytun-server starts in its place on the same
addresses, and the three laptops, untouched, are back: the hub calls them.

                 +--------------------------- hub ----------------------------+
    laptop i ----| veth 198.51.100.(16i+1)/28   lo 192.0.2.1 (UDP 51820)       |---- inet
                 | wireguard-go, then pytun-server: 10.77.0.1/24             |
                 +-----------------------------------------------------------+
"""

from __future__ import annotations

import time

import pytest

from pytun.common import keys

from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INNER, PY, Hub, WgGoLaptop, start_wireguard_go, write_config
from .netns import Topology, ping, wait_until

pytestmark = pytest.mark.netns


def test_pytun_takes_over_a_wireguard_server_and_its_laptops_come_back(tmp_path, netns_ok):
    require_tools("wireguard-go", "wg", "ping")
    with Topology() as topo:
        hub = Hub(topo, tmp_path)  # namespaces and addresses; its own state is not used
        hub_private = keys.generate_private()
        hub_public = keys.encode_key(keys.public_from_private(hub_private))
        laptops, peers = [], []
        for i, name in enumerate(("alice", "bob", "carol")):
            private = keys.generate_private()
            public = keys.encode_key(keys.public_from_private(private))
            peers.append(f"# Name = {name}\n[Peer]\nPublicKey = {public}\n"
                         f"AllowedIPs = 10.77.0.{i + 2}/32\n")
            laptops.append((name, private, f"10.77.0.{i + 2}"))
        wg0 = (f"[Interface]\nPrivateKey = {keys.encode_key(hub_private)}\n"
               "Address = 10.77.0.1/24\nListenPort = 51820\n"
               "PostUp = iptables -A FORWARD -i %i -j ACCEPT\n\n" + "\n".join(peers))
        conf = write_config(tmp_path, "wg0", wg0)

        # The WireGuard server, as wg-quick would bring it up.
        ifname, server = start_wireguard_go(hub.ns, "wgh")
        stripped = "\n".join(line for line in wg0.splitlines()
                             if not line.startswith(("Address", "PostUp")))
        hub.ns.run("wg", "setconf", ifname, write_config(tmp_path, "wg0-stripped", stripped))
        hub.ns.run("ip", "addr", "add", "10.77.0.1/24", "dev", ifname)
        hub.ns.run("ip", "link", "set", ifname, "up")

        namespaces = []
        for name, private, address in laptops:
            ns, _ = hub.connect_laptop()
            text = (f"[Interface]\nPrivateKey = {keys.encode_key(private)}\n"
                    f"Address = {address}/32\n\n[Peer]\nPublicKey = {hub_public}\n"
                    f"Endpoint = {HUB_ENDPOINT}:51820\nAllowedIPs = 10.77.0.0/24\n"
                    "PersistentKeepalive = 25\n")
            WgGoLaptop(ns, tmp_path, text)
            assert wait_until(lambda: ping(ns, HUB_INNER), timeout=10, what=f"{name} on wg")
            namespaces.append((name, ns))

        # Take it over: import with the live endpoints, stop WireGuard, start pytun.
        state_dir = str(tmp_path / "pytun-state")
        admin = [PY, "-m", "pytun.server.admin", "--state-dir", state_dir]
        dry = hub.ns.run([*admin, "import-wg", conf, "--endpoint", HUB_ENDPOINT, "--live",
                          ifname, "--interface", hub.ifname, "--dry-run"])
        assert "peer alice: 10.77.0.2" in dry.stdout and "last seen at 198.51.100." in dry.stdout
        assert "not mapped: PostUp = iptables" in dry.stdout
        hub.ns.run([*admin, "import-wg", conf, "--endpoint", HUB_ENDPOINT, "--live", ifname,
                    "--interface", hub.ifname])
        server.terminate()
        server.wait(10)
        hub.ns.procs.remove(server)
        hub.ns.run("ip", "link", "del", ifname, check=False)
        hub.state_dir = state_dir
        t0 = time.monotonic()
        hub.start()
        for name, ns in namespaces:  # untouched laptops, still on their old sessions
            assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=15,
                              what=f"{name} back through pytun")
        back = time.monotonic() - t0
        rows = hub.show()
        assert sorted(rows) == ["alice", "bob", "carol"]
        assert all(rows[n]["latest_handshake"] for n in rows), rows
        # The hub dialled them (REKEY_TIMEOUT is 5 s; a laptop alone would wait 15 s or more).
        assert back < 5.0, f"laptops back after {back:.1f} s"
