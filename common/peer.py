"""Per-peer state: keypairs (previous/current/next), the handshakes in flight, staged packets,
timers.

The protocol constants are the whitepaper's (section 6.1).
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

from .cookie import CookieGenerator
from .crypto import DH, SessionCipher
from .noise import EMPTY_PSK, initial_state
from .replay import ReplayFilter

Endpoint = tuple[Any, ...]  # a socket address
Packet = bytes | bytearray | memoryview

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
KEEPALIVE_TIMEOUT = 10.0
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
HANDSHAKE_INITIATION_RATE = 0.020  # at most one initiation consumed per peer per 20 ms
ZERO_KEYS_AFTER = REJECT_AFTER_TIME * 3
RECEIVE_REKEY_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
MAX_STAGED = 128
JITTER_MAX = 0.333


class Event(enum.StrEnum):
    """What the device reports in `Device.events`, as (Event, peer, detail) tuples."""

    HANDSHAKE = "handshake"  # a session was made (either side); detail None
    ENDPOINT = "endpoint"  # an authenticated packet came from a new address; detail: it
    GAVE_UP = "handshake_gave_up"  # no answer for REKEY_ATTEMPT_TIME; detail None


class Keypair:
    """One session: a cipher each way, the send counter and the receive replay window."""

    __slots__ = ("send", "recv", "send_counter", "replay", "local_index", "remote_index",
                 "created", "initiator", "peer", "fresh_until")

    def __init__(self, peer: Peer, send_key: bytes, recv_key: bytes, local_index: int,
                 remote_index: int, created: float, initiator: bool):
        self.peer = peer
        self.send = SessionCipher(send_key)
        self.recv = SessionCipher(recv_key)
        self.send_counter = 0
        self.replay = ReplayFilter()
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.initiator = initiator
        # Until then, sending needs no rekey or expiry check (see Device.send).
        self.fresh_until = created + (REKEY_AFTER_TIME if initiator else REJECT_AFTER_TIME)

    def can_send(self, now: float) -> bool:
        return self.send_counter < REJECT_AFTER_MESSAGES and now - self.created < REJECT_AFTER_TIME

    def __repr__(self) -> str:
        return (f"Keypair(local={self.local_index:#010x}, initiator={self.initiator}, "
                f"sent={self.send_counter}, keys=<redacted>)")


class PendingHandshake:
    """Our initiation in flight: what is needed to read the response to it."""

    __slots__ = ("local_index", "ck", "h", "ephemeral_private", "sent")

    def __init__(self, local_index: int, ck: bytes, h: bytes, ephemeral_private: bytes,
                 sent: float):
        self.local_index = local_index
        self.ck = ck
        self.h = h
        self.ephemeral_private = ephemeral_private
        self.sent = sent

    def __repr__(self) -> str:
        return f"PendingHandshake(local={self.local_index:#010x}, state=<redacted>)"


class Peer:
    """A remote end. `name` is an opaque label for logs and status (never a key)."""

    __slots__ = ("public_key", "name", "preshared_key", "static_static", "initial_ck",
                 "initial_h", "cookies", "endpoint", "persistent_keepalive", "current",
                 "previous", "next", "handshake", "previous_handshake", "greatest_timestamp",
                 "last_initiation_consumed", "last_sent_handshake", "staged", "retransmit_at",
                 "keepalive_at", "new_handshake_at", "zero_at", "persistent_at",
                 "handshake_attempts", "need_another_keepalive", "sent_last_minute_handshake",
                 "rx_bytes", "tx_bytes", "last_handshake", "last_handshake_wall", "__weakref__")

    def __init__(self, device_private: bytes, public_key: bytes, *, preshared_key: bytes | None,
                 endpoint: Endpoint | None, persistent_keepalive: int, name: str | None):
        self.public_key = public_key
        self.name = name
        self.preshared_key = preshared_key or EMPTY_PSK
        # DH(Spriv_local, Spub_remote) never changes: compute it once, as WireGuard does.
        self.static_static = DH(device_private, public_key)
        self.initial_ck, self.initial_h = initial_state(public_key)
        self.cookies = CookieGenerator(public_key)
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: PendingHandshake | None = None
        # The initiation before `handshake`, still answerable: on a bad network its response
        # may arrive after a retransmission went out, and should still complete.
        self.previous_handshake: PendingHandshake | None = None
        self.greatest_timestamp = b""
        self.last_initiation_consumed: float | None = None
        self.last_sent_handshake: float | None = None
        # A deque once a packet waits (most peers never do).
        self.staged: deque[Packet] | tuple[()] = ()
        # Timer deadlines (monotonic seconds) or None when not armed.
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_at: float | None = None
        self.persistent_at: float | None = None
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        # Statistics.
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None  # monotonic
        self.last_handshake_wall: float | None = None  # Unix seconds, for status

    def stage(self, packet: Packet) -> bool:
        """Queue a packet until a session exists; False when that pushed out the oldest."""
        staged = self.staged
        if not isinstance(staged, deque):
            staged = self.staged = deque(maxlen=MAX_STAGED)
        full = len(staged) == MAX_STAGED
        staged.append(packet)
        return not full

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.previous, self.current, self.next) if kp is not None]

    def __repr__(self) -> str:
        return f"Peer(name={self.name!r}, endpoint={self.endpoint!r})"
