"""Several data-plane workers with one hub key, in memory (common/device.py "Workers").

The hub is a list of Devices, one per worker, each with the peers `steering.owner_of` gives it
and the others' allowed IPs as Foreign entries. Datagrams reach a worker the way the kernel's
SO_REUSEPORT group does with the steering program attached: by the program (run here by the
slow interpreter of test_steering.py), and an initiation, which it leaves to the kernel, by a
hash of its source. Tunnel packets leave the kernel on whichever worker's queue a test says.
What a worker hands over is delivered to the worker it names. Nothing sleeps; the clock moves
by hand.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest

from pytun.common import steering, wire
from pytun.common.device import HANDOFF_INITIATION, HANDOFF_PACKET, Device
from pytun.common.peer import REKEY_AFTER_TIME

from .enginenet import WALL0, ipv4, seeded_rng, static_key
from .test_steering import run_cbpf

HUB_INNER = "10.9.0.1"


class Laptop:
    def __init__(self, n: int, hub_public: bytes, clock):
        self.n = n
        private, self.public = static_key(f"laptop-{n}")
        self.inner = f"10.9.{1 + n // 250}.{1 + n % 250}"
        self.endpoint = (f"198.51.100.{1 + n % 250}", 40000 + n)
        self.device = Device(private, rng=seeded_rng(f"rng-laptop-{n}"),
                             wallclock=lambda: WALL0 + clock[0])
        self.device.add_peer(hub_public, allowed_ips=["0.0.0.0/0"],
                             endpoint=("203.0.113.1", 51820))
        self.received: list[bytes] = []


class WorkerHub:
    """n worker Devices, the laptops, and the network between them."""

    def __init__(self, workers: int, laptops: int, *, initiation_worker=None,
                 allow_peer_to_peer: bool = True):
        self.clock = [0.0]
        private, self.public = static_key("hub")
        self.n = workers
        self.program = steering.program(workers)
        self.workers = [Device(private, rng=seeded_rng(f"rng-hub-{i}"),
                               wallclock=lambda: WALL0 + self.clock[0], worker=(i, workers),
                               allow_peer_to_peer=allow_peer_to_peer)
                        for i in range(workers)]
        self.tun = [[] for _ in range(workers)]  # inner packets each worker wrote to the TUN
        self.arrived = Counter()  # worker -> datagrams the socket group gave it
        self.misplaced = 0  # transport datagrams that reached a worker without their session
        self.initiation_worker = initiation_worker or (lambda src: _stable_hash(src) % workers)
        self.laptops = [Laptop(i, self.public, self.clock) for i in range(laptops)]
        for laptop in self.laptops:
            self.add(laptop)

    @property
    def now(self) -> float:
        return self.clock[0]

    def owner(self, laptop: Laptop) -> int:
        return steering.owner_of(laptop.public, self.n)

    def add(self, laptop: Laptop) -> None:
        owner = self.owner(laptop)
        for i, device in enumerate(self.workers):
            if i == owner:
                device.add_peer(laptop.public, allowed_ips=[f"{laptop.inner}/32"],
                                name=f"laptop-{laptop.n}")
            else:
                device.add_foreign(owner, [f"{laptop.inner}/32"], f"laptop-{laptop.n}")

    # -- moving packets -------------------------------------------------------------------------

    def to_hub(self, datagram: bytes, src) -> None:
        worker = run_cbpf(self.program, datagram)
        if worker == steering.NO_CHOICE:
            worker = self.initiation_worker(src)
        self.arrived[worker] += 1
        device = self.workers[worker]
        if datagram[0] == wire.MSG_TRANSPORT:
            receiver = int.from_bytes(datagram[4:8], "little")
            if receiver not in device.keypairs:
                self.misplaced += 1
        device.receive(datagram, src, self.now)

    def tun_send(self, packet: bytes, queue: int) -> None:
        """The kernel hands `packet` to worker `queue`'s TUN queue."""
        self.workers[queue].send(packet, self.now)

    def deliver(self, rounds: int = 50) -> None:
        by_endpoint = {laptop.endpoint: laptop for laptop in self.laptops}
        for _ in range(rounds):
            moved = False
            for laptop in self.laptops:
                d = laptop.device
                out, d.net_out = d.net_out, []
                for datagram, _ in out:
                    moved = True
                    self.to_hub(bytes(datagram), laptop.endpoint)
                laptop.received += [bytes(p) for p in d.tun_out]
                d.tun_out.clear()
            for i, device in enumerate(self.workers):
                handed, device.handoff_out = device.handoff_out, []
                for worker, kind, data, src, state in handed:
                    moved = True
                    self.workers[worker].receive_handoff(kind, data, src, state, self.now)
                out, device.net_out = device.net_out, []
                for datagram, endpoint in out:
                    moved = True
                    laptop = by_endpoint.get(endpoint)
                    if laptop is not None:
                        laptop.device.receive(bytes(datagram), ("203.0.113.1", 51820), self.now)
                self.tun[i] += [bytes(p) for p in device.tun_out]
                device.tun_out.clear()
            if not moved:
                return
        raise AssertionError("the network did not settle")

    def connect_all(self) -> None:
        for laptop in self.laptops:
            laptop.device.send(ipv4(laptop.inner, HUB_INNER, b"hello"), self.now)
        self.deliver()

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds
        for laptop in self.laptops:
            laptop.device.tick(self.now)
        for device in self.workers:
            device.tick(self.now)
        self.deliver()

    def session_holder(self, laptop: Laptop) -> list[int]:
        return [i for i, d in enumerate(self.workers)
                if laptop.public in d.peers and d.peers[laptop.public].current is not None]


