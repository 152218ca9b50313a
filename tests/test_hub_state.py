"""The hub's bookkeeping without a kernel: a Hub object over a real SQLite registry, its
Device driven by hand with a sans-IO laptop (no TUN, no socket, no driver thread).

- a storm of endpoint moves becomes a bounded number of registry writes and log lines;
- the greatest handshake timestamp of a key outlives remove/re-add, disable/enable and a
  restart of the hub, so a captured initiation gets no answer and moves nothing.
"""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio.testing

from pytun.common import keys
from pytun.common.device import Device
from pytun.server import hub as hub_module
from pytun.server import state
from pytun.server.hub import Hub
from pytun.server.registry import Peer, open_registry
from pytun.common.peer import Event

from .enginenet import WALL0, seeded_rng, static_key

HUB_EP = ("192.0.2.1", 51820)
LAPTOP_EP = ("198.51.100.18", 40000)
ATTACKER_EP = ("203.0.113.66", 6666)


class World:
    def __init__(self, tmp_path, registry_location):
        self.tmp_path = tmp_path
        self.settings = state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1")
        self.hub_private, self.hub_public = static_key("hub")
        self.laptop_private, self.laptop_public = static_key("laptop")
        self.registry = open_registry(registry_location, create=True)
        self.now = 10.0
        self.hub = self.new_hub()

    def new_hub(self) -> Hub:
        hub = Hub(str(self.tmp_path), self.settings, self.hub_private, self.registry)
        hub.device.wallclock = lambda: WALL0 + self.now
        hub.device.rng = seeded_rng(f"hub-{id(hub)}")
        hub.sync()
        return hub

    def add_laptop(self, name="alice") -> None:
        self.registry.add(Peer(name=name, public_key=keys.encode_key(self.laptop_public),
                               address="10.77.0.2"))

    def handshake(self) -> bytes:
        """A laptop completes a handshake with the hub; returns the initiation it sent."""
        laptop = Device(self.laptop_private, rng=seeded_rng(f"laptop-{self.now}"),
                        wallclock=lambda: WALL0 + self.now)
        lp = laptop.add_peer(self.hub_public, endpoint=HUB_EP, allowed_ips=[])
        laptop.initiate(lp, self.now)
        (initiation, _), = laptop.net_out
        laptop.net_out.clear()
        self.hub.device.receive(initiation, LAPTOP_EP, self.now)
        (response, _), = self.hub.device.net_out
        self.hub.device.net_out.clear()
        laptop.receive(response, HUB_EP, self.now)
        for datagram, _ in laptop.net_out:  # the keepalive that confirms the session
            self.hub.device.receive(datagram, LAPTOP_EP, self.now)
        self.deliver_events()
        self.now += 1.0
        return bytes(initiation)

    def deliver_events(self) -> None:
        events, self.hub.device.events = self.hub.device.events, []
        for event in events:
            self.hub.on_event(*event)

    def replay(self, initiation: bytes) -> list:
        """Send a captured initiation from elsewhere; returns what the hub sent back."""
        self.now += 1.0
        self.hub.device.receive(initiation, ATTACKER_EP, self.now)
        out, self.hub.device.net_out = self.hub.device.net_out, []
        return out

    def alice(self):
        return self.hub.peers["alice"][1]


@pytest.fixture
def world(tmp_path, registry_location):
    """Over each backend: SQLite, and PostgreSQL where a throwaway cluster runs."""
    w = World(tmp_path, registry_location)
    yield w
    w.registry.close()


def test_a_replayed_initiation_is_refused_while_the_peer_stays(world):
    world.add_laptop()
    world.hub.sync()
    captured = world.handshake()
    assert world.replay(captured) == []
    assert world.hub.device.drops["replayed_initiation"] == 1


@pytest.mark.parametrize("how", ["remove and add again", "disable and enable",
                                 "restart the hub", "remove, restart, add again"])
