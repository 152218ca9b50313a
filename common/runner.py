"""What both ends run around their Device: a TUN device with its addresses and MTU, one UDP
socket, the data-plane Driver, and the control socket.

    link = DeviceLink(ifname, addresses, mtu, port=51820, sticky=True)
    link.open()                  # TUN (IFF_VNET_HDR, offload), addresses, MTU, up; UDP socket
    driver = link.driver(device, on_event)
    await link.serve(nursery, control_path, handler)   # the data thread, the control socket
    ...
    link.close()                 # socket and TUN fd; the device goes with its last fd

The hub and pytun-client differ in what they do between these steps (firewall and registry;
routes, DNS and hooks), not in the steps: one place opens, serves and closes them.

TUN offload on read (large TCP/UDP packets from the kernel, cut up by tunoffload.py) is off
unless PYTUN_TUN_OFFLOAD=1 is in the environment: in Python, cutting the packets and filling in
their checksums costs the hub more than the reads it saves (bench/README.md has the figures).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import trio

from . import control, linux
from .errors import PytunError
from .device import Device
from .driver import Driver, EventHandler, open_udp


OFFLOAD_ENV = "PYTUN_TUN_OFFLOAD"


def offload_wanted(environ: Any = os.environ) -> bool:
    """PYTUN_TUN_OFFLOAD: 0 (the default) or 1."""
    value = str(environ.get(OFFLOAD_ENV, "0")).strip()
    if value not in ("0", "1"):
        raise PytunError(f"{OFFLOAD_ENV} must be 0 or 1, not {value!r}")
    return value == "1"


class DeviceLink:
    def __init__(self, ifname: str, addresses: list[Any], mtu: int, *, port: int = 0,
                 mark: int = 0, sticky: bool = False, offload: bool | None = None,
                 configure: Callable[[str, list[Any], int], Any] = linux.configure_link):
        self.ifname = ifname
        self.addresses = addresses
        self.mtu = mtu
        self.port = port
        self.mark = mark
        self.sticky = sticky  # reply from the address a laptop dialled (the hub)
        self.configure = configure  # the hub runs it apart, so pyroute2 stays out of it
        self.offload = offload_wanted() if offload is None else offload
        self.offload_flags = 0  # TUN_F_* the kernel took
        self.tun_fd: int | None = None
        self.sock: socket.socket | None = None
        self._driver: Driver | None = None

    def open_tun(self) -> None:
        """The TUN device with IFF_VNET_HDR (GSO writes; with offload, GSO reads too),
        addressed, sized and up."""
        self.tun_fd, self.ifname = linux.open_tun(self.ifname, vnet_hdr=True)
        if self.offload:
            self.offload_flags = linux.set_tun_offload(self.tun_fd)
        self.configure(self.ifname, self.addresses, self.mtu)

    def open_socket(self) -> socket.socket:
        """The one UDP socket, dual stack, marked for a full tunnel when asked. OSError."""
        self.sock = open_udp(self.port, mark=self.mark)
        return self.sock

    def open(self) -> None:
        self.open_tun()
        self.open_socket()

    def driver(self, device: Device, on_event: EventHandler | None = None) -> Driver:
        assert self.tun_fd is not None and self.sock is not None, "open() first"
        self._driver = Driver(device, self.tun_fd, self.sock, on_event=on_event,
                              sticky=self.sticky, vnet_hdr=True,
                              tun_offload=bool(self.offload_flags))
        return self._driver

    async def serve(self, nursery: trio.Nursery, control_path: str,
                    handler: control.Handler) -> None:
        """Start the data thread, then the control socket; both stop with the nursery."""
        assert self._driver is not None, "driver() first"
        await nursery.start(self._driver.run)
        await nursery.start(control.serve, control_path, handler)

    def close(self) -> None:
        """Close the socket and the TUN fd (the device goes with its last fd); idempotent."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.tun_fd is not None:
            os.close(self.tun_fd)
            self.tun_fd = None