def _stable_hash(src) -> int:
    """The kernel's choice for an initiation: a hash of the source, the same in every run."""
    return int.from_bytes(hashlib.blake2s(repr(src).encode()).digest()[:4], "little")


def _laptops_for(hub_n: int, want: dict[int, int]):
    """Laptop numbers whose keys go to each worker, `want[worker]` of each."""
    found: dict[int, list[int]] = {w: [] for w in want}
    n = 0
    while any(len(found[w]) < k for w, k in want.items()):
        owner = steering.owner_of(static_key(f"laptop-{n}")[1], hub_n)
        if owner in found and len(found[owner]) < want[owner]:
            found[owner].append(n)
        n += 1
    return found


# ---------------------------------------------------------------------------------- tests


def test_owner_of_is_stable_and_in_range():
    key = static_key("x")[1]
    assert steering.owner_of(key, 1) == 0
    assert {steering.owner_of(key, 4) for _ in range(3)} == {steering.owner_of(key, 4)}
    assert steering.owner_of(key, 4) == int.from_bytes(key[:8], "little") % 4
    with pytest.raises(ValueError):
        steering.owner_of(key, 0)


def test_every_laptop_is_served_by_the_worker_that_owns_it():
    hub = WorkerHub(2, 20)
    hub.connect_all()
    for laptop in hub.laptops:
        assert hub.session_holder(laptop) == [hub.owner(laptop)], laptop.n
        assert ipv4(laptop.inner, HUB_INNER, b"hello") in hub.tun[hub.owner(laptop)]
    # Half the initiations landed on the other worker and were handed over, not answered there.
    handed = sum(d.handoffs["initiations_out"] for d in hub.workers)
    assert handed == sum(d.handoffs["initiations_in"] for d in hub.workers)
    assert 3 <= handed <= 17
    assert hub.misplaced == 0
    assert not any(d.drops for d in hub.workers), [d.drops for d in hub.workers]


@pytest.mark.parametrize("queue", [0, 1])
def test_a_tunnel_packet_read_by_any_worker_reaches_its_laptop(queue):
    hub = WorkerHub(2, 8)
    hub.connect_all()
    for laptop in hub.laptops:
        packet = ipv4(HUB_INNER, laptop.inner, b"to %d" % laptop.n)
        hub.tun_send(packet, queue)
        hub.deliver()
        assert laptop.received[-1] == packet
    others = [la for la in hub.laptops if hub.owner(la) != queue]
    assert others, "the keys must give both workers laptops"
    assert hub.workers[queue].handoffs["packets_out"] == len(others)
    assert hub.workers[1 - queue].handoffs["packets_in"] == len(others)


def test_a_replayed_initiation_is_refused_by_the_owner_wherever_it_lands():
    picks = iter([0, 1, 0, 1])
    hub = WorkerHub(2, 0, initiation_worker=lambda src: next(picks))
    n = _laptops_for(2, {0: 1})[0][0]
    laptop = Laptop(n, hub.public, hub.clock)
    hub.laptops.append(laptop)
    hub.add(laptop)
    laptop.device.send(ipv4(laptop.inner, HUB_INNER, b"x"), hub.now)
    captured = [bytes(d) for d, _ in laptop.device.net_out]
    assert captured[0][0] == wire.MSG_INITIATION
    hub.deliver()  # lands on worker 0, the owner
    assert hub.session_holder(laptop) == [0]
    hub.to_hub(captured[0], ("192.0.2.66", 6666))  # the attacker's copy lands on worker 1
    hub.deliver()
    assert hub.workers[1].handoffs["initiations_out"] == 1
    assert hub.workers[0].drops["replayed_initiation"] == 1
    assert hub.workers[0].peers[laptop.public].endpoint == laptop.endpoint  # not moved


