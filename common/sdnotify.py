"""systemd's notify protocol (sd_notify(3)), in a few lines: datagrams to $NOTIFY_SOCKET.

    n = Notifier.from_environment()   # does nothing when not run by systemd (Type=notify)
    n.notify("READY=1", "STATUS=3 peers")
    n.watchdog_interval               # seconds between WATCHDOG=1 pings, None when off

The watchdog interval is half of WatchdogSec= (WATCHDOG_USEC), as sd_watchdog_enabled(3)
recommends, and only for the process WATCHDOG_PID names (when set).
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sock: socket.socket | None = None
        if address:
            if address.startswith("@"):  # abstract namespace
                address = "\0" + address[1:]
            self._target = address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        address = environ.get("NOTIFY_SOCKET") or None
        usec = None
        try:
            usec = int(environ.get("WATCHDOG_USEC", "")) or None
            pid = environ.get("WATCHDOG_PID")
            if pid and int(pid) != os.getpid():
                usec = None
        except ValueError:
            usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines; False when there is no socket or the send failed (systemd
        gone: nothing to do about it)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode(), self._target)
        except OSError:
            return False
        return True

    def watchdog(self) -> None:
        """WATCHDOG=1: called from the data-plane thread's loop, so a wedged loop stops it."""
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
