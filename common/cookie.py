"""mac1, mac2 and cookie replies (whitepaper 5.4.4 and 5.4.7), and per-source handshake limits.

CookieChecker is the receiving side, one per device: it checks mac1 on every handshake message
before any Curve25519 work and, under load, mac2, answering with a cookie reply. CookieGenerator
is the sending side, one per peer: it adds mac1 and, while it holds a fresh cookie, mac2.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any, Callable

from .crypto import HASH, LABEL_COOKIE, LABEL_MAC1, MAC, XAEAD, XAEAD_open, CryptoFailure
from .wire import CookieReply

COOKIE_SECRET_MAX_AGE = 120.0
COOKIE_REFRESH_TIME = 120.0 - 5.0  # an initiator stops using a cookie a little before it rotates
ZERO16 = bytes(16)
Endpoint = tuple[Any, ...]  # a socket address: (host, port) or (host, port, flowinfo, scope)


def source_bytes(endpoint: Endpoint) -> bytes:
    """A stable byte form of a UDP source (IP address then port) to bind a cookie to it."""
    host: str = endpoint[0]
    port: int = endpoint[1]
    packed: bytes = ipaddress.ip_address(host.split("%", 1)[0]).packed
    return packed + port.to_bytes(2, "big")


class CookieChecker:
    __slots__ = ("_mac1_key", "_cookie_key", "_secret", "_secret_born", "_rng")

    def __init__(self, local_static_public: bytes, rng: Callable[[int], bytes]):
        self._mac1_key = HASH(LABEL_MAC1 + local_static_public)
        self._cookie_key = HASH(LABEL_COOKIE + local_static_public)
        self._rng = rng
        self._secret = b""
        self._secret_born: float | None = None

    def check_mac1(self, msg: bytes, mac1_offset: int) -> bool:
        # msg.mac1 := MAC(HASH(LABEL_MAC1 || Spub_m'), msg_alpha)
        expected = MAC(self._mac1_key, msg[:mac1_offset])
        return hmac.compare_digest(expected, msg[mac1_offset:mac1_offset + 16])

    def _cookie(self, src: bytes, now: float) -> bytes:
        # Rm changes every two minutes; the cookie is MAC(Rm, Am), Am the source IP and port.
        if self._secret_born is None or now - self._secret_born >= COOKIE_SECRET_MAX_AGE:
            self._secret = self._rng(32)
            self._secret_born = now
        return MAC(self._secret, src)

    def check_mac2(self, msg: bytes, mac1_offset: int, src: bytes, now: float) -> bool:
        mac2_offset = mac1_offset + 16
        given = msg[mac2_offset:mac2_offset + 16]
        if hmac.compare_digest(given, ZERO16):
            return False
        if self._secret_born is None or now - self._secret_born >= COOKIE_SECRET_MAX_AGE:
            return False  # a cookie from before the current secret is stale
        expected = MAC(MAC(self._secret, src), msg[:mac2_offset])
        return hmac.compare_digest(expected, given)

    def create_reply(self, msg: bytes, mac1_offset: int, receiver: int, src: bytes,
                     now: float) -> bytes:
        nonce = self._rng(24)
        cookie = self._cookie(src, now)
        # msg.cookie := XAEAD(HASH(LABEL_COOKIE || Spub_m), msg.nonce, cookie, M.mac1)
        mac1 = msg[mac1_offset:mac1_offset + 16]
        encrypted = XAEAD(self._cookie_key, nonce, cookie, mac1)
        return CookieReply(receiver, nonce, encrypted).pack()

    def __repr__(self) -> str:
        return "CookieChecker(<redacted>)"


class CookieGenerator:
    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_born", "_last_mac1")

    def __init__(self, remote_static_public: bytes):
        self._mac1_key = HASH(LABEL_MAC1 + remote_static_public)
        self._cookie_key = HASH(LABEL_COOKIE + remote_static_public)
        self._cookie: bytes | None = None
        self._cookie_born = 0.0
        self._last_mac1: bytes | None = None

    def fresh(self, now: float, within: float) -> bool:
        """Did the other side send a cookie reply in the last `within` seconds (it is alive,
        but under load)?"""
        return self._cookie is not None and now - self._cookie_born < within

    def add_macs(self, msg_alpha: bytes, now: float) -> bytes:
        mac1 = MAC(self._mac1_key, msg_alpha)
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_born < COOKIE_REFRESH_TIME:
            mac2 = MAC(self._cookie, msg_alpha + mac1)
        else:
            mac2 = ZERO16
        return msg_alpha + mac1 + mac2

    def consume_reply(self, nonce: bytes, encrypted_cookie: bytes, now: float) -> bool:
        if self._last_mac1 is None:
            return False
        try:
            cookie = XAEAD_open(self._cookie_key, nonce, encrypted_cookie, self._last_mac1)
        except CryptoFailure:
            return False
        self._cookie = cookie
        self._cookie_born = now
        self._last_mac1 = None
        return True

    def __repr__(self) -> str:
        return "CookieGenerator(<redacted>)"


class RateLimiter:
    """Token bucket per source: 20 handshakes a second, bursts of 5; IPv6 counted per /64.

    At most MAX_SOURCES buckets: when that many sources were active within the last second, a
    new source is refused until some go idle, so a flood from random sources cannot grow it."""

    PACKETS_PER_SECOND = 20
    BURST = 5
    MAX_SOURCES = 1 << 14
    __slots__ = ("_buckets", "_last_gc")

    def __init__(self) -> None:
        self._buckets: dict[bytes, list[float]] = {}
        self._last_gc = 0.0

    @staticmethod
    def _key(endpoint: Endpoint) -> bytes:
        packed: bytes = ipaddress.ip_address(endpoint[0].split("%", 1)[0]).packed
        if len(packed) == 16:
            if packed[:12] == b"\0" * 10 + b"\xff\xff":
                return packed[12:]
            return packed[:8]
        return packed

    def allow(self, endpoint: Endpoint, now: float) -> bool:
        key = self._key(endpoint)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_SOURCES:
                self.collect(now)  # scans at most once a second, so a full table stays cheap
                if len(self._buckets) >= self.MAX_SOURCES:
                    return False
            self._buckets[key] = [self.BURST - 1.0, now]
            return True
        tokens = min(self.BURST, bucket[0] + (now - bucket[1]) * self.PACKETS_PER_SECOND)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def collect(self, now: float) -> None:
        """Forget sources idle for over a second whose buckets are full again (a source that
        was made to wait, with tokens below zero, is kept until then)."""
        if now - self._last_gc < 1.0:
            return
        self._last_gc = now
        rate, burst = self.PACKETS_PER_SECOND, self.BURST
        stale = [k for k, (tokens, t) in self._buckets.items()
                 if now - t >= 1.0 and tokens + (now - t) * rate >= burst]
        for k in stale:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
