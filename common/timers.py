"""The whitepaper's timers (section 6), as deadlines checked by Device.tick(now).

Each peer keeps one deadline per timer; the device keeps the set of peers with any deadline
armed, so a tick costs nothing for idle peers. Events that arm or stop timers are named as in
wireguard-go's timers.go.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from .cookie import RateLimiter
from .peer import (JITTER_MAX, Event, KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT,
                   ZERO_KEYS_AFTER, Peer)

FEW_ARMED = 4  # up to this many peers with timers, a driver may sleep until the earliest


class Timers:
    """The deadlines part of Device. What it needs of the device is declared here and defined
    by Device: mypy checks both sides."""

    rng: Callable[[int], bytes]
    wallclock: Callable[[], float]
    events: list[tuple[Event, Peer, Any]]
    drops: Counter[str]
    rate_limiter: RateLimiter

    def initiate(self, peer: Peer, now: float, *, retry: bool = False) -> None:
        raise NotImplementedError

    def send_keepalive(self, peer: Peer, now: float) -> None:
        raise NotImplementedError

    def zero_key_material(self, peer: Peer) -> None:
        raise NotImplementedError

    def __init__(self) -> None:
        self._armed: set[Peer] = set()
        # Handshakes by outcome, for metrics (once per handshake, never per packet).
        self.handshakes_completed = 0
        self.handshakes_gave_up = 0

    def _jitter(self) -> float:
        return int.from_bytes(self.rng(2), "little") / 65535.0 * JITTER_MAX

    def disarm(self, peer: Peer) -> None:
        peer.retransmit_at = peer.keepalive_at = peer.new_handshake_at = None
        peer.zero_at = peer.persistent_at = None
        self._armed.discard(peer)

    # -- events -------------------------------------------------------------------------------

    def data_sent(self, peer: Peer, now: float) -> None:
        # Expect an answer to data within KEEPALIVE + REKEY_TIMEOUT, else a new handshake.
        if peer.new_handshake_at is None:
            peer.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self._armed.add(peer)

    def data_received(self, peer: Peer, now: float) -> None:
        # Answer data with a keepalive if nothing else goes back within KEEPALIVE_TIMEOUT.
        if peer.keepalive_at is None:
            peer.keepalive_at = now + KEEPALIVE_TIMEOUT
            self._armed.add(peer)
        else:
            peer.need_another_keepalive = True

    def authenticated_sent(self, peer: Peer, now: float) -> None:
        peer.keepalive_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
            self._armed.add(peer)

    def authenticated_received(self, peer: Peer, now: float) -> None:
        peer.new_handshake_at = None
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
            self._armed.add(peer)

    def handshake_initiated(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = now + REKEY_TIMEOUT + self._jitter()
        self._armed.add(peer)

    def handshake_complete(self, peer: Peer, now: float) -> None:
        peer.retransmit_at = None
        peer.handshake_attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = now
        peer.last_handshake_wall = self.wallclock()
        self.handshakes_completed += 1
        self.events.append((Event.HANDSHAKE, peer, None))

    def session_derived(self, peer: Peer, now: float) -> None:
        peer.zero_at = now + ZERO_KEYS_AFTER
        self._armed.add(peer)

    # -- expiry -------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.rate_limiter.collect(now)
        for peer in list(self._armed):
            if peer.retransmit_at is not None and now >= peer.retransmit_at:
                peer.retransmit_at = None
                self._retransmit(peer, now)
            if peer.keepalive_at is not None and now >= peer.keepalive_at:
                peer.keepalive_at = None
                self.send_keepalive(peer, now)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.keepalive_at = now + KEEPALIVE_TIMEOUT
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                peer.new_handshake_at = None
                self.initiate(peer, now, retry=False)
            if peer.persistent_at is not None and now >= peer.persistent_at:
                peer.persistent_at = None
                if peer.persistent_keepalive:
                    self.send_keepalive(peer, now)
            if peer.zero_at is not None and now >= peer.zero_at:
                peer.zero_at = None
                self.zero_key_material(peer)
            if (peer.retransmit_at is None and peer.keepalive_at is None
                    and peer.new_handshake_at is None and peer.persistent_at is None
                    and peer.zero_at is None):
                self._armed.discard(peer)

    def _retransmit(self, peer: Peer, now: float) -> None:
        if peer.handshake_attempts >= MAX_TIMER_HANDSHAKES:
            # Gave up after REKEY_ATTEMPT_TIME: drop what waited, stop answering with keepalives.
            peer.keepalive_at = None
            dropped = sum(1 for packet in peer.staged if packet)  # not the keepalive marker
            if dropped:
                self.drops["handshake_gave_up"] += dropped
            peer.staged = ()
            self.handshakes_gave_up += 1
            self.events.append((Event.GAVE_UP, peer, None))
            if peer.zero_at is None:
                peer.zero_at = now + ZERO_KEYS_AFTER
            return
        peer.handshake_attempts += 1
        self.initiate(peer, now, retry=True)

    def next_wakeup(self, now: float, tick: float, longest: float) -> float:
        """When a driver should call tick() next. With few peers' timers armed (a laptop), the
        earliest deadline, at most `longest` away, so an idle tunnel sleeps; with many (a hub),
        `tick` from now, where looking for the earliest would cost more than the tick itself."""
        if len(self._armed) > FEW_ARMED:
            return now + tick
        best = self.next_deadline()
        return now + longest if best is None else min(best, now + longest)

    def next_deadline(self) -> float | None:
        """The earliest armed deadline, for a driver that sleeps until it."""
        best = None
        for peer in self._armed:
            for t in (peer.retransmit_at, peer.keepalive_at, peer.new_handshake_at,
                      peer.persistent_at, peer.zero_at):
                if t is not None and (best is None or t < best):
                    best = t
        return best
