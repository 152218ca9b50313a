"""The sans-IO WireGuard device: many peers, bytes and `now` in, effects out.

    device.receive(datagram, source, now)   a UDP datagram from the network
    device.send(packet, now)                an IP packet read from the tunnel interface
    device.tick(now)                        timers; call a few times a second
    device.set_standby(True)                a hot standby: sessions gone, nothing answered

Effects accumulate in lists the caller drains: `net_out` of (datagram, endpoint), `tun_out`
of IP packets, `events` of (kind, peer, detail) for logs, and, for one of several data-plane
workers, `handoff_out` of what belongs to another worker (see "Workers" below). Endpoints are opaque
socket addresses; `now` is monotonic seconds. Randomness (`rng(n) -> bytes`) and the wall clock
for TAI64N timestamps are injected. Every drop is counted in `drops` by reason.

Untrusted input is checked cheapest first: exact length, mac1, (under load) mac2 and per-source
rate limit, index lookup, replay quick check, AEAD, replay mark. Only an authenticated, fresh
packet moves the peer's endpoint (roaming, as the kernel does: also a keepalive, and before the
inner source address is checked); a packet whose inner source is not the peer's is then
dropped and counted.

Workers: a hub may run several devices with one key, one per process (server/workers.py),
each with the peers `steering.owner_of` gives it, and the others' allowed IPs as `Foreign`
entries of the same table (so longest match and the source checks see every peer). A tunnel
packet for a foreign peer, and an initiation from a key another worker owns (known once the
static key is decrypted, before any further work), go to `handoff_out` as (worker, kind, data,
source, state); the owner's caller hands them to `receive_handoff`, which carries on where the
first device stopped: no DH is done twice, and replay state stays with the owner.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Callable, Iterable

from . import noise, steering, wire
from .allowedips import AllowedIPs
from .cookie import CookieChecker, RateLimiter, source_bytes
from .crypto import DH_pubkey, CryptoFailure, clamp
from .keys import check_public
from .peer import (HANDSHAKE_INITIATION_RATE, Event, RECEIVE_REKEY_AGE, REJECT_AFTER_MESSAGES,
                   REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REKEY_TIMEOUT,
                   Endpoint, Keypair, Packet, PendingHandshake, Peer)
from .timers import Timers

MAX_WAITING = 1024  # initiations from keys not configured, kept for answer_waiting()
HANDOFF_PACKET = 1  # a tunnel packet for a peer of another worker
HANDOFF_INITIATION = 2  # an initiation whose static key another worker owns; state: ck, h, key

# wire.py owns the format; bound here as names for the hot path.
_TRANSPORT_HDR = wire.TRANSPORT_HDR
_OVERHEAD = wire.TRANSPORT_MIN_LEN  # header and tag around a padded payload
_PAYLOAD = wire.TRANSPORT_HEADER_LEN
_PREFIX = wire.TRANSPORT_PREFIX
_PAD = bytes(16)
UNDER_LOAD_WINDOW = 1.0


class Foreign:
    """An allowed-IPs entry of a peer that another worker owns."""

    __slots__ = ("worker", "name")
    current = None  # never a session here: Device.send takes the slow path, which hands over

    def __init__(self, worker: int, name: str | None = None):
        self.worker = worker
        self.name = name

    def __repr__(self) -> str:
        return f"Foreign(worker={self.worker}, name={self.name!r})"


def rekey_due(kp: Keypair, now: float) -> bool:
    """After sending on `kp`: either side rekeys after REKEY_AFTER_MESSAGES, only the
    initiator after REKEY_AFTER_TIME (whitepaper 6.2)."""
    return (kp.send_counter > REKEY_AFTER_MESSAGES
            or kp.initiator and now - kp.created > REKEY_AFTER_TIME)


class Device(Timers):
    def __init__(self, private_key: bytes, *, rng: Callable[[int], bytes] = os.urandom,
                 wallclock: Callable[[], float] = time.time,
                 mtu: int = 1420, allow_peer_to_peer: bool = True,
                 under_load_threshold: int = 1000, worker: tuple[int, int] = (0, 1)):
        self.private_key = clamp(private_key)
        self.public_key = DH_pubkey(self.private_key)
        self.rng = rng
        self.wallclock = wallclock
        self.mtu = mtu
        self.allow_peer_to_peer = allow_peer_to_peer
        self.under_load_threshold = under_load_threshold
        # (this worker, all workers): the receiver indexes it hands out name it (steering.py)
        steering.index_for_worker(0, *worker)  # refuses a worker outside 0..n-1
        self.worker = worker
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips = AllowedIPs()
        self.keypairs: dict[int, Keypair] = {}  # by our receiver index
        self.handshakes: dict[int, Peer] = {}  # initiation in flight, by our sender index
        self.cookie_checker = CookieChecker(self.public_key, rng)
        self.rate_limiter = RateLimiter()
        self.responder_ck, self.responder_h = noise.initial_state(self.public_key)
        self.net_out: list[tuple[Packet, Endpoint]] = []
        self.tun_out: list[Packet] = []
        self.events: list[tuple[Event, Peer, Any]] = []
        # (worker, HANDOFF_*, data, source or None, state): for the worker that owns the peer
        self.handoff_out: list[tuple[int, int, bytes, Endpoint | None, bytes]] = []
        self.handoffs: Counter[str] = Counter()  # packets_out, initiations_out, *_in
        self.drops: Counter[str] = Counter()
        # Datagrams of a type WireGuard does not use go to other_handler(data, src, now) when
        # one is set (the hub's enrollment, server/invites.py); True means it took the datagram.
        self.other_handler: Callable[[Packet, Endpoint, float], bool] | None = None
        self._handshake_window_start = 0.0
        self._handshake_count = 0
        self._under_load_until = -1.0
        # A hot standby (a second hub behind a shared address) answers nothing: every datagram
        # and tunnel packet is dropped and counted, and no handshake or keepalive leaves.
        self.standby = False
        # The latest initiation from each key not (yet) configured, for REKEY_TIMEOUT: a peer
        # added meanwhile (by another hub sharing the registry, say) is answered at once by
        # answer_waiting(), instead of after the initiator's own retry.
        self.waiting: dict[bytes, tuple[bytes, Endpoint, float]] = {}
        Timers.__init__(self)

    def __repr__(self) -> str:
        return f"Device(peers={len(self.peers)}, keys=<redacted>)"

    # -- configuration ---------------------------------------------------------------------

    def add_peer(self, public_key: bytes, *, preshared_key: bytes | None = None,
                 allowed_ips: Iterable[Any] = (), endpoint: Endpoint | None = None,
                 persistent_keepalive: int = 0,
                 name: str | None = None) -> Peer:
        check_public(public_key)
        if public_key == self.public_key:
            raise ValueError("a peer cannot have the device's own public key")
        if public_key in self.peers:
            raise ValueError(f"peer {name or ''} is already configured".replace("  ", " "))
        peer = Peer(self.private_key, public_key, preshared_key=preshared_key, endpoint=endpoint,
                    persistent_keepalive=persistent_keepalive, name=name)
        self.peers[public_key] = peer
        for network in allowed_ips:
            self.allowed_ips.insert(network, peer)
        return peer

    def add_foreign(self, worker: int, allowed_ips: Iterable[Any], name: str | None = None
                    ) -> Foreign:
        """Route `allowed_ips` to another worker's peer; returns the entry (remove_foreign)."""
        if not 0 <= worker < self.worker[1] or worker == self.worker[0]:
            raise ValueError(f"worker {worker} is not another worker of {self.worker[1]}")
        entry = Foreign(worker, name)
        for network in allowed_ips:
            self.allowed_ips.insert(network, entry)
        return entry

    def remove_foreign(self, entry: Foreign) -> None:
        self.allowed_ips.remove_by_peer(entry)

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self.allowed_ips.remove_by_peer(peer)
        self.zero_key_material(peer)
        peer.staged = ()
        self.disarm(peer)

    def answer_waiting(self, peer: Peer, now: float) -> bool:
        """Answer the initiation `peer` sent before it was added, if one came within
        REKEY_TIMEOUT (its initiator still waits for the response). True if one was taken."""
        waiting = self.waiting.pop(peer.public_key, None)
        if waiting is None or now - waiting[2] >= REKEY_TIMEOUT or self.standby:
            return False
        self._receive_initiation(waiting[0], waiting[1], now)
        return True

    def _keep_waiting(self, static: bytes, data: bytes, src: Endpoint, now: float) -> None:
        waiting = self.waiting
        waiting.pop(static, None)  # the newest last, so the oldest goes first
        if len(waiting) >= MAX_WAITING:
            for key in [k for k, (_, _, t) in waiting.items() if now - t >= REKEY_TIMEOUT]:
                del waiting[key]
            while len(waiting) >= MAX_WAITING:
                del waiting[next(iter(waiting))]
        waiting[static] = (data, src, now)

    def set_standby(self, standby: bool) -> None:
        """Standby: end every session at once (keys, handshakes in flight, timers, what waits
        to be sent) and answer nothing until set active again. Either way the next initiation
        to a peer goes out at once (no REKEY_TIMEOUT left over from before). Endpoints and
        handshake times stay: they say whom to call back."""
        self.standby = standby
        for peer in self.peers.values():
            if standby:
                self.zero_key_material(peer)
                self.disarm(peer)
                peer.staged = ()
            peer.last_sent_handshake = None
            peer.handshake_attempts = 0
        if standby:
            self.net_out.clear()
            self.tun_out.clear()
            self.waiting.clear()

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self.rng(4), "little")
            if self.worker[1] > 1:
                index = steering.index_for_worker(index, *self.worker)
            if index not in self.keypairs and index not in self.handshakes:
                return index

    # -- from the tunnel interface -----------------------------------------------------------

    def send(self, packet: Packet, now: float) -> None:
        if self.standby:
            self.drops["standby"] += 1
            return
        peer = self.allowed_ips.lookup_packet_dst(packet)
        if peer is None:
            self.drops["no_route"] += 1
            return
        kp = peer.current
        if (kp is None or peer.staged or now >= kp.fresh_until or peer.endpoint is None
                or kp.send_counter >= REKEY_AFTER_MESSAGES):
            self._send_slow(peer, kp, packet, now)
            return
        # The common case: a fresh session, nothing waiting, no rekey due.
        self._seal(peer, kp, packet, now)
        if peer.new_handshake_at is None:
            self.data_sent(peer, now)

    def _send_slow(self, peer: Peer, kp: Keypair | None, packet: Packet, now: float) -> None:
        if isinstance(peer, Foreign):  # another worker's peer: the packet goes there
            self._hand_over(peer, packet)
            return
        if (kp is None or peer.staged or peer.endpoint is None or not kp.can_send(now)):
            if not peer.stage(bytes(packet)):
                self.drops["staged_overflow"] += 1  # the oldest waiting packet was pushed out
            self.send_staged(peer, now)
            return
        self._seal(peer, kp, packet, now)
        self.data_sent(peer, now)
        if rekey_due(kp, now):
            self.initiate(peer, now, retry=False)

    def _hand_over(self, entry: Any, packet: Packet) -> None:
        self.handoff_out.append((entry.worker, HANDOFF_PACKET, bytes(packet), None, b""))
        self.handoffs["packets_out"] += 1

    def _seal(self, peer: Peer, kp: Keypair, packet: Packet, now: float) -> None:
        n = len(packet)
        padded = (n + 15) & ~15
        if padded > self.mtu >= n:
            padded = self.mtu
        if padded != n:
            packet = bytes(packet) + _PAD[:padded - n]
        counter = kp.send_counter
        kp.send_counter = counter + 1
        datagram = bytearray(padded + _OVERHEAD)
        _TRANSPORT_HDR.pack_into(datagram, 0, 4, kp.remote_index, counter)
        kp.send.seal_into(counter, packet, datagram)
        # Callers send only to a peer with an endpoint (else the packet is staged).
        self.net_out.append((datagram, peer.endpoint))  # type: ignore[arg-type]
        peer.tx_bytes += padded + _OVERHEAD
        # Timers, inlined: any authenticated packet sent.
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
            self._armed.add(peer)

    def send_staged(self, peer: Peer, now: float) -> None:
        """Send what waits for a session, or start a handshake to get one."""
        kp = peer.current
        if kp is None or not kp.can_send(now) or peer.endpoint is None:
            self.initiate(peer, now, retry=False)
            return
        sent_data = False
        while peer.staged:
            packet = peer.staged.popleft()
            if not kp.can_send(now):
                peer.staged.appendleft(packet)
                self.initiate(peer, now, retry=False)
                return
            self._seal(peer, kp, packet, now)
            sent_data = sent_data or len(packet) > 0
        if sent_data:
            self.data_sent(peer, now)
        if rekey_due(kp, now):
            self.initiate(peer, now, retry=False)

    def send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.stage(b"")
        self.send_staged(peer, now)

    # -- handshake: initiating ------------------------------------------------------------------

    def initiate(self, peer: Peer, now: float, *, retry: bool = False) -> None:
        """Send a handshake initiation unless one went out less than REKEY_TIMEOUT ago."""
        if self.standby:
            return
        if not retry:
            peer.handshake_attempts = 0
        if peer.last_sent_handshake is not None and now - peer.last_sent_handshake < REKEY_TIMEOUT:
            return
        if peer.endpoint is None:
            self.drops["no_endpoint"] += 1
            return
        peer.last_sent_handshake = now
        if peer.handshake is not None:  # it stays answerable; the one before it does not
            self._drop_pending(peer.previous_handshake)
            peer.previous_handshake = peer.handshake
        index = self._new_index()
        e_priv = clamp(self.rng(32))
        e_pub, enc_static, enc_ts, ck, h = noise.create_initiation(
            peer.initial_ck, peer.initial_h, static_public=self.public_key,
            static_static=peer.static_static, responder_static=peer.public_key,
            ephemeral_private=e_priv, payload=noise.tai64n(self.wallclock()))
        peer.handshake = PendingHandshake(index, ck, h, e_priv, now)
        self.handshakes[index] = peer
        msg = wire.Initiation(index, e_pub, enc_static, enc_ts, b"", b"").pack_without_macs()
        datagram = peer.cookies.add_macs(msg, now)
        self.net_out.append((datagram, peer.endpoint))
        peer.tx_bytes += len(datagram)
        self.authenticated_sent(peer, now)
        self.handshake_initiated(peer, now)

    # -- from the network -------------------------------------------------------------------------

    def receive(self, data: Packet, src: Endpoint, now: float) -> None:
        if self.standby:
            self.drops["standby"] += 1
            return
        if len(data) >= _OVERHEAD and data[:4] == _PREFIX:
            self._receive_transport(data, src, now)
            return
        try:
            kind = wire.message_type(data)
            if kind == wire.MSG_INITIATION:
                self._receive_initiation(bytes(data), src, now)
            elif kind == wire.MSG_RESPONSE:
                self._receive_response(bytes(data), src, now)
            elif kind == wire.MSG_COOKIE_REPLY:
                self._receive_cookie_reply(bytes(data), now)
            else:
                self.drops["bad_type"] += 1
        except wire.BadPacket as exc:
            if exc.reason == "bad_type" and self.other_handler is not None \
                    and self.other_handler(data, src, now):
                return
            self.drops[exc.reason] += 1

    def under_load(self, now: float) -> bool:
        return now < self._under_load_until

    def _admit_handshake(self, data: bytes, mac1_offset: int, sender: int, src: Endpoint,
                         now: float) -> bool:
        """mac1 always; under load mac2 (else a cookie reply) and the per-source rate limit."""
        if not self.cookie_checker.check_mac1(data, mac1_offset):
            self.drops["bad_mac1"] += 1
            return False
        if now - self._handshake_window_start >= UNDER_LOAD_WINDOW:
            self._handshake_window_start = now
            self._handshake_count = 0
        self._handshake_count += 1
        if self._handshake_count > self.under_load_threshold:
            self._under_load_until = now + UNDER_LOAD_WINDOW
        if not self.under_load(now):
            return True
        try:
            src_bytes = source_bytes(src)
        except (ValueError, IndexError, TypeError, AttributeError):
            self.drops["bad_source"] += 1
            return False
        if not self.cookie_checker.check_mac2(data, mac1_offset, src_bytes, now):
            reply = self.cookie_checker.create_reply(data, mac1_offset, sender, src_bytes, now)
            self.net_out.append((reply, src))
            self.drops["cookie_sent"] += 1
            return False
        if not self.rate_limiter.allow(src, now):
            self.drops["rate_limited"] += 1
            return False
        return True

    def _receive_initiation(self, data: bytes, src: Endpoint, now: float) -> None:
        msg = wire.parse_initiation(data)
        if not self._admit_handshake(data, wire.INITIATION_MAC1, msg.sender, src, now):
            return
        try:
            initiator_static, ck, h = noise.consume_initiation_static(
                self.responder_ck, self.responder_h, static_private=self.private_key,
                e_pub=msg.ephemeral, encrypted_static=msg.encrypted_static)
        except CryptoFailure:
            self.drops["bad_initiation"] += 1
            return
        if self.worker[1] > 1:
            owner = steering.owner_of(initiator_static, self.worker[1])
            if owner != self.worker[0]:
                self.handoff_out.append((owner, HANDOFF_INITIATION, data, src,
                                         ck + h + initiator_static))
                self.handoffs["initiations_out"] += 1
                return
        self._continue_initiation(msg, data, initiator_static, ck, h, src, now)

    def receive_handoff(self, kind: int, data: Packet, src: Endpoint | None, state: bytes,
                        now: float) -> None:
        """What another worker handed over (its handoff_out): a tunnel packet for one of our
        peers, or an initiation from a key we own, checked there up to the static key."""
        if self.standby:
            self.drops["standby"] += 1
            return
        if kind == HANDOFF_PACKET:
            self.handoffs["packets_in"] += 1
            peer = self.allowed_ips.lookup_packet_dst(data)
            if peer is None or peer.__class__ is Foreign:  # changed meanwhile: not ours now
                self.drops["no_route"] += 1
                return
            kp = peer.current
            if (kp is None or peer.staged or now >= kp.fresh_until or peer.endpoint is None
                    or kp.send_counter >= REKEY_AFTER_MESSAGES):
                self._send_slow(peer, kp, data, now)
                return
            self._seal(peer, kp, data, now)
            if peer.new_handshake_at is None:
                self.data_sent(peer, now)
            return
        if kind != HANDOFF_INITIATION or len(state) != 96 or src is None:
            self.drops["bad_handoff"] += 1
            return
        self.handoffs["initiations_in"] += 1
        data = bytes(data)
        try:
            msg = wire.parse_initiation(data)
        except wire.BadPacket as exc:
            self.drops[exc.reason] += 1
            return
        self._continue_initiation(msg, data, state[64:], state[:32], state[32:64], src, now)

    def _continue_initiation(self, msg: wire.Initiation, data: bytes, initiator_static: bytes,
                             ck: bytes, h: bytes, src: Endpoint, now: float) -> None:
        peer = self.peers.get(initiator_static)
        if peer is None:
            self.drops["unknown_peer"] += 1
            self._keep_waiting(initiator_static, data, src, now)
            return
        try:
            timestamp, ck, h = noise.consume_initiation_payload(
                ck, h, static_static=peer.static_static, encrypted_payload=msg.encrypted_timestamp)
        except CryptoFailure:
            self.drops["bad_initiation"] += 1
            return
        if timestamp <= peer.greatest_timestamp:
            self.drops["replayed_initiation"] += 1
            return
        if (peer.last_initiation_consumed is not None
                and now - peer.last_initiation_consumed < HANDSHAKE_INITIATION_RATE):
            self.drops["initiation_flood"] += 1
            return
        peer.greatest_timestamp = timestamp
        peer.last_initiation_consumed = now
        index = self._new_index()
        e_priv = clamp(self.rng(32))
        try:
            e_pub, enc_nothing, ck, h = noise.create_response(
                ck, h, ephemeral_private=e_priv, initiator_ephemeral=msg.ephemeral,
                initiator_static=peer.public_key, psk=peer.preshared_key)
        except CryptoFailure:
            self.drops["bad_initiation"] += 1
            return
        recv_key, send_key = noise.split(ck)
        kp = Keypair(peer, send_key, recv_key, index, msg.sender, now, initiator=False)
        # Responder: the new keypair waits as `next` until the initiator uses it.
        if peer.next is not None:
            self.keypairs.pop(peer.next.local_index, None)
        if peer.previous is not None:
            self.keypairs.pop(peer.previous.local_index, None)
        peer.previous = None
        peer.next = kp
        self.keypairs[index] = kp
        self._set_endpoint(peer, src)
        # A response counts as a handshake sent (as in wireguard-go and the kernel): until the
        # initiator confirms the session, data waiting here must not start a crossing initiation.
        peer.last_sent_handshake = now
        response = wire.Response(index, msg.sender, e_pub, enc_nothing, b"",
                                 b"").pack_without_macs()
        datagram = peer.cookies.add_macs(response, now)
        self.net_out.append((datagram, src))  # _set_endpoint(peer, src) above
        peer.rx_bytes += len(data)
        peer.tx_bytes += len(datagram)
        self.session_derived(peer, now)
        self.authenticated_received(peer, now)
        self.authenticated_sent(peer, now)

    def _receive_response(self, data: bytes, src: Endpoint, now: float) -> None:
        msg = wire.parse_response(data)
        if not self._admit_handshake(data, wire.RESPONSE_MAC1, msg.sender, src, now):
            return
        peer = self.handshakes.get(msg.receiver)
        hs = None
        if peer is not None:
            for pending in (peer.handshake, peer.previous_handshake):
                if pending is not None and pending.local_index == msg.receiver:
                    hs = pending
        if peer is None or hs is None:
            self.drops["unknown_index"] += 1
            return
        try:
            _, ck, h = noise.consume_response(
                hs.ck, hs.h, ephemeral_private=hs.ephemeral_private,
                static_private=self.private_key, responder_ephemeral=msg.ephemeral,
                encrypted_payload=msg.encrypted_nothing, psk=peer.preshared_key)
        except CryptoFailure:
            self.drops["bad_response"] += 1
            return
        send_key, recv_key = noise.split(ck)
        self._drop_pending(hs)
        if hs is peer.handshake:
            peer.handshake = None
            self._drop_pending(peer.previous_handshake)
            peer.previous_handshake = None
        else:  # the answer to the initiation before: the newer one may still complete too,
            peer.previous_handshake = None  # and its session then replaces this one
        kp = Keypair(peer, send_key, recv_key, hs.local_index, msg.sender, now, initiator=True)
        self.keypairs[kp.local_index] = kp
        # Initiator: the new keypair is current at once; a responder keypair in waiting becomes
        # `previous` so what the other side sent on it still decrypts (simultaneous initiation).
        old_previous = peer.previous
        if peer.next is not None:
            peer.previous = peer.next
            peer.next = None
            self._forget(peer.current)
        else:
            peer.previous = peer.current
        self._forget(old_previous)
        peer.current = kp
        peer.rx_bytes += len(data)
        self._set_endpoint(peer, src)
        self.session_derived(peer, now)
        self.handshake_complete(peer, now)
        self.authenticated_received(peer, now)
        self.send_keepalive(peer, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        msg = wire.parse_cookie_reply(data)
        peer = self.handshakes.get(msg.receiver)
        if peer is None:
            kp = self.keypairs.get(msg.receiver)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.drops["unknown_index"] += 1
            return
        if not peer.cookies.consume_reply(msg.nonce, msg.encrypted_cookie, now):
            self.drops["bad_cookie"] += 1

    def _receive_transport(self, data: Packet, src: Endpoint, now: float) -> None:
        _, receiver, counter = _TRANSPORT_HDR.unpack_from(data, 0)
        kp = self.keypairs.get(receiver)
        if kp is None:
            self.drops["unknown_index"] += 1
            return
        if now - kp.created >= REJECT_AFTER_TIME:
            self.drops["expired_keypair"] += 1
            return
        replay = kp.replay
        if not replay.check(counter, REJECT_AFTER_MESSAGES):
            self.drops["replay"] += 1
            return
        try:
            plaintext = kp.recv.open(counter, data[_PAYLOAD:])
        except CryptoFailure:
            self.drops["decrypt"] += 1
            return
        if not replay.validate(counter, REJECT_AFTER_MESSAGES):
            self.drops["replay"] += 1
            return
        peer = kp.peer
        if kp is peer.next:
            self._confirm(peer, kp, now)
        if src != peer.endpoint:
            self._set_endpoint(peer, src)
        peer.rx_bytes += len(data)
        # Timers, inlined: any authenticated packet received.
        peer.new_handshake_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
            self._armed.add(peer)
        # The age that matters is the current session's, not that of the one received on.
        current = peer.current
        if (current is not None and current.initiator and not peer.sent_last_minute_handshake
                and now - current.created > RECEIVE_REKEY_AGE):
            peer.sent_last_minute_handshake = True
            self.initiate(peer, now, retry=False)
        if not plaintext:
            return  # keepalive
        if peer.keepalive_at is None:  # data received: answer it within KEEPALIVE_TIMEOUT
            self.data_received(peer, now)
        else:
            peer.need_another_keepalive = True
        length = wire.ip_packet_length(plaintext)
        if length < 0:
            self.drops["bad_inner_packet"] += 1
            return
        if not self.allowed_ips.contains_src(plaintext, peer):
            self.drops["source_not_allowed"] += 1
            return
        if (not self.allow_peer_to_peer
                and self.allowed_ips.lookup_packet_dst(plaintext) is not None):
            self.drops["peer_to_peer"] += 1
            return
        self.tun_out.append(plaintext if length == len(plaintext) else plaintext[:length])

    # -- keypair bookkeeping ---------------------------------------------------------------------

    def _confirm(self, peer: Peer, kp: Keypair, now: float) -> None:
        """The initiator used our `next` keypair: it becomes current (key confirmation)."""
        self._forget(peer.previous)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        self.handshake_complete(peer, now)
        if peer.staged:
            self.send_staged(peer, now)

    def _drop_pending(self, hs: PendingHandshake | None) -> None:
        if hs is not None:
            self.handshakes.pop(hs.local_index, None)

    def _forget(self, kp: Keypair | None) -> None:
        if kp is not None:
            self.keypairs.pop(kp.local_index, None)

    def _set_endpoint(self, peer: Peer, src: Endpoint) -> None:
        if src != peer.endpoint:
            old = peer.endpoint
            peer.endpoint = src
            if old is not None:
                self.events.append((Event.ENDPOINT, peer, src))

    def zero_key_material(self, peer: Peer) -> None:
        for kp in peer.keypairs():
            self._forget(kp)
        peer.current = peer.previous = peer.next = None
        self._drop_pending(peer.handshake)
        self._drop_pending(peer.previous_handshake)
        peer.handshake = peer.previous_handshake = None
