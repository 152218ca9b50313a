"""The driver's I/O in the hub's production configuration, without root: UDP GSO runs and their
fallbacks (EINVAL: no offload; EMSGSIZE: a path MTU; EAGAIN: a full socket), replies from the
address a laptop dialled (IP_PKTINFO, on loopback's 127.0.0.0/8), and a TUN device with
IFF_VNET_HDR (a datagram socketpair stands in for it: every write is one packet).
"""

from __future__ import annotations

import errno
import os
import socket

import pytest

from pytun.common import driver as driver_module, tcpgro
from pytun.common.driver import Driver, open_udp


class FakeDevice:
    """What the driver needs of a Device: queues, drops and the two entry points."""

    def __init__(self):
        self.net_out, self.tun_out, self.events = [], [], []
        self.drops = {}
        self.sent, self.received = [], []

    def send(self, packet, now):
        self.sent.append(bytes(packet))

    def receive(self, data, src, now):
        self.received.append((bytes(data), src))


class Drops(dict):
    def __missing__(self, key):
        return 0


class FailingSocket:
    """Records each send; raises the queued errors first, in order."""

    family = socket.AF_INET6

    def __init__(self, errors=()):
        self.errors = list(errors)
        self.calls: list[tuple[str, int, int | None]] = []  # (call, datagrams, segment size)

    def _maybe_fail(self):
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error

    def sendto(self, datagram, endpoint):
        self._maybe_fail()
        self.calls.append(("sendto", 1, None))

    def sendmsg(self, buffers, cmsgs, flags, endpoint):
        self._maybe_fail()
        segment = next((int.from_bytes(d, "little") for lvl, kind, d in cmsgs
                        if kind == driver_module.UDP_SEGMENT), None)
        self.calls.append(("sendmsg", len(buffers), segment))

    def fileno(self):
        return -1


def driver_with(sock, **kw) -> tuple[Driver, FakeDevice]:
    device = FakeDevice()
    device.drops = Drops()
    d = Driver.__new__(Driver)  # the I/O methods only, no thread and no real TUN
    Driver.__init__(d, device, -1, sock, **kw)
    return d, device


EP = ("2001:db8::7", 51820, 0, 0)
OTHER = ("2001:db8::8", 51820, 0, 0)


def run_of(n: int, size: int = 1452, endpoint=EP, last: int | None = None) -> list:
    out = [(bytes(size), endpoint) for _ in range(n)]
    if last is not None:
        out.append((bytes(last), endpoint))
    return out


def test_runs_of_equal_datagrams_to_one_endpoint_go_out_as_one_gso_send():
    sock = FailingSocket()
    d, _ = driver_with(sock)
    out = run_of(70, 100) + run_of(3, 100, OTHER) + run_of(50) + run_of(2, 1452, EP, last=60)
    assert d._send_all(out) == []
    # 64 datagrams or 65,000 bytes at most per send (44 of 1,452); another endpoint starts a
    # new run; a shorter datagram ends one.
    assert sock.calls == [("sendmsg", 64, 100), ("sendmsg", 6, 100), ("sendmsg", 3, 100),
                          ("sendmsg", 44, 1452), ("sendmsg", 9, 1452)]
    assert d.io_errors == {}


def test_without_segmentation_offload_the_driver_sends_one_by_one_from_then_on():
    sock = FailingSocket([OSError(errno.EINVAL, "Invalid argument")])
    d, _ = driver_with(sock)
    assert d._send_all(run_of(3)) == []
    assert d.gso is False
    assert sock.calls == [("sendto", 1, None)] * 3
    sock.calls.clear()
    d._send_all(run_of(2))
    assert sock.calls == [("sendto", 1, None)] * 2 and d.io_errors == {}


def test_a_path_mtu_refusal_sends_that_endpoints_big_datagrams_one_by_one():
    sock = FailingSocket([OSError(errno.EMSGSIZE, "Message too long")])
    d, _ = driver_with(sock)
    assert d._send_all(run_of(4) + run_of(2, 100, OTHER)) == []
    assert sock.calls == [("sendto", 1, None)] * 4 + [("sendmsg", 2, 100)]
    assert d.gso is True and d._too_big == {EP: 1452}
    sock.calls.clear()
    d._send_all(run_of(2, 1000) + run_of(2, 1500))  # smaller ones still go as a run
    assert sock.calls == [("sendmsg", 2, 1000), ("sendto", 1, None), ("sendto", 1, None)]


def test_a_full_socket_keeps_what_is_left_in_order_and_nothing_is_lost():
    sock = FailingSocket([None, BlockingIOError()])
    d, device = driver_with(sock)
    out = run_of(2, 1452, EP) + run_of(2, 100, OTHER) + run_of(1, 60, EP)
    device.net_out = list(out)
    assert d.flush_nowait() is True  # some are left: the loop then waits for EPOLLOUT
    assert device.net_out == out[2:]
    assert sock.calls == [("sendmsg", 2, 1452)]
    assert d.flush_nowait() is False and device.net_out == []
    assert sock.calls[1:] == [("sendmsg", 2, 100), ("sendto", 1, None)]
    assert d.io_errors == {}


