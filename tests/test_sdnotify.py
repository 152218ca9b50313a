"""systemd's notify protocol and the watchdog kept alive by the data-plane thread."""

from __future__ import annotations

import os
import socket
import time

import trio

from pytun.common.device import Device
from pytun.common.driver import Driver, open_udp
from pytun.common.sdnotify import Notifier
from tests.enginenet import static_key


def _listener(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s, path


def test_notify_sends_to_the_socket_and_reads_the_watchdog_settings(tmp_path):
    s, path = _listener(tmp_path)
    n = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval == 2.0
    assert n.notify("READY=1", "STATUS=2 peers")
    assert s.recv(100) == b"READY=1\nSTATUS=2 peers"
    n.close()
    s.close()
    other = Notifier.from_environment({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000",
                                       "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval is None  # the watchdog is another process's
    assert not Notifier.from_environment({}).notify("READY=1")


def test_the_data_thread_pings_and_stops_when_wedged():
    """Pings come from the data-plane loop: holding its lock (a wedged loop) stops them,
    while the trio side keeps running."""
    beats: list[float] = []
    device = Device(static_key("wd")[0])
    sock = open_udp(0)
    tun, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    driver = Driver(device, tun.fileno(), sock)
    driver.heartbeat = lambda: beats.append(time.monotonic())
    driver.heartbeat_interval = 0.1

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(driver.run)
            with trio.fail_after(5):
                while len(beats) < 5:
                    await trio.sleep(0.02)
            driver.lock.acquire()  # the data thread blocks on its next `with lock:`
            try:
                await trio.sleep(0.3)
                wedged_at = len(beats)
                await trio.sleep(1.0)
                during = len(beats) - wedged_at
            finally:
                driver.lock.release()
            with trio.fail_after(5):
                while len(beats) < wedged_at + during + 3:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
            return during

    try:
        during = trio.run(main)
    finally:
        for s in (sock, tun, far):
            s.close()
    assert during == 0
    gaps = [b - a for a, b in zip(beats, beats[1:5])]
    assert all(0.09 <= g < 1.0 for g in gaps), gaps  # no faster than the interval