def test_roaming_and_rekey_stay_on_the_owner():
    hub = WorkerHub(2, 6)
    hub.connect_all()
    laptop = hub.laptops[0]
    owner = hub.owner(laptop)
    laptop.endpoint = ("192.0.2.77", 50000)  # a new network: the same sessions, a new source
    laptop.device.send(ipv4(laptop.inner, HUB_INNER, b"moved"), hub.now)
    hub.deliver()
    assert hub.workers[owner].peers[laptop.public].endpoint == laptop.endpoint
    hub.tun_send(ipv4(HUB_INNER, laptop.inner, b"back"), 1 - owner)
    hub.deliver()
    assert laptop.received[-1] == ipv4(HUB_INNER, laptop.inner, b"back")
    before = {la.n: hub.workers[hub.owner(la)].peers[la.public].current.local_index
              for la in hub.laptops}
    for _ in range(int(REKEY_AFTER_TIME // 10) + 2):  # past REKEY_AFTER_TIME, with traffic
        hub.advance(10)
        for la in hub.laptops:
            la.device.send(ipv4(la.inner, HUB_INNER, b"tick"), hub.now)
        hub.deliver()
    for la in hub.laptops:
        now_index = hub.workers[hub.owner(la)].peers[la.public].current.local_index
        assert now_index != before[la.n], la.n  # a new session ...
        assert hub.session_holder(la) == [hub.owner(la)]  # ... at the owner only
    assert hub.misplaced == 0
    assert not any(d.drops for d in hub.workers), [d.drops for d in hub.workers]


def test_a_worker_calling_a_laptop_gets_the_response_steered_back():
    hub = WorkerHub(2, 4)
    for laptop in hub.laptops:  # the hub calls first (a restart's redial, a standby's takeover)
        device = hub.workers[hub.owner(laptop)]
        peer = device.peers[laptop.public]
        peer.endpoint = laptop.endpoint
        device.initiate(peer, hub.now)
    hub.deliver()
    for laptop in hub.laptops:
        assert hub.session_holder(laptop) == [hub.owner(laptop)]
    assert not any(d.drops for d in hub.workers)


def test_source_and_peer_to_peer_checks_see_the_other_workers_peers():
    found = _laptops_for(2, {0: 1, 1: 1})
    hub = WorkerHub(2, 0, allow_peer_to_peer=False)
    a = Laptop(found[0][0], hub.public, hub.clock)
    b = Laptop(found[1][0], hub.public, hub.clock)
    hub.laptops += [a, b]
    hub.add(a)
    hub.add(b)
    hub.connect_all()
    w0 = hub.workers[0]
    a.device.send(ipv4(b.inner, HUB_INNER, b"spoofed"), hub.now)  # b's address, from a
    a.device.send(ipv4(a.inner, b.inner, b"to b"), hub.now)  # a peer on the other worker
    hub.deliver()
    assert w0.drops["source_not_allowed"] == 1
    assert w0.drops["peer_to_peer"] == 1


def test_handoffs_to_a_standby_and_bad_ones_are_dropped_and_counted():
    hub = WorkerHub(2, 0)
    device = hub.workers[0]
    device.receive_handoff(HANDOFF_INITIATION, b"\x01" * 148, ("192.0.2.1", 1), b"short", 0.0)
    device.receive_handoff(HANDOFF_INITIATION, b"\x01" * 20, ("192.0.2.1", 1), bytes(96), 0.0)
    device.receive_handoff(HANDOFF_PACKET, ipv4("10.9.0.1", "10.9.9.9"), None, b"", 0.0)
    device.set_standby(True)
    device.receive_handoff(HANDOFF_PACKET, ipv4("10.9.0.1", "10.9.9.9"), None, b"", 0.0)
    assert device.drops == {"bad_handoff": 1, "bad_length": 1, "no_route": 1, "standby": 1}
    with pytest.raises(ValueError):
        device.add_foreign(0, ["10.9.9.9/32"])  # itself, not another worker


@pytest.mark.parametrize("workers", [2, 4])
def test_two_hundred_laptops_spread_over_the_workers(workers):
    """Balance: each worker's share of the datagrams with 200 laptops, each sending the same,
    and every transport datagram on the worker that holds its session."""
    rng = random.Random(7)
    hub = WorkerHub(workers, 200, initiation_worker=lambda src: rng.randrange(workers))
    hub.connect_all()
    hub.arrived.clear()
    for _ in range(5):
        for laptop in hub.laptops:
            laptop.device.send(ipv4(laptop.inner, HUB_INNER, b"data"), hub.now)
        hub.deliver()
    total = sum(hub.arrived.values())
    assert total == 200 * 5
    shares = [hub.arrived[w] / total for w in range(workers)]
    print(f"\n{workers} workers, 200 laptops: shares of datagrams "
          + ", ".join(f"{s:.1%}" for s in shares))
    mean = 1 / workers
    assert all(abs(s - mean) < 0.35 * mean for s in shares), shares
    assert hub.misplaced == 0
    owners = Counter(hub.owner(la) for la in hub.laptops)
    assert [hub.arrived[w] for w in range(workers)] == [owners[w] * 5 for w in range(workers)]