def test_a_replayed_initiation_is_refused_after(world, how):
    world.add_laptop()
    world.hub.sync()
    captured = world.handshake()
    if how == "remove and add again":
        # No write-behind happened yet: the removal itself keeps the timestamp for the key.
        world.registry.remove("alice")
        world.hub.sync()
        assert "alice" not in world.hub.peers
        world.add_laptop()
        world.hub.sync()
    elif how == "disable and enable":
        world.registry.set_disabled("alice", True)
        world.hub.sync()
        world.registry.set_disabled("alice", False)
        world.hub.sync()
    elif how == "restart the hub":
        world.hub.flush()  # what a clean stop does; a crash relies on the timer (netns test)
        world.hub = world.new_hub()
    else:
        world.registry.remove("alice")
        world.hub.sync()
        world.hub.flush()
        world.hub = world.new_hub()
        world.add_laptop()
        world.hub.sync()
    stored = world.registry.handshake_timestamps()
    # A peer enabled again keeps the endpoint it last authenticated from (to be called back).
    before = world.alice().endpoint
    assert before is None or how == "disable and enable", before
    assert world.replay(captured) == [], how
    assert world.hub.device.drops["replayed_initiation"] == 1
    assert world.alice().endpoint == before, "the replay moved the peer"
    if how != "remove and add again" and how != "disable and enable":
        assert stored[keys.encode_key(world.laptop_public)] == world.alice().greatest_timestamp
    # A genuine new handshake still works afterwards.
    world.handshake()
    assert world.alice().endpoint == LAPTOP_EP


def test_the_stored_timestamp_only_grows(registry_location):
    reg = open_registry(registry_location, create=True)
    key = keys.encode_key(static_key("x")[1])
    reg.raise_handshake_timestamps([(key, b"\x40" + bytes(10) + b"\x05")])
    reg.raise_handshake_timestamps([(key, b"\x40" + bytes(10) + b"\x03")])
    assert reg.handshake_timestamps() == {key: b"\x40" + bytes(10) + b"\x05"}
    token = reg.change_token()
    reg.raise_handshake_timestamps([(key, b"\x40" + bytes(9) + b"\x01\x00")])
    assert reg.handshake_timestamps()[key] == b"\x40" + bytes(9) + b"\x01\x00"
    assert reg.change_token() == token  # the hub's own notes never look like an admin change
    reg.close()


def test_an_endpoint_storm_is_a_few_writes_and_log_lines(world, caplog, monkeypatch):
    """3,000 moves in 10 s of the hub's clock: at most one write a second, a log line each 10 s."""
    world.add_laptop()
    world.hub.sync()
    world.handshake()
    peer = world.alice()
    clock = trio.testing.MockClock(autojump_threshold=0)
    world.hub.clock = clock.current_time
    writes = []
    real = world.registry.record_endpoints
    monkeypatch.setattr(world.registry, "record_endpoints",
                        lambda rows: writes.append(list(rows)) or real(rows))
    moves = 3000

    async def run_here(fn, *args):  # the worker thread would let the autojump clock race ahead
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_here)

    async def storm():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(world.hub.write_behind)
            for port in range(moves):
                # What the driver hands over: the latest move of the peer, once per batch.
                peer.endpoint = ("198.51.100.18", 20000 + port)
                world.hub.on_event(Event.ENDPOINT, peer, peer.endpoint)
                await trio.sleep(10.0 / moves)
            await trio.sleep(hub_module.LOG_EVERY + 2 * hub_module.WRITE_EVERY)
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="pytun"):
        trio.run(storm, clock=clock)
    lines = [r.getMessage() for r in caplog.records if "move" in r.getMessage()]
    print(f"\n{moves} moves -> {len(writes)} endpoint writes, {len(lines)} log lines: {lines}")
    assert 5 <= len(writes) <= 12  # about one a second over 10 s, never one per move
    assert len(writes) <= 1 + 10 / hub_module.WRITE_EVERY + 1
    assert all(len(rows) == 1 for rows in writes)  # the latest endpoint of the one peer
    assert world.registry.get("alice").endpoint == f"198.51.100.18:{20000 + moves - 1}"
    assert 1 <= len(lines) <= 3, lines
    assert sum(int(line.split("at least ")[1].split()[0]) for line in lines if "more moves" in line) \
        + sum(1 for line in lines if "moved to" in line) == moves


def test_events_of_a_removed_peer_are_ignored(world):
    world.add_laptop()
    world.hub.sync()
    old = world.alice()
    world.registry.remove("alice")
    world.hub.sync()
    world.hub.on_event(Event.ENDPOINT, old, LAPTOP_EP)
    assert world.hub._collect() == ([], [])


