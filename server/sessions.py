"""The session log: one structured line when a laptop's session starts, moves and ends.

- start: the first handshake after none (or after the previous session ended);
- endpoint: the laptop roamed to another address;
- end: no handshake for 180 s (the whitepaper's Reject-After-Time, after which no packet can
  pass without a new one), or the peer was removed, disabled or reconfigured.

Each line carries the peer's name, endpoint, the bytes each way during the session and its
duration, as `extra` fields that the json and logfmt formats print (common/logformat.py);
never a key.
"""

from __future__ import annotations

import logging
import time

from ..common.driver import format_endpoint
from ..common.peer import REJECT_AFTER_TIME, Event

log = logging.getLogger("pytun.session")


MOVE_LOG_EVERY = 10.0  # at most one "endpoint changed" line per session this often


class Session:
    __slots__ = ("peer", "started", "rx0", "tx0", "moves", "move_logged")

    def __init__(self, peer, now: float):
        self.peer = peer
        self.started = now
        self.moves = 0  # endpoint changes, all counted; logged at most every MOVE_LOG_EVERY
        self.move_logged: float | None = None
        # The handshake that started it is counted in the peer's totals already.
        self.rx0 = peer.rx_bytes
        self.tx0 = peer.tx_bytes


class SessionLog:
    def __init__(self, clock=time.monotonic, wallclock=time.time):
        self.clock = clock
        self.wallclock = wallclock
        self.active: dict[str, Session] = {}

    def on_event(self, kind: str, peer, detail) -> None:
        if kind is Event.HANDSHAKE:
            current = self.active.get(peer.name)
            if current is not None and current.peer is not peer:  # rebuilt under the same name
                self._end(current, "reconfigured")
                current = None
            if current is None:
                self._start(peer)
        elif kind is Event.ENDPOINT:
            session = self.active.get(peer.name)
            if session is not None and session.peer is peer:
                session.moves += 1
                now = self.clock()
                if session.move_logged is not None and now - session.move_logged < MOVE_LOG_EVERY:
                    return  # a laptop hopping ports: counted, and the end line says how often
                session.move_logged = now
                endpoint = format_endpoint(detail)
                log.info("session %s: endpoint changed to %s", peer.name, endpoint,
                         extra={"fields": {"event": "session_endpoint", "peer": peer.name,
                                           "endpoint": endpoint, "moves": session.moves}})

    def _start(self, peer) -> None:
        self.active[peer.name] = Session(peer, self.clock())
        endpoint = format_endpoint(peer.endpoint)
        log.info("session %s: started from %s", peer.name, endpoint or "?",
                 extra={"fields": {"event": "session_start", "peer": peer.name,
                                   "endpoint": endpoint}})

    def _end(self, session: Session, reason: str) -> None:
        peer = session.peer
        self.active.pop(peer.name, None)
        end = self.clock()
        if reason == "timeout" and peer.last_handshake is not None:
            end = min(end, peer.last_handshake + REJECT_AFTER_TIME)  # when it stopped working
        duration = max(0.0, end - session.started)
        rx, tx = peer.rx_bytes - session.rx0, peer.tx_bytes - session.tx0
        endpoint = format_endpoint(peer.endpoint)
        log.info("session %s: ended (%s) after %s, from %s, received %d B, sent %d B, %d"
                 " endpoint changes", peer.name, _REASONS.get(reason, reason),
                 _duration(duration), endpoint or "?", rx, tx, session.moves,
                 extra={"fields": {"event": "session_end", "peer": peer.name, "reason": reason,
                                   "endpoint": endpoint, "duration_seconds": round(duration, 1),
                                   "rx_bytes": rx, "tx_bytes": tx,
                                   "endpoint_changes": session.moves}})

    def check(self, peers: dict, disabled: set[str] = frozenset()) -> None:
        """End sessions whose handshake is older than 180 s or whose peer left the device.
        `peers` is the hub's name -> (spec, engine peer) table."""
        now = self.clock()
        for name, session in list(self.active.items()):
            entry = peers.get(name)
            if entry is None:
                self._end(session, "disabled" if name in disabled else "removed")
            elif entry[1] is not session.peer:
                self._end(session, "reconfigured")
            elif (session.peer.last_handshake is None
                  or now - session.peer.last_handshake >= REJECT_AFTER_TIME):
                self._end(session, "timeout")

    def close(self, reason: str = "hub stopped") -> None:
        for session in list(self.active.values()):
            self._end(session, reason)


_REASONS = {"timeout": "no handshake for 180 s"}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
