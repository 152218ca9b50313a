"""The trio loops shared by hub and client: UDP socket, TUN device, timer tick.

Each loop waits for readiness once, then drains its file descriptor with non-blocking calls
until it is empty (or a batch is full, to stay fair to the other tasks), hands every packet to
the sans-IO Device, and carries out what the Device asked for. There is no `await` per packet.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket

import trio

log = logging.getLogger("pytun")

BATCH = 256
TICK = 0.1
MAX_PACKET = 65535
SOCKET_BUFFER = 4 << 20


def open_udp(port: int = 0, *, mark: int = 0) -> socket.socket:
    """One non-blocking UDP socket for IPv4 and IPv6 (dual stack, IPv4-only if v6 is off)."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise
            raise OSError(exc.errno, exc.strerror) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"UDP port {port} is already in use") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc2:
            sock.close()
            if exc2.errno == errno.EADDRINUSE:
                raise OSError(exc2.errno, f"UDP port {port} is already in use") from None
            raise
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
    sock.setblocking(False)
    return sock


def endpoint_for(sock: socket.socket, host: str, port: int):
    """The socket address to send to `host:port` from `sock` (IPv4 mapped on a v6 socket)."""
    addr = ipaddress.ip_address(host.strip("[]"))
    if sock.family == socket.AF_INET6:
        if addr.version == 4:
            return (f"::ffff:{addr}", port, 0, 0)
        return (str(addr), port, 0, 0)
    if addr.version == 6:
        if addr.ipv4_mapped is None:
            raise ValueError(f"{host} is IPv6 but IPv6 is off on this host")
        addr = addr.ipv4_mapped
    return (str(addr), port)


def format_endpoint(endpoint) -> str:
    """'192.0.2.1:51820' or '[2001:db8::1]:51820' for a socket address, '' for None."""
    if endpoint is None:
        return ""
    host, port = endpoint[0], endpoint[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Driver:
    """Runs a Device over a TUN file descriptor and a UDP socket."""

    def __init__(self, device, tun_fd: int, sock: socket.socket, *, on_event=None):
        self.device = device
        self.tun_fd = tun_fd
        self.sock = sock
        self.on_event = on_event
        self.io_errors = device.drops  # count I/O failures beside protocol drops

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._udp_loop)
            nursery.start_soon(self._tun_loop)
            nursery.start_soon(self._timer_loop)
            task_status.started()

    def now(self) -> float:
        return trio.current_time()

    async def _udp_loop(self) -> None:
        sock, device = self.sock, self.device
        buf = bytearray(MAX_PACKET)
        view = memoryview(buf)
        recv_into = sock.recvfrom_into
        receive = device.receive
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    n, addr = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    self.io_errors["udp_recv_error"] += 1  # e.g. ICMP port unreachable
                    continue
                receive(view[:n], addr, now)
            await self.flush()

    async def _tun_loop(self) -> None:
        fd, device = self.tun_fd, self.device
        read = os.read
        send = device.send
        while True:
            await trio.lowlevel.wait_readable(fd)
            now = trio.current_time()
            for _ in range(BATCH):
                try:
                    packet = read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                except OSError:
                    self.io_errors["tun_read_error"] += 1
                    break
                send(packet, now)
            await self.flush()

    async def _timer_loop(self) -> None:
        while True:
            await trio.sleep(TICK)
            self.device.tick(trio.current_time())
            await self.flush()

    def flush_nowait(self) -> list:
        """Carry out what the device asked for without waiting; returns datagrams left unsent."""
        device = self.device
        if device.tun_out:
            out, device.tun_out = device.tun_out, []
            write, fd = os.write, self.tun_fd
            for packet in out:
                try:
                    write(fd, packet)
                except OSError:
                    self.io_errors["tun_write_error"] += 1
        left = []
        if device.net_out:
            out, device.net_out = device.net_out, []
            sendto = self.sock.sendto
            for i, (datagram, endpoint) in enumerate(out):
                try:
                    sendto(datagram, endpoint)
                except BlockingIOError:
                    left = out[i:]
                    break
                except OSError:
                    self.io_errors["udp_send_error"] += 1
        if device.events:
            events, device.events = device.events, []
            if self.on_event is not None:
                for event in events:
                    self.on_event(*event)
        return left

    async def flush(self) -> None:
        left = self.flush_nowait()
        while left:
            # The socket buffer is full: wait until it drains rather than dropping.
            await trio.lowlevel.wait_writable(self.sock)
            self.device.net_out[:0] = left
            left = self.flush_nowait()
