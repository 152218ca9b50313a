"""The data-plane thread, without root: two Drivers over loopback UDP, each with a datagram
socketpair standing in for its TUN device.

Checks that packets cross in both directions, that a change made under `Driver.locked()` goes
out at once, that events reach the trio thread, that a failure in the data thread is raised in
trio, and that cancelling stops the thread.
"""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest
import trio

from pytun.common.device import Device
from pytun.common import cli, driver as driver_module
from pytun.common.driver import Driver, open_udp
from tests.enginenet import ipv4, static_key

A_INNER, B_INNER = "10.66.0.1", "10.66.0.2"


class End:
    """A Device, its Driver and the far side of its stand-in TUN device."""

    def __init__(self, seed: str):
        private, self.public = static_key(seed)
        self.device = Device(private)
        self.sock = open_udp(0)
        self.port = self.sock.getsockname()[1]
        self.tun, self.tun_far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tun.setblocking(False)
        self.events: list[tuple[str, str]] = []  # (kind, name of the thread it arrived in)
        self.driver = Driver(self.device, self.tun.fileno(), self.sock, on_event=self.on_event)

    def on_event(self, kind, peer, detail) -> None:
        self.events.append((kind, threading.current_thread().name))

    def close(self) -> None:
        for s in (self.sock, self.tun, self.tun_far):
            s.close()


@pytest.fixture
def ends():
    a, b = End("driver-a"), End("driver-b")
    a.peer = a.device.add_peer(b.public, allowed_ips=[f"{B_INNER}/32"],
                               endpoint=("::1", b.port, 0, 0), name="b")
    b.peer = b.device.add_peer(a.public, allowed_ips=[f"{A_INNER}/32"], name="a")
    yield a, b
    a.close()
    b.close()


async def read_far(end: End, timeout: float = 5.0) -> bytes:
    """The next packet the Driver wrote to its TUN device."""
    with trio.fail_after(timeout):
        await trio.lowlevel.wait_readable(end.tun_far)
    return end.tun_far.recv(65535)


def test_packets_cross_both_ways_and_events_reach_trio(ends):
    a, b = ends
    out = ipv4(A_INNER, B_INNER, b"hello through the thread")
    back = ipv4(B_INNER, A_INNER, b"and back")

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(a.driver.run)
            await nursery.start(b.driver.run)
            a.tun_far.send(out)  # no session yet: this starts the handshake
            assert await read_far(b) == out
            b.tun_far.send(back)
            assert await read_far(a) == back
            nursery.cancel_scope.cancel()

    trio.run(main)
    main_thread = threading.main_thread().name
    assert ("handshake", main_thread) in a.events and ("handshake", main_thread) in b.events
    assert a.device.drops == {} and b.device.drops == {}


def test_a_change_under_locked_goes_out_at_once(ends, monkeypatch):
    a, b = ends
    monkeypatch.setattr(driver_module, "LONGEST_SLEEP", 60.0)
    listener = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    listener.bind(("::1", 0))
    a.peer.endpoint = ("::1", listener.getsockname()[1], 0, 0)
    a.driver.tick_interval = 60.0  # no timer wakes the thread during the test

    def junk_counted() -> bool:
        with a.driver.locked() as device:
            return device.drops["bad_type"] == 1

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(a.driver.run)
            listener.sendto(b"\x09junk", ("::1", a.port))
            with trio.fail_after(5):
                while not junk_counted():  # the thread has run and gone back to waiting
                    await trio.sleep(0.001)
            with a.driver.locked() as device:
                device.initiate(a.peer, a.driver.now())
            with trio.fail_after(5):
                await trio.lowlevel.wait_readable(listener)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
        datagram = listener.recv(2048)
    finally:
        listener.close()
    assert datagram[0] == 1 and len(datagram) == 148  # a handshake initiation


def test_a_failure_in_the_data_thread_is_raised_in_trio(ends):
    a, b = ends

    def broken(data, src, now):
        raise RuntimeError("engine bug")

    a.device.receive = broken

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(a.driver.run)
            b.sock.sendto(b"\x04" + bytes(40), ("::1", a.port))

    # The error leaves the nursery in a group of one (strict exception groups, as the hub and
    # the client run trio); common.cli turns such a group back into its one error.
    with pytest.raises(BaseExceptionGroup) as info:
        trio.run(main, strict_exception_groups=True)
    error = cli.sole_error(info.value)
    assert isinstance(error, RuntimeError) and str(error) == "engine bug"
    assert not any(t.name == "pytun-data" for t in threading.enumerate())


def test_cancelling_stops_the_thread_and_releases_its_wakeup_fd(ends):
    a, _ = ends
    before = set(os.listdir("/proc/self/fd"))

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(a.driver.run)
            assert any(t.name == "pytun-data" for t in threading.enumerate())
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert not any(t.name == "pytun-data" for t in threading.enumerate())
    assert set(os.listdir("/proc/self/fd")) - before == set()
    with a.driver.locked():  # still usable, with nothing to wake
        pass
    assert select.select([a.tun_far], [], [], 0)[0] == []