def test_the_driver_hands_trio_the_latest_event_per_peer_and_kind():
    """Bounded queue to the trio thread: one pending callback, one entry per (kind, peer)."""
    import socket

    from pytun.common.driver import Driver

    class Token:
        def __init__(self):
            self.calls = []

        def run_sync_soon(self, fn, *args):
            self.calls.append((fn, args))

    seen = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        driver = Driver(Device(static_key("hub")[0]), a.fileno(), b,
                        on_event=lambda *event: seen.append(event))
        driver._token = token = Token()
        alice, bob = object(), object()
        for port in range(3000):  # one batch per datagram, as a storm of source ports makes
            driver._queue_events([("endpoint", alice, ("198.51.100.18", port))])
        driver._queue_events([(Event.HANDSHAKE, bob, None),
                              (Event.ENDPOINT, bob, ("198.51.100.34", 1))])
        assert len(token.calls) == 1 and len(driver._pending_events) == 3
        fn, args = token.calls.pop()
        fn(*args)
        assert seen == [("endpoint", alice, ("198.51.100.18", 2999)), ("handshake", bob, None),
                        ("endpoint", bob, ("198.51.100.34", 1))]
        driver._queue_events([("endpoint", alice, ("198.51.100.18", 1))])
        assert len(token.calls) == 1  # the next event schedules the next delivery
    finally:
        a.close()
        b.close()


def test_a_first_handshake_is_written_at_once_then_at_most_once_a_second(world, monkeypatch):
    """A hub killed right after a laptop's handshake still re-dials it after the restart."""
    world.add_laptop()
    world.hub.sync()
    clock = trio.testing.MockClock()
    times = []

    async def run_here(fn, *args):
        times.append(clock.current_time())
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_here)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(world.hub.write_behind)
            await trio.testing.wait_all_tasks_blocked()
            world.handshake()  # delivers the handshake event to the hub
            await trio.testing.wait_all_tasks_blocked()
            assert world.registry.get("alice").endpoint == "198.51.100.18:40000"
            assert times == [0.0]  # no clock time passed: written at once
            peer = world.alice()
            for port in (1, 2, 3):
                peer.endpoint = ("198.51.100.18", port)
                world.hub.on_event(Event.ENDPOINT, peer, peer.endpoint)
                clock.jump(0.1)
                await trio.testing.wait_all_tasks_blocked()
            assert len(times) == 1  # the next write waits for WRITE_EVERY after the last
            clock.jump(hub_module.WRITE_EVERY)
            await trio.testing.wait_all_tasks_blocked()
            assert len(times) == 2 and world.registry.get("alice").endpoint == "198.51.100.18:3"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)


def test_control_requests_without_a_kernel(world):
    """get, stats, sync and an unknown request, as the control socket hands them over."""
    from pytun.common import control
    world.add_laptop()
    world.hub.sync()
    world.handshake()
    (alice,) = control.peers_from_get(world.hub.handle_control([("get", "1")]))
    assert (alice["name"], alice["address"], alice["endpoint"]) == (
        "alice", "10.77.0.2/32", "198.51.100.18:40000")
    assert alice["latest_handshake"] > 0 and alice["rx_bytes"] > 0
    world.hub.device.receive(b"\x09junk", ATTACKER_EP, world.now)
    assert ("drop_bad_type", "1") in world.hub.handle_control([("stats", "1")])
    # sync=1: the registry's change is on the device when the answer comes.
    world.registry.set_disabled("alice", True)
    answer = world.hub.handle_control([("sync", "1")])
    assert trio.run(lambda: answer) == []
    assert "alice" not in world.hub.peers and "alice" in world.hub._refused
    with pytest.raises(control.ControlError, match="unknown request 'reboot'"):
        world.hub.handle_control([("reboot", "1")])


def test_rules_and_peers_plan_the_firewall_once_the_egress_is_known(world):
    """With a view of the host (what the hub learns at start), every sync plans the kernel:
    a peer's groups and the rules land in the plan, an expired peer leaves it."""
    from pytun.server import firewall, policy
    world.hub.view = policy.HubView.from_settings(world.settings, "eth0", None)
    world.registry.ensure_default_rules(policy.default_rules(world.settings))
    world.registry.add(Peer(name="bob", public_key=keys.encode_key(static_key("bob")[1]),
                            address="10.77.0.3", groups=["dev"], expires=int(time.time()) + 10**6))
    world.registry.add_rule(policy.parse_rule("dev", "10.20.3.0/24", "tcp/5432"))
    world.hub.sync()
    plan = world.hub.wanted[4]
    everyone = plan["sets"][firewall.set_name(world.settings.interface, "everyone", 4)]
    dev = plan["sets"][firewall.set_name(world.settings.interface, "dev", 4)]
    assert everyone == ["10.77.0.3/32"] and dev == ["10.77.0.3/32"]
    assert 6 not in world.hub.wanted  # no IPv6 subnet
    world.registry.set_expiry("bob", 1)  # long gone
    world.hub.sync()
    assert world.hub.wanted[4]["sets"][firewall.set_name(world.settings.interface, "dev", 4)] \
        == [] and "bob" not in world.hub.peers
