"""Steering by receiver index (common/steering.py): the classic BPF program run by a slow
reference interpreter against the wire format, and by the kernel on a real SO_REUSEPORT group."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common import steering, wire

from .netns import topology  # noqa: F401 (fixture)

PY = sys.executable


def run_cbpf(insns, packet: bytes) -> int:
    """A classic BPF interpreter for the instructions program() uses (the kernel's semantics:
    a load beyond the packet ends the program with 0)."""
    a, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == steering.BPF_LD_B_ABS:
            if k >= len(packet):
                return 0
            a = packet[k]
        elif code == steering.BPF_ALU_MOD_K:
            a %= k
        elif code == steering.BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == steering.BPF_RET_A:
            return a
        elif code == steering.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


def expected_worker(packet: bytes, workers: int) -> int:
    """What the program must answer, read with the wire format's own offsets."""
    if len(packet) < 1:
        return 0
    kind = packet[0]
    if kind in (wire.MSG_TRANSPORT, wire.MSG_COOKIE_REPLY):
        offset = 4
    elif kind == wire.MSG_RESPONSE:
        offset = 8
    else:
        return steering.NO_CHOICE
    if len(packet) < offset + 4:
        return 0 if len(packet) <= offset else (packet[offset] % workers)
    receiver = struct.unpack_from("<I", packet, offset)[0]
    return (receiver & 0xFF) % workers


def test_the_program_picks_by_the_receiver_index_of_each_message():
    insns = steering.program(3)
    transport = struct.pack("<II", 4, 0x11223305) + bytes(24)
    response = struct.pack("<III", 2, 0xAAAAAA01, 0x11223307) + bytes(80)
    cookie = struct.pack("<II", 3, 0x11223309) + bytes(56)
    initiation = struct.pack("<II", 1, 0x11223300) + bytes(140)
    assert run_cbpf(insns, transport) == 5 % 3
    assert run_cbpf(insns, response) == 7 % 3  # the receiver, not the sender at offset 4
    assert run_cbpf(insns, cookie) == 9 % 3
    assert run_cbpf(insns, initiation) == steering.NO_CHOICE
    assert run_cbpf(insns, b"\x04\x00") == 0  # too short to load: the kernel's 0


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 16), st.binary(max_size=40),
       st.sampled_from([1, 2, 3, 4, 5, 0xFF]))
def test_the_program_agrees_with_the_wire_format(workers, tail, kind):
    packet = bytes([kind]) + tail
    assert run_cbpf(steering.program(workers), packet) == expected_worker(packet, workers)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.data())
def test_an_index_made_for_a_worker_is_steered_to_it(raw, data):
    workers = data.draw(st.integers(1, steering.MAX_WORKERS))
    worker = data.draw(st.integers(0, workers - 1))
    index = steering.index_for_worker(raw, worker, workers)
    assert 0 <= index < 2**32 and index >> 8 == raw >> 8  # only the low byte is chosen
    packet = struct.pack("<II", wire.MSG_TRANSPORT, index) + bytes(16)
    assert run_cbpf(steering.program(workers), packet) == worker


def test_indexes_for_a_worker_use_every_low_byte_it_owns():
    lows = {steering.index_for_worker(raw, 1, 3) & 0xFF for raw in range(256)}
    assert lows == set(range(1, 256, 3))


def test_worker_counts_out_of_range_are_refused():
    for bad in (0, steering.MAX_WORKERS + 1):
        with pytest.raises(ValueError):
            steering.program(bad)
    with pytest.raises(ValueError):
        steering.index_for_worker(0, 3, 3)


# In a namespace of its own: WORKERS sockets on one port (SO_REUSEPORT, UDP GRO on, as the
# driver sets it), the program attached, then datagrams of every kind from another socket.
# Prints, per datagram sent, the number of the socket that received it.
KERNEL_CHECK = r"""
import json, random, select, socket, struct, sys
from pytun.common import steering
workers, count = int(sys.argv[1]), int(sys.argv[2])
socks = []
for _ in range(workers):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(17, 104, 1)  # UDP_GRO
    s.bind(("::", 51820))
    socks.append(s)
steering.attach(socks[0], workers)
rng = random.Random(5)
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, got = [], []
for i in range(count):
    worker = rng.randrange(workers)
    index = steering.index_for_worker(rng.getrandbits(32), worker, workers)
    kind = (4, 3, 2)[i % 3]
    if kind == 2:
        msg = struct.pack("<III", 2, rng.getrandbits(32), index) + bytes(80)
    else:
        msg = struct.pack("<II", kind, index) + bytes(40)
    sender.sendto(msg, ("127.0.0.1", 51820))
    ready, _, _ = select.select(socks, [], [], 5)
    assert len(ready) == 1, ready
    data = ready[0].recv(2000)
    assert data == msg
    sent.append(worker)
    got.append(socks.index(ready[0]))
print(json.dumps({"sent": sent, "got": got}))
"""


@pytest.mark.netns
@pytest.mark.parametrize("workers", [2, 3])
def test_the_kernel_steers_each_datagram_to_the_socket_of_its_worker(topology, workers):
    ns = topology.netns("steer")
    ns.run("ip", "link", "set", "lo", "up")
    done = ns.run([PY, "-c", KERNEL_CHECK, str(workers), "60"], timeout=60)
    result = json.loads(done.stdout)
    assert result["got"] == result["sent"]
    assert set(result["got"]) == set(range(workers))  # every worker was reached



def test_a_worker_device_hands_out_only_indexes_steered_to_it():
    """Every datagram the laptop sends to hub worker 2 of 3 (response, data, and the data
    after many handshakes) carries a receiver index the program steers to worker 2."""
    from tests.enginenet import Net

    net = Net()
    hub = net.node("hub", "192.0.2.1", "10.0.0.1", worker=(2, 3))
    laptop = net.node("lap", "192.0.2.2", "10.0.0.2")
    net.link(laptop, hub)
    insns = steering.program(3)
    for _ in range(20):
        hub.device.send(hub.packet_to(laptop, b"from the hub"), net.now)  # hub initiates
        laptop.device.send(laptop.packet_to(hub, b"to the hub"), net.now)
        net.deliver()
        net.clock.now += 200  # past REJECT_AFTER_TIME: the next packet needs a new handshake
    to_hub = [s.datagram for s in net.sent_by("lap") if s.type != wire.MSG_INITIATION]
    assert len(to_hub) >= 40
    assert {run_cbpf(insns, bytes(d)) for d in to_hub} == {2}
    assert laptop.received and hub.received


def test_a_device_refuses_a_worker_outside_its_group():
    from pytun.common.device import Device
    with pytest.raises(ValueError):
        Device(bytes(32), worker=(3, 3))
