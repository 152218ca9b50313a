"""The data plane shared by hub and client: UDP socket, TUN device, timer tick.

A thread of its own waits for readiness once, then drains each ready file descriptor with
non-blocking calls until it is empty (or a batch is full), hands every packet to the sans-IO
Device, and carries out what the Device asked for. The rest of the program (control socket,
registry, name lookups) stays in trio and reaches the device through `Driver.locked()`.
A thread rather than a trio task, because a trio wake-up costs more CPU than the packet it
serves at moderate rates, and adds latency to every round trip.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterator

import trio

from . import linux, tcpgro, tunoffload
from .endpoint import Endpoint as UdpEndpoint
from .device import HANDOFF_PACKET
from .peer import Endpoint, Event, Packet, Peer

if TYPE_CHECKING:
    from .device import Device

EventHandler = Callable[[Event, Peer, Any], None]

log = logging.getLogger("pytun")
_NATIVE = sys.byteorder

BATCH = 256
TICK = 0.1  # with many peers' timers armed, check them all this often
LONGEST_SLEEP = 5.0  # with none due sooner (the rate limiter's tidy-up runs at tick too)
MAX_PACKET = 65535
TUN_READ = tunoffload.VNET_HDR_LEN + MAX_PACKET + 1  # + 1: a longer packet shows as bad
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
IP_PKTINFO = 8
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
ANCILLARY = 128  # room for IP_PKTINFO (or IPV6_PKTINFO) and UDP_GRO
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_PACKET_BYTE = bytes([HANDOFF_PACKET])
_NO_GSO_ERRNOS = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
MAX_STICKY = 1 << 16
HANDOFF_HEADROOM = 512  # room for an initiation's source, local address and state
_HANDOFF_HDR = struct.Struct("=BBH")  # kind, local-address length, source length


class Handoff:
    """The sockets one worker hands packets and initiations over with: `inbox` to read,
    `outboxes[i]` to write to worker i (None for itself). Unix datagram sockets, non-blocking:
    what does not fit is dropped and counted (handoff_full), like a full UDP socket."""

    def __init__(self, inbox: socket.socket, outboxes: list[socket.socket | None]):
        self.inbox = inbox
        self.outboxes = outboxes
        for s in (inbox, *outboxes):
            if s is not None:
                s.setblocking(False)


def encode_source(src: Endpoint) -> bytes:
    return "\n".join(str(part) for part in src).encode()


def decode_source(data: bytes) -> Endpoint:
    parts = data.decode().split("\n")
    return (parts[0], *(int(p) for p in parts[1:]))


def open_udp(port: int = 0, *, mark: int = 0, reuse_port: bool = False) -> socket.socket:
    """One non-blocking UDP socket for IPv4 and IPv6 (dual stack, IPv4-only if v6 is off).
    With `reuse_port`, one of a group on the same port (a worker's, see steering.py)."""
    try:
        sock = _bound(socket.AF_INET6, ("::", port), reuse_port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"UDP port {port} is already in use") from None
        sock = _bound(socket.AF_INET, ("0.0.0.0", port), reuse_port)  # no IPv6 on this host
    # Room for bursts: the FORCE variants (CAP_NET_ADMIN) may exceed net.core.[rw]mem_max,
    # which is 208 KiB (about 140 full datagrams) on a stock kernel.
    for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass
    if mark:
        linux.set_socket_mark(sock, mark)
    # UDP GRO: the kernel may hand over a run of one sender's datagrams in one read, with
    # their size in a control message (Linux 5.0+); the driver cuts them apart again.
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        pass
    sock.setblocking(False)
    return sock


def _bound(family: int, address: tuple[Any, ...], reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"UDP port {address[1]} is already in use") from None
        raise
    return sock


def endpoint_for(sock: socket.socket, host: str, port: int) -> Endpoint:
    """The socket address to send to `host:port` from `sock` (IPv4 mapped on a v6 socket)."""
    return UdpEndpoint(host, port).sockaddr(sock.family)


def format_endpoint(endpoint: Endpoint | None) -> str:
    """'192.0.2.1:51820' or '[2001:db8::1]:51820' for a socket address, '' for None."""
    return "" if endpoint is None else str(UdpEndpoint.from_sockaddr(endpoint))


def _reply_cmsg(level: int, kind: int, data: bytes) -> list[tuple[int, int, bytes]]:
    """The control message that makes a reply leave from the address the request came to."""
    if kind == IP_PKTINFO:
        # struct in_pktinfo {ifindex; spec_dst; addr}: send from the received header address.
        return [(level, kind, struct.pack("=I4s4s", 0, data[8:12], bytes(4)))]
    return [(level, kind, data[:16] + bytes(4))]  # struct in6_pktinfo {addr; ifindex = any}


class Driver:
    """Runs a Device over a TUN file descriptor and a UDP socket.

    With `sticky`, replies to an endpoint leave from the local address its datagrams came to
    (IP_PKTINFO), as kernel WireGuard does: a host with several addresses otherwise answers
    from whichever one the route picks, and a NAT in front of the laptop drops those answers.
    """

    def __init__(self, device: Device, tun_fd: int, sock: socket.socket, *,
                 on_event: EventHandler | None = None, sticky: bool = False, gso: bool = True,
                 vnet_hdr: bool = False, tun_offload: bool = False,
                 handoff: Handoff | None = None):
        self.device = device
        self.tun_fd = tun_fd
        self.sock = sock
        self.on_event = on_event
        self.tick_interval = TICK  # seconds between timer checks with many peers armed
        self.lock = threading.Lock()  # held by the data thread while it works on the device
        self._wake = -1  # eventfd that wakes the data thread, while it runs
        self._stopping = False
        self._token: trio.lowlevel.TrioToken | None = None
        # Events waiting for the trio thread: the latest of each kind per peer, so a laptop
        # that sends from a new source port with every datagram queues one entry, not one each.
        self._pending_events: dict[tuple[Event, Peer], Any] = {}  # (kind, peer) -> detail
        self._events_lock = threading.Lock()
        self.io_errors = device.drops  # count I/O failures beside protocol drops
        self.sticky = sticky
        self.gso = gso
        self.vnet_hdr = vnet_hdr  # the TUN fd was opened with IFF_VNET_HDR (see tcpgro.py)
        # TUNSETOFFLOAD took: reads may be large GSO packets, cut up by tunoffload.split in a
        # buffer of their own. Counted in `offload`: reads that were GSO packets, and the
        # segments they made.
        self.tun_offload = tun_offload and vnet_hdr
        self.offload: Counter[str] = Counter()
        self._tun_buf = bytearray(TUN_READ if self.tun_offload else 0)
        # Called from the data thread's loop at most every `heartbeat_interval` seconds (the
        # systemd watchdog ping): a wedged loop stops calling it.
        self.heartbeat: Callable[[], None] | None = None
        self.heartbeat_interval = 0.0
        # endpoint -> control message naming our source address
        self._reply_from: dict[Endpoint, list[tuple[int, int, bytes]]] = {}
        self._seen_local: dict[Endpoint, bytes] = {}  # endpoint -> raw pktinfo last seen
        self._too_big: dict[Endpoint, int] = {}  # endpoint -> smallest size its path refused
        self._buf = bytearray(MAX_PACKET)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)
        self._drain_udp = self._drain_udp_sticky if sticky else self._drain_udp_plain
        # One of several workers (Device.handoff_out): a datagram socket this worker reads what
        # the others hand it from, and one to write to each other worker (None: this one).
        self.handoff = handoff
        self._hbuf = bytearray(MAX_PACKET + HANDOFF_HEADROOM if handoff is not None else 0)
        if sticky:
            if sock.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)

    # -- where datagrams leave from -------------------------------------------------------------

    def send_from(self, endpoints: list[Endpoint], address: str) -> int:
        """Datagrams to these endpoints leave from local `address` (a hub's service address,
        which it may hold only now) until one arrives from them, which sets the address it came
        to. Endpoints of the other family are left to the route. Call with the lock held.
        Returns how many endpoints were set."""
        ip = ipaddress.ip_address(address)
        v6 = self.sock.family == socket.AF_INET6
        if not v6 and ip.version == 6:
            return 0
        # The control message a datagram received at `address` would have made (_reply_cmsg).
        if v6:
            as_v6 = bytes(10) + b"\xff\xff" + ip.packed if ip.version == 4 else ip.packed
            cmsg = _reply_cmsg(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, as_v6)
        else:
            cmsg = _reply_cmsg(socket.IPPROTO_IP, IP_PKTINFO, bytes(8) + ip.packed)
        n = 0
        for endpoint in endpoints:
            host = str(endpoint[0])
            mapped = host.startswith("::ffff:") and "." in host
            if (ip.version == 4) != (mapped or ":" not in host):
                continue
            self._seen_local.pop(endpoint, None)
            self._reply_from[endpoint] = cmsg
            n += 1
        return n

    def forget_sources(self) -> None:
        """Forget every endpoint's source address (a hub that gave up its service address).
        Call with the lock held."""
        self._seen_local.clear()
        self._reply_from.clear()

    # -- the data-plane thread -------------------------------------------------------------------

    def now(self) -> float:
        """The clock the device runs on (monotonic seconds), for callers outside the thread."""
        return time.monotonic()

    @contextlib.contextmanager
    def locked(self) -> Iterator[Device]:
        """Hold the device for a change or a consistent read, then let the data plane carry out
        whatever the change asked for (an initiation, say) at once."""
        with self.lock:
            yield self.device
        self.kick()

    def kick(self) -> None:
        if self._wake < 0:
            return  # not running: the change is carried out when the thread starts
        try:
            os.eventfd_write(self._wake, 1)
        except (BlockingIOError, OSError):
            pass  # the counter is full or closed: the thread wakes anyway or is gone

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the data plane in its own thread until cancelled; a failure there is raised here."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._thread_main, args=(token, done, failure),
                                  name="pytun-data", daemon=True)
        self._token = token
        self._stopping = False
        self._wake = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # 1: flush what is queued
        thread.start()
        task_status.started()
        try:
            await done.wait()
            if failure:
                raise failure[0]
        finally:
            self._stopping = True
            self.kick()
            with trio.CancelScope(shield=True):
                await done.wait()
            os.close(self._wake)
            self._wake = -1

    def _thread_main(self, token: trio.lowlevel.TrioToken, done: trio.Event,
                     failure: list[BaseException]) -> None:
        try:
            self._loop()
        except BaseException as exc:  # reported to the trio side, which re-raises it
            failure.append(exc)
        finally:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

    # One thread waits on a level-triggered epoll for the UDP socket, the TUN device and a
    # wake-up eventfd, with the next timer check as its timeout (Device.next_wakeup: an idle
    # laptop sleeps until its next keepalive or rekey, a busy hub checks every TICK). Each
    # wake-up drains the ready descriptor with non-blocking calls, carries out the results, then
    # drains the other one without waiting: a packet written to the TUN device often makes the
    # kernel answer at once (a TCP ACK), and picking that up now saves a wakeup, which costs
    # several times what the packet itself does.
    # The trio side (control socket, registry) changes the device only under `self.lock`.

    def _loop(self) -> None:
        sock_fd, tun_fd, wake = self.sock.fileno(), self.tun_fd, self._wake
        lock, device, monotonic = self.lock, self.device, time.monotonic
        drain_udp = self._drain_udp
        drain_tun = self._drain_tun_offload if self.tun_offload else self._drain_tun
        flush_tun, flush_nowait = self.flush_nowait_tun, self.flush_nowait
        inbox = self.handoff.inbox.fileno() if self.handoff is not None else -1
        ep = select.epoll()
        try:
            ep.register(sock_fd, select.EPOLLIN)
            ep.register(tun_fd, select.EPOLLIN)
            ep.register(wake, select.EPOLLIN)
            if inbox >= 0:
                ep.register(inbox, select.EPOLLIN)
            poll = ep.poll
            blocked = False  # datagrams wait for room in the socket: TUN reads pause
            tick, next_wakeup = self.tick_interval, device.next_wakeup
            next_tick = monotonic() + tick
            heartbeat, beat_every = self.heartbeat, self.heartbeat_interval
            next_beat = monotonic() if heartbeat is not None else float("inf")
            while not self._stopping:
                if heartbeat is not None and monotonic() >= next_beat:
                    heartbeat()
                    next_beat = monotonic() + beat_every
                timeout = min(next_tick, next_beat) - monotonic()
                events = poll(timeout if timeout > 0 else 0)
                now = monotonic()
                udp = tun = handed = False
                for fd, _ in events:
                    if fd == sock_fd:
                        udp = True
                    elif fd == tun_fd:
                        tun = True
                    elif fd == inbox:
                        handed = True
                    else:
                        try:
                            os.eventfd_read(wake)
                        except BlockingIOError:
                            pass
                with lock:
                    if handed:
                        self._drain_handoff(now)
                    if udp:
                        drain_udp(now)
                        flush_tun()
                        if not blocked:
                            drain_tun(now)
                    elif tun:
                        drain_tun(now)
                        if not flush_nowait():
                            drain_udp(now)
                    if now >= next_tick:
                        device.tick(now)
                        next_tick = next_wakeup(now, tick, LONGEST_SLEEP)
                    else:  # packets may have armed a timer that is due sooner
                        next_tick = min(next_tick, next_wakeup(now, tick, LONGEST_SLEEP))
                    left = flush_nowait()
                if left != blocked:
                    blocked = left
                    ep.modify(sock_fd, select.EPOLLIN | select.EPOLLOUT if left
                              else select.EPOLLIN)
                    ep.modify(tun_fd, 0 if left else select.EPOLLIN)
        finally:
            ep.close()

    def _drain_udp_plain(self, now: float) -> None:
        recvmsg_into, receive, bufs, view = (self.sock.recvmsg_into, self.device.receive,
                                             self._bufs, self._view)
        for _ in range(BATCH):
            try:
                n, anc, _, addr = recvmsg_into(bufs, ANCILLARY)
            except BlockingIOError:
                return
            except OSError:
                self.io_errors["udp_recv_error"] += 1  # e.g. ICMP port unreachable
                continue
            if anc:  # UDP_GRO: a run of datagrams of one size (the last may be shorter)
                size = int.from_bytes(anc[0][2], _NATIVE)
                for start in range(0, n, size):
                    receive(view[start:min(start + size, n)], addr, now)
                continue
            receive(view[:n], addr, now)

    def _drain_udp_sticky(self, now: float) -> None:
        recvmsg_into, receive, bufs, view = (self.sock.recvmsg_into, self.device.receive,
                                             self._bufs, self._view)
        seen, reply_from = self._seen_local, self._reply_from
        for _ in range(BATCH):
            try:
                n, anc, _, addr = recvmsg_into(bufs, ANCILLARY)
            except BlockingIOError:
                return
            except OSError:
                self.io_errors["udp_recv_error"] += 1
                continue
            size = 0
            for level, kind, data in anc:
                if level == SOL_UDP:
                    size = int.from_bytes(data, _NATIVE)
                elif seen.get(addr) != data:
                    if len(seen) >= MAX_STICKY:  # bounded: junk sources cannot grow it
                        seen.clear()
                        reply_from.clear()
                    seen[addr] = data
                    reply_from[addr] = _reply_cmsg(level, kind, data)
            if size:  # UDP_GRO: a run of datagrams of one size (the last may be shorter)
                for start in range(0, n, size):
                    receive(view[start:min(start + size, n)], addr, now)
                continue
            receive(view[:n], addr, now)

    def _drain_tun(self, now: float) -> None:
        read, fd, send = os.read, self.tun_fd, self.device.send
        skip = tcpgro.VNET_HDR_LEN if self.vnet_hdr else 0
        for _ in range(BATCH):
            try:
                packet = read(fd, MAX_PACKET)
            except BlockingIOError:
                return
            except OSError:
                self.io_errors["tun_read_error"] += 1
                return
            send(memoryview(packet)[skip:] if skip else packet, now)

    def _drain_tun_offload(self, now: float) -> None:
        """Read into one buffer; a GSO packet becomes its segments, each handed to the device
        as an ordinary IP packet (it seals or copies it before the next one is built). A batch
        counts segments, so a drain leaves at most about BATCH datagrams to send."""
        readv, fd, send, split = os.readv, self.tun_fd, self.device.send, tunoffload.split
        buf = self._tun_buf
        bufs, view = [buf], memoryview(buf)
        offload = self.offload
        skip = tunoffload.VNET_HDR_LEN
        budget = BATCH
        while budget > 0:
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                return
            except OSError:
                self.io_errors["tun_read_error"] += 1
                return
            flags, gso = buf[0], buf[1]
            if not flags and not gso and skip < n < TUN_READ:  # no checksum to fill, no GSO
                send(view[skip:n], now)
                budget -= 1
                continue
            try:
                if n >= TUN_READ:
                    raise tunoffload.BadOffload("too long")
                segments = split(buf, 0, n, send, now)
            except tunoffload.BadOffload:
                self.io_errors["tun_bad_offload"] += 1
                budget -= 1
                continue
            if gso:
                offload["gso_reads"] += 1
                offload["gso_segments"] += segments
            budget -= segments

    def _drain_handoff(self, now: float) -> None:
        """What other workers handed over: tunnel packets for our peers, initiations from our
        peers' keys (with the local address they came to, so the reply leaves from it)."""
        assert self.handoff is not None
        recv_into, receive = self.handoff.inbox.recv_into, self.device.receive_handoff
        buf, view, hdr = self._hbuf, memoryview(self._hbuf), _HANDOFF_HDR
        for _ in range(BATCH):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self.io_errors["handoff_error"] += 1
                return
            if n < 1:
                continue
            if buf[0] == HANDOFF_PACKET:
                receive(HANDOFF_PACKET, view[1:n], None, b"", now)
                continue
            if n < hdr.size + 96:
                self.device.drops["bad_handoff"] += 1
                continue
            kind, local_len, src_len = hdr.unpack_from(buf, 0)
            at = hdr.size
            local = bytes(buf[at:at + local_len])
            at += local_len
            try:
                src = decode_source(bytes(buf[at:at + src_len]))
            except (ValueError, UnicodeDecodeError):
                self.device.drops["bad_handoff"] += 1
                continue
            at += src_len
            if local and self.sticky:
                self._seen_local[src] = local
                self._reply_from[src] = _reply_cmsg(*self._pktinfo_kind(), local)
            receive(kind, bytes(buf[at + 96:n]), src, bytes(buf[at:at + 96]), now)

    def _pktinfo_kind(self) -> tuple[int, int]:
        if self.sock.family == socket.AF_INET6:
            return socket.IPPROTO_IPV6, socket.IPV6_PKTINFO
        return socket.IPPROTO_IP, IP_PKTINFO

    def _hand_off(self) -> None:
        """Send the device's handoffs to their workers, without waiting."""
        assert self.handoff is not None
        device = self.device
        out, device.handoff_out = device.handoff_out, []
        outboxes, kind_byte = self.handoff.outboxes, _PACKET_BYTE
        for worker, kind, data, src, state in out:
            box = outboxes[worker]
            try:
                if kind == HANDOFF_PACKET:
                    box.sendmsg((kind_byte, data))  # type: ignore[union-attr]
                else:
                    assert src is not None
                    local = self._seen_local.get(src, b"")
                    source = encode_source(src)
                    head = _HANDOFF_HDR.pack(kind, len(local), len(source))
                    box.sendmsg((head, local, source, state, data))  # type: ignore[union-attr]
            except BlockingIOError:
                device.drops["handoff_full"] += 1
            except OSError:
                self.io_errors["handoff_error"] += 1

    def flush_nowait_tun(self) -> None:
        device = self.device
        if not device.tun_out:
            return
        out, device.tun_out = device.tun_out, []
        fd = self.tun_fd
        if self.vnet_hdr:
            writev = os.writev
            for iov in tcpgro.plan(out):
                try:
                    writev(fd, iov)
                except OSError:
                    self.io_errors["tun_write_error"] += len(iov) - 2 if len(iov) > 2 else 1
            return
        write = os.write
        for packet in out:
            try:
                write(fd, packet)
            except OSError:
                self.io_errors["tun_write_error"] += 1

    def flush_nowait(self) -> bool:
        """Carry out what the device asked for without waiting. Datagrams the socket cannot
        take now stay queued, in order; returns True when some are left."""
        device = self.device
        if self.handoff is not None and device.handoff_out:
            self._hand_off()
        self.flush_nowait_tun()
        if device.net_out:
            out, device.net_out = device.net_out, []
            left = self._send_all(out)
            if left:
                device.net_out[:0] = left
        if device.events:
            events, device.events = device.events, []
            if self.on_event is not None:
                self._queue_events(events)
        return bool(device.net_out)

    def _queue_events(self, events: list[tuple[Event, Peer, Any]]) -> None:
        with self._events_lock:
            pending = self._pending_events
            schedule = not pending  # else a delivery is already on its way
            for kind, peer, detail in events:
                pending[kind, peer] = detail
        if schedule and self._token is not None:  # the token is set before the thread starts
            try:
                self._token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:
                pass

    def _deliver(self) -> None:
        """In the trio thread: hand the device's events (handshakes, moves) to the owner."""
        with self._events_lock:
            pending, self._pending_events = self._pending_events, {}
        on_event = self.on_event
        if on_event is None:
            return
        for (kind, peer), detail in pending.items():
            on_event(kind, peer, detail)

    def _send_all(self, out: list[tuple[Packet, Endpoint]]) -> list[tuple[Packet, Endpoint]]:
        """Send datagrams in order. A run of equal-size datagrams to one endpoint (the last may
        be shorter) goes out in one sendmsg with UDP GSO: the kernel cuts it into datagrams.

        The kernel refuses such a run (EMSGSIZE) when its datagrams exceed the path MTU it
        learned from ICMP "fragmentation needed", but fragments a single datagram: datagrams of
        that size or larger to that endpoint then go one by one."""
        sendto, sendmsg = self.sock.sendto, self.sock.sendmsg
        reply_from = self._reply_from
        too_big = self._too_big
        gso = self.gso
        n = len(out)
        i = 0
        while i < n:
            datagram, endpoint = out[i]
            size = len(datagram)
            j = i + 1
            if gso and (not too_big or size < too_big.get(endpoint, MAX_PACKET)):
                total = size
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    d2, e2 = out[j]
                    l2 = len(d2)
                    if ((e2 is not endpoint and e2 != endpoint) or l2 > size
                            or total + l2 > GSO_MAX_BYTES):
                        break
                    total += l2
                    j += 1
                    if l2 < size:
                        break
            cmsg = reply_from.get(endpoint) if reply_from else None
            try:
                if j - i > 1:
                    segment = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, "little"))]
                    sendmsg([d for d, _ in out[i:j]], segment + cmsg if cmsg else segment, 0,
                            endpoint)
                elif cmsg is None:
                    sendto(datagram, endpoint)
                else:
                    sendmsg((datagram,), cmsg, 0, endpoint)
            except BlockingIOError:
                return out[i:]
            except OSError as exc:
                if j - i > 1 and exc.errno == errno.EMSGSIZE:
                    if len(too_big) >= MAX_STICKY:
                        too_big.clear()
                    too_big[endpoint] = size
                    continue
                if j - i > 1 and exc.errno in _NO_GSO_ERRNOS:
                    # This path cannot segment (old kernel, device without checksum offload).
                    self.gso = gso = False
                    log.info("UDP segmentation offload unavailable (%s); sending one by one",
                             exc.strerror)
                    continue
                if cmsg is not None:  # that local address is gone: let the route choose
                    reply_from.pop(endpoint, None)
                    continue
                self.io_errors["udp_send_error"] += j - i
            i = j
        return []
