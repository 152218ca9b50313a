"""The driver's sends when the path MTU to an endpoint is below its datagrams.

After ICMP "fragmentation needed" the kernel knows a smaller path MTU for that destination. It
still fragments a single datagram that is too big (the UDP socket's default IP_PMTUDISC_WANT),
but refuses a UDP GSO run of them with EMSGSIZE. Those runs must go out one by one, or every
burst (a TCP transfer through the tunnel) is lost: a black hole. The namespace test with a
1300-byte hop is in test_client_netns.py; here a fake socket plays the kernel.
"""

from __future__ import annotations

import errno
from collections import Counter
from types import SimpleNamespace

from pytun.common.driver import Driver

HUB = ("::ffff:198.51.100.130", 51820)
OTHER = ("::ffff:198.51.100.140", 51820)


class PathMtuSocket:
    """sendmsg with several buffers (a GSO run) fails with EMSGSIZE for datagrams above the
    path MTU of their destination; single datagrams always go (the kernel fragments them)."""

    def __init__(self, path_mtu: dict):
        self.path_mtu = path_mtu
        self.sent: list[tuple[int, tuple]] = []  # (datagram size, destination)
        self.calls = Counter()

    def sendto(self, datagram, endpoint):
        self.calls["sendto"] += 1
        self.sent.append((len(datagram), endpoint))

    def sendmsg(self, buffers, cmsg, flags, endpoint):
        self.calls["sendmsg"] += 1
        sizes = [len(b) for b in buffers]
        if len(buffers) > 1 and max(sizes) + 28 > self.path_mtu.get(endpoint, 1500):
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent += [(size, endpoint) for size in sizes]


def driver(sock) -> Driver:
    return Driver(SimpleNamespace(drops=Counter()), -1, sock)


def test_a_run_the_path_mtu_refuses_goes_out_one_by_one_and_nothing_is_lost():
    sock = PathMtuSocket({HUB: 1300})
    d = driver(sock)
    burst = [(bytes(1452), HUB)] * 10 + [(bytes(1452), OTHER)] * 10
    assert d._send_all(list(burst)) == []
    assert sock.sent == [(1452, HUB)] * 10 + [(1452, OTHER)] * 10  # all of them, in order
    assert d.io_errors["udp_send_error"] == 0
    # One refused run to the hub, then 10 single sends; the other endpoint keeps GSO.
    assert sock.calls == {"sendmsg": 2, "sendto": 10}
    assert d.gso  # segmentation stays on for everyone else

    sock.sent.clear()
    sock.calls.clear()
    assert d._send_all(list(burst)) == []
    assert sock.calls == {"sendmsg": 1, "sendto": 10}  # no refused run a second time
    assert len(sock.sent) == 20


def test_smaller_datagrams_to_that_endpoint_still_go_segmented():
    sock = PathMtuSocket({HUB: 1300})
    d = driver(sock)
    d._send_all([(bytes(1452), HUB)] * 4)
    sock.calls.clear()
    assert d._send_all([(bytes(1200), HUB)] * 4) == []
    assert sock.calls == {"sendmsg": 1}