def test_any_other_send_error_is_counted_per_datagram():
    sock = FailingSocket([OSError(errno.ENETUNREACH, "Network is unreachable")])
    d, _ = driver_with(sock)
    assert d._send_all(run_of(3) + run_of(1, 90, OTHER)) == []
    assert d.io_errors == {"udp_send_error": 3}
    assert sock.calls == [("sendto", 1, None)]  # the next endpoint's datagram went out


def test_replies_leave_from_the_address_the_laptop_dialled():
    """A hub socket on the wildcard address; a laptop sends to 127.0.0.2: the reply must come
    from 127.0.0.2, not from the route's choice (127.0.0.1)."""
    hub_sock = open_udp(0)
    port = hub_sock.getsockname()[1]
    d, device = driver_with(hub_sock, sticky=True)
    laptop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    laptop.bind(("127.0.0.1", 0))
    laptop.settimeout(5)
    try:
        laptop.sendto(b"\x01hello", ("127.0.0.2", port))
        socket_ready(hub_sock)
        d._drain_udp(0.0)
        (data, src), = device.received
        assert data == b"\x01hello" and src[1] == laptop.getsockname()[1]
        device.net_out = [(b"reply", src)] * 3  # a run: GSO and the source together
        assert d.flush_nowait() is False
        for _ in range(3):
            reply, sender = laptop.recvfrom(100)
            assert reply == b"reply" and sender[0] == "127.0.0.2", sender
        assert d.io_errors == {}
    finally:
        hub_sock.close()
        laptop.close()


def socket_ready(sock, timeout: float = 5.0) -> None:
    import select
    assert select.select([sock], [], [], timeout)[0], "nothing arrived"


def tcp_segment(seq: int, payload: bytes) -> bytes:
    from tests.enginenet import ipv4
    import struct
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 1, 5 << 4, 0x10, 512, 0, 0) + payload
    packet = bytearray(ipv4("10.77.0.2", "10.77.0.1", tcp, proto=6))
    packet[6] |= 0x40  # DF, as TCP sets it
    return bytes(packet)


def test_a_vnet_hdr_tun_device_reads_past_the_header_and_gets_coalesced_writes():
    tun, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    try:
        sock = FailingSocket()
        device = FakeDevice()
        device.drops = Drops()
        d = Driver(device, tun.fileno(), sock, vnet_hdr=True)
        # Read: the kernel puts a virtio_net_hdr in front of every packet; the device must not
        # see it.
        packet = tcp_segment(1, b"x" * 200)
        far.send(bytes(tcpgro.VNET_HDR_LEN) + packet)
        d._drain_tun(0.0)
        assert device.sent == [packet]
        # Write: a run of one flow's segments becomes one GSO packet, a lone one goes plain.
        run = [tcp_segment(1 + 1000 * i, b"y" * 1000) for i in range(3)]
        device.tun_out = run + [b"\x45" + bytes(19)]
        d.flush_nowait_tun()
        merged = far.recv(65535)
        header = tcpgro._VNET.unpack(merged[:tcpgro.VNET_HDR_LEN])
        assert header[1] == tcpgro.VIRTIO_NET_HDR_GSO_TCPV4 and header[3] == 1000
        assert len(merged) == tcpgro.VNET_HDR_LEN + 40 + 3000
        assert far.recv(65535) == tcpgro.PLAIN + b"\x45" + bytes(19)
        assert d.io_errors == {}
    finally:
        tun.close()
        far.close()


def test_a_failed_tun_read_is_counted_not_raised():
    r, w = os.pipe()
    os.close(w)
    os.close(r)  # the number now names no open file: reads fail with EBADF
    device = FakeDevice()
    device.drops = Drops()
    d = Driver(device, r, FailingSocket())
    d._drain_tun(0.0)
    assert d.io_errors == {"tun_read_error": 1} and device.sent == []


@pytest.mark.parametrize("sticky", [False, True])
def test_a_gro_run_is_cut_back_into_its_datagrams(sticky):
    """Six datagrams sent as one GSO run over loopback arrive as one GRO read (the kernel's
    UDP_GRO control message names their size): the device gets them one by one, in order,
    the last one shorter."""
    hub_sock = open_udp(0)
    port = hub_sock.getsockname()[1]
    d, device = driver_with(hub_sock, sticky=sticky)
    laptop = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        run = [bytes([i]) * 1000 for i in range(5)] + [b"\xff" * 300]
        laptop.sendmsg(run, [(driver_module.SOL_UDP, driver_module.UDP_SEGMENT,
                              (1000).to_bytes(2, "little"))], 0, ("127.0.0.2", port))
        socket_ready(hub_sock)
        d._drain_udp(0.0)
        assert [data for data, _ in device.received] == run
        assert len({src for _, src in device.received}) == 1
        if sticky:  # and the replies still leave from the address the laptop dialled
            assert list(d._reply_from) == [device.received[0][1]]
    finally:
        hub_sock.close()
        laptop.close()


