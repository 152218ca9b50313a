"""1,000 peer additions and removals on a hub while a laptop's traffic flows, sans-IO: the Hub
class with a real registry and its Device, laptops made of Devices.

Every added peer is in the device, every removed one is gone: its receiver indexes, its
handshake in flight, its allowed IPs, its timers, and every Peer and Keypair object (no
reference left anywhere, after a garbage collection), while the established laptop's pings
are all answered and none of the hub's drop counters moves for it.
"""

from __future__ import annotations

import gc
import ipaddress
import time

from pytun.common import keys
from pytun.common.device import Device
from pytun.common.peer import Keypair, Peer as EnginePeer
from pytun.server import admin, state
from pytun.server.hub import Hub
from pytun.server.registry import Peer, SqliteRegistry

HUB_EP = ("192.0.2.1", 51820)
ROUNDS, PER_ROUND = 200, 5


def icmp_echo(src: str, dst: str, seq: int) -> bytes:
    """An IPv4 ICMP echo request (checksums left zero: the engine does not look)."""
    payload = seq.to_bytes(2, "big") * 28
    total = 20 + 8 + len(payload)
    return (bytes([0x45, 0, total >> 8, total & 0xFF, 0, 0, 0, 0, 64, 1, 0, 0])
            + ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
            + bytes([8, 0, 0, 0, 0, 1]) + seq.to_bytes(2, "big") + payload)


def shuttle(a: Device, b: Device, a_ep, b_ep, now: float) -> None:
    """Deliver what each device sent to the other until both are quiet."""
    for _ in range(10):
        if not a.net_out and not b.net_out:
            return
        out_a, a.net_out = a.net_out, []
        out_b, b.net_out = b.net_out, []
        for datagram, _ in out_a:
            b.receive(bytes(datagram), a_ep, now)
        for datagram, _ in out_b:
            a.receive(bytes(datagram), b_ep, now)


def test_a_thousand_additions_and_removals_leave_nothing_behind(tmp_path):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "h"]) == 0
    settings = state.load_settings(d)
    registry = SqliteRegistry(state.registry_path(d))
    hub = Hub(d, settings, state.load_private_key(d), registry)
    hub_public = hub.device.public_key
    lap_private = keys.generate_private()
    registry.add(Peer(name="steady", public_key=keys.encode_key(keys.public_from_private(
        lap_private)), address=ipaddress.ip_interface("10.77.0.2/32")))
    hub.sync()
    steady = Device(lap_private)
    steady.add_peer(hub_public, endpoint=HUB_EP,
                    allowed_ips=[ipaddress.ip_network("10.77.0.0/24")])
    steady_ep = ("198.51.100.18", 40000)
    now = 1.0
    steady.send(icmp_echo("10.77.0.2", "10.77.0.1", 0), now)
    shuttle(steady, hub.device, steady_ep, HUB_EP, now)
    assert len(hub.device.tun_out) == 1
    hub.device.tun_out.clear()
    drops_before = dict(hub.device.drops)
    t0 = time.monotonic()
    added = removed = handshakes = answered = 0
    churned = set()
    for r in range(ROUNDS):
        now += 0.05
        batch = []
        for i in range(PER_ROUND):
            private = keys.generate_private()
            psk = keys.generate_psk()
            name = f"c{r}-{i}"
            registry.add(Peer(name=name, public_key=keys.encode_key(
                keys.public_from_private(private)), address=ipaddress.ip_interface(
                f"10.77.0.{100 + i}/32"), preshared_key=keys.encode_key(psk)))
            batch.append((name, private, psk))
            churned.add(name)
        assert len(hub.sync()[0]) == PER_ROUND
        added += PER_ROUND
        # One of them makes a session and sends a packet; another leaves a handshake in flight.
        name, private, psk = batch[0]
        lap = Device(private)
        lp = lap.add_peer(hub_public, preshared_key=psk, endpoint=HUB_EP,
                          allowed_ips=[ipaddress.ip_network("10.77.0.0/24")])
        lap.send(icmp_echo("10.77.0.100", "10.77.0.1", r), now)
        shuttle(lap, hub.device, ("198.51.100.50", 30000 + r), HUB_EP, now)
        assert lp.current is not None and len(hub.device.tun_out) == 1, r
        handshakes += 1
        hub.device.tun_out.clear()
        waiting = hub.peers[batch[1][0]][1]
        waiting.endpoint = ("198.51.100.60", 1)
        hub.device.initiate(waiting, now)  # no answer comes: in flight
        assert hub.device.handshakes and len(hub.device.net_out) == 1
        hub.device.net_out.clear()
        del waiting
        for kind, engine_peer, detail in hub.device.events:
            hub.on_event(kind, engine_peer, detail)
        hub.device.events.clear()
        del engine_peer  # only the hub may keep it
        # The steady laptop's traffic goes on.
        steady.send(icmp_echo("10.77.0.2", "10.77.0.1", r + 1), now)
        shuttle(steady, hub.device, steady_ep, HUB_EP, now)
        answered += len(hub.device.tun_out)
        hub.device.tun_out.clear()
        for name, *_ in batch:
            registry.remove(name)
        assert sorted(hub.sync()[1]) == sorted(n for n, *_ in batch)
        removed += PER_ROUND
        hub.device.tick(now)
    elapsed = time.monotonic() - t0
    dev = hub.device
    gc.collect()
    # The hub's engine peers of removed laptops, by name (other tests' objects may be alive).
    engine_peers = [o for o in gc.get_objects()
                    if type(o) is EnginePeer and o.name in churned]
    keypairs = [o for o in gc.get_objects()
                if type(o) is Keypair and o.peer.name in churned]
    steady_kps = [kp for kp in dev.keypairs.values()]
    print(f"\n{added} added and {removed} removed in {ROUNDS * 2} syncs ({elapsed:.1f} s), "
          f"{handshakes} sessions made and dropped; steady laptop {answered}/{ROUNDS} packets "
          f"through; device now: {len(dev.peers)} peers, {len(dev.keypairs)} indexes, "
          f"{len(dev.handshakes)} handshakes, {len(dev._armed)} armed; live engine Peer objects "
          f"of removed peers: {len(engine_peers)}, their Keypairs: {len(keypairs)}")
    assert added == removed == ROUNDS * PER_ROUND == 1000
    assert answered == ROUNDS
    assert list(dev.peers) == [keys.public_from_private(lap_private)]
    assert all(kp.peer is hub.peers["steady"][1] for kp in steady_kps) and len(steady_kps) <= 3
    assert dev.handshakes == {} or all(p is hub.peers["steady"][1]
                                       for p in dev.handshakes.values())
    assert dev._armed <= {hub.peers["steady"][1]}
    assert engine_peers == [] and keypairs == []
    assert set(hub.peers) == {"steady"} and set(hub._dirty) <= {"steady"}
    assert {k: v - drops_before.get(k, 0) for k, v in dev.drops.items()
            if v != drops_before.get(k, 0)} == {}
    assert dev.allowed_ips.lookup(ipaddress.ip_address("10.77.0.100")) is None
    registry.close()