def test_a_device_link_closes_what_it_opened_even_when_the_link_cannot_be_configured():
    """common/runner.py: the TUN fd and socket are closed once, also after a failed start."""
    from pytun.common import linux
    from pytun.common.runner import DeviceLink

    opened = []

    def fake_open_tun(name, vnet_hdr=False):
        r, w = os.pipe()
        os.close(w)
        opened.append(r)
        return r, name

    def broken_configure(ifname, addresses, mtu):
        raise linux.LinuxError(f"cannot configure {ifname}")

    original = linux.open_tun
    linux.open_tun = fake_open_tun
    try:
        link = DeviceLink("pt9", [], 1420, configure=broken_configure)
        try:
            link.open_tun()
        except linux.LinuxError as exc:
            assert str(exc) == "cannot configure pt9"
        link.close()
        link.close()
    finally:
        linux.open_tun = original
    import errno as _errno
    with pytest.raises(OSError) as info:
        os.fstat(opened[0])
    assert info.value.errno == _errno.EBADF and link.tun_fd is None and link.sock is None


class RecordingSocket(FailingSocket):
    """Keeps what each send carried: (datagrams, segment size)."""

    def __init__(self):
        super().__init__()
        self.sent: list[tuple[list[bytes], int | None]] = []

    def sendto(self, datagram, endpoint):
        super().sendto(datagram, endpoint)
        self.sent.append(([bytes(datagram)], None))

    def sendmsg(self, buffers, cmsgs, flags, endpoint):
        super().sendmsg(buffers, cmsgs, flags, endpoint)
        self.sent.append(([bytes(b) for b in buffers], self.calls[-1][2]))


def test_a_gso_read_is_sealed_segment_by_segment_and_leaves_in_one_gso_send():
    """TUN offload on read: a 20-segment TCP packet from the kernel (virtio_net_hdr, checksum
    partial) reaches the engine as 20 ordinary packets; their datagrams to the one peer leave
    in one UDP GSO send, and the peer decrypts segments with valid checksums. A bad header in
    between is a counted drop, and the next read goes on."""
    from tests.enginenet import two, up
    from tests.test_tunoffload import TCP, check_segments, super_packet, vnet
    from pytun.common import tunoffload

    net, hub, laptop = two()
    up(net, hub, laptop)
    tun, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tun.setblocking(False)
    try:
        sock = RecordingSocket()
        d = Driver(hub.device, tun.fileno(), sock, vnet_hdr=True, tun_offload=True)
        inner = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))  # hub -> laptop
        big, l4_at = super_packet(4, TCP, bytes(range(250)) * 100, ip_id=7, addresses=inner)
        plain, _ = super_packet(4, TCP, b"ack", addresses=inner)
        plain = plain[:l4_at + 16] + b"\x12\x34" + plain[l4_at + 18:]  # not to be touched
        far.send(vnet(tunoffload.GSO_TCPV4, 1280, l4_at, TCP, hdr_len=len(big)) + big)
        far.send(vnet(0x42, 1280, l4_at, TCP) + big)  # an unknown GSO type
        far.send(bytes(tunoffload.VNET_HDR_LEN) + plain)  # no flags: goes as it is
        d._drain_tun_offload(net.now)
        assert d.flush_nowait() is False
        assert d.offload == {"gso_reads": 1, "gso_segments": 20}
        assert d.io_errors["tun_bad_offload"] == 1
        (run, size), (single, _) = sock.sent
        assert len(run) == 20 and size == len(run[0]) and sock.calls[0][0] == "sendmsg"
        for datagram in run + single:
            laptop.device.receive(datagram, hub.endpoint, net.now)
        *segments, last = [bytes(p) for p in laptop.device.tun_out]
        check_segments(segments, big, 4, TCP, l4_at, 1280)
        assert last == plain
    finally:
        tun.close()
        far.close()


def test_tun_offload_asks_for_uso_then_falls_back_to_tso_and_can_be_turned_off(monkeypatch):
    """USO needs Linux 6.2: an older kernel refuses the flags with EINVAL, and the TUN device
    gets TSO and checksum offload alone. Any other refusal leaves offload off. It is asked for
    only with PYTUN_TUN_OFFLOAD=1."""
    from pytun.common import linux, runner

    asked = []

    def ioctl(fd, request, flags):
        asked.append(flags)
        if flags & (linux.TUN_F_USO4 | linux.TUN_F_USO6):
            raise OSError(errno.EINVAL, "Invalid argument")
        return 0

    monkeypatch.setattr(linux.fcntl, "ioctl", ioctl)
    assert linux.set_tun_offload(5) == linux.TUN_OFFLOAD_TCP == 0x0F
    assert asked == [0x6F, 0x0F]
    monkeypatch.setattr(linux.fcntl, "ioctl", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOTTY, "Inappropriate ioctl for device")))
    assert linux.set_tun_offload(5) == 0
    assert runner.offload_wanted({}) is False
    assert runner.offload_wanted({"PYTUN_TUN_OFFLOAD": "1"}) is True
    with pytest.raises(runner.PytunError, match="PYTUN_TUN_OFFLOAD must be 0 or 1, not 'no'"):
        runner.offload_wanted({"PYTUN_TUN_OFFLOAD": "no"})
