"""Enrollment by invite: the laptop makes its key pair, proves a one-time token, gets its config.

Sans-IO: bytes, keys and `now` in, bytes out. The hub's UDP listener and the laptop's socket
live in server/invites.py and client/enroll.py.

The token (`pytun-admin invite NAME` prints it) is one copy-pasteable string:

    pytun1:<base64url, no padding, of>
        hub public key   32   the laptop authenticates the hub by it (no trust on first use)
        invite id         8   random; names the invite in the hub's registry
        secret           32   random, 256 bits; the hub stores only verifier(id, secret)
        name length, name     the peer name the invite is for (the default config file name)
        endpoint length, endpoint   host:port the laptop sends to
        checksum          4   BLAKE2s of the above, so a damaged paste is caught on the laptop

Transport: the hub's own UDP port, with message types WireGuard never uses (WireGuard's are 1 to
4, and stock WireGuard drops anything else), so the operator opens no extra port.

The exchange is Noise IK, the pattern WireGuard itself uses, run by common/noise.py with its own
prologue (PROLOGUE), so no message of one protocol can pass for a message of the other:

    laptop -> hub   REQUEST, always REQUEST_LEN bytes:
        type 0xE0, 0, 0, 0 | e (32) | AEAD(laptop static public key) (48)
        | AEAD(invite id || secret || zero padding) | mac1 (16)
        e, es, s, ss: the request is sealed to the hub's static key with a fresh ephemeral key,
        so a capture reveals neither the secret nor the laptop's public key; `ss`, a DH of the
        laptop's new static key, proves the laptop holds the private key of what it registers.
        The secret travels under an AEAD whose associated data is the handshake hash, which
        commits to the hub key, the ephemeral key and the laptop's public key: it is a proof of
        the secret bound to both, and cannot be cut out and pasted into another request. The
        hub compares verifier(id, secret) with the stored verifier, so the stored hash alone
        (a copy of the registry) cannot enroll anyone. mac1 = MAC(HASH(LABEL_MAC1 || hub
        public key), everything before it) lets the hub drop junk before any X25519.
    hub -> laptop   REPLY, never longer than the request (no amplification):
        type 0xE1, 0, 0, 0 | e (32) | AEAD(status || text)
        e, ee, se: readable only by the holder of the request's ephemeral key and the laptop's
        static key, and only the holder of the hub's static key could have made it, so the
        laptop knows the answer comes from the hub key in the token. status 0: `text` is a
        wg-quick config without a PrivateKey line; status 1: `text` is a one-line error.

Single use is the registry's job (the invite is marked used in the transaction that adds the
peer); a replayed request therefore enrolls nothing. See server/invites.py for the hub's side.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Callable

from . import keys, noise
from .cookie import Endpoint, RateLimiter
from .crypto import DH, DH_pubkey, HASH, MAC, CryptoFailure, clamp
from .wire import Buffer

TOKEN_PREFIX = "pytun1:"
PROLOGUE = b"pytun enroll v1"
LABEL_MAC1 = b"pytun enroll mac1"
VERIFIER_KEY = b"pytun invite verifier v1"

MSG_REQUEST = 0xE0
MSG_REPLY = 0xE1
REQUEST_LEN = 1200  # fits any path (IPv6's minimum MTU is 1280) and bounds every reply
INVITE_ID_LEN = 8
SECRET_LEN = 32
MAX_NAME = 32
MAX_ENDPOINT = 255
CHECKSUM_LEN = 4

_HEADER_LEN = 4
_E = slice(4, 36)
_STATIC = slice(36, 84)
_PAYLOAD_START = 84
_MAC1_START = REQUEST_LEN - 16
PAYLOAD_LEN = _MAC1_START - _PAYLOAD_START - 16  # the request's plaintext, padding included
REPLY_MIN = 36 + 16 + 1
MAX_REPLY_TEXT = REQUEST_LEN - REPLY_MIN

STATUS_OK = 0
STATUS_ERROR = 1


class BadToken(ValueError):
    """A token that cannot be used; the message says why, in one line, without the secret."""


class EnrollFailure(Exception):
    """Untrusted bytes that are not a valid request or reply. `reason` names a counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------- token


@dataclass(frozen=True)
class Token:
    hub_public: bytes
    endpoint: str
    invite_id: bytes
    secret: bytes = field(repr=False)
    name: str

    def encode(self) -> str:
        name, endpoint = self.name.encode(), self.endpoint.encode()
        if not 0 < len(name) <= MAX_NAME or not 0 < len(endpoint) <= MAX_ENDPOINT:
            raise BadToken("a token's name is 1-32 bytes and its endpoint 1-255")
        body = (self.hub_public + self.invite_id + self.secret + bytes([len(name)]) + name
                + bytes([len(endpoint)]) + endpoint)
        if len(self.hub_public) != 32 or len(self.invite_id) != INVITE_ID_LEN \
                or len(self.secret) != SECRET_LEN:
            raise BadToken("a token holds a 32-byte key, an 8-byte id and a 32-byte secret")
        text = base64.urlsafe_b64encode(body + _checksum(body)).rstrip(b"=").decode()
        return TOKEN_PREFIX + text

    @property
    def id_hex(self) -> str:
        return self.invite_id.hex()

    def __repr__(self) -> str:
        return (f"Token(name={self.name!r}, id={self.id_hex}, endpoint={self.endpoint!r},"
                " <redacted>)")


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2s(body, digest_size=CHECKSUM_LEN, person=b"pytunchk").digest()


def new_token(hub_public: bytes, endpoint: str, name: str, rng: Callable[[int], bytes]
              ) -> Token:
    """A fresh token: random invite id and secret from `rng(n) -> bytes`."""
    return Token(hub_public, endpoint, rng(INVITE_ID_LEN), rng(SECRET_LEN), name)


def parse_token(text: str) -> Token:
    """The token `pytun-admin invite` printed; BadToken says what is wrong with it."""
    text = "".join(text.split())  # a token wrapped over lines by a mail client still works
    if not text.startswith(TOKEN_PREFIX):
        raise BadToken(f"not a pytun invite token: it starts with {TOKEN_PREFIX}")
    data = text[len(TOKEN_PREFIX):]
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise BadToken("the token is damaged (not base64url): copy it again, whole") from None
    fixed = 32 + INVITE_ID_LEN + SECRET_LEN
    if len(raw) < fixed + 2 + CHECKSUM_LEN + 2:
        raise BadToken("the token is too short: copy it again, whole")
    body, checksum = raw[:-CHECKSUM_LEN], raw[-CHECKSUM_LEN:]
    if not hmac.compare_digest(_checksum(body), checksum):
        raise BadToken("the token is damaged (its checksum does not match): copy it again, whole")
    hub_public, invite_id, secret = body[:32], body[32:40], body[40:fixed]
    try:
        n = body[fixed]
        name = body[fixed + 1:fixed + 1 + n].decode("ascii")
        rest = body[fixed + 1 + n:]
        m = rest[0]
        endpoint = rest[1:1 + m].decode("ascii")
        if len(name) != n or n == 0 or len(endpoint) != m or m == 0 or len(rest) != 1 + m:
            raise ValueError
    except (IndexError, ValueError):
        raise BadToken("the token's name or endpoint is malformed") from None
    try:
        keys.check_public(hub_public, "the token's hub key")
    except keys.BadKey as exc:
        raise BadToken(str(exc)) from None
    return Token(hub_public, endpoint, invite_id, secret, name)


def verifier(invite_id: bytes, secret: bytes) -> bytes:
    """What the hub stores instead of the secret: keyed BLAKE2s of the id and the secret. The
    secret has 256 bits of entropy, so the verifier cannot be turned back into it."""
    return hashlib.blake2s(invite_id + secret, key=VERIFIER_KEY).digest()


# ---------------------------------------------------------------------------------- laptop


@dataclass(frozen=True)
class Pending:
    """What the laptop keeps to read the hub's reply to one request."""
    hub_public: bytes
    ck: bytes = field(repr=False)
    h: bytes = field(repr=False)
    ephemeral_private: bytes = field(repr=False)
    static_private: bytes = field(repr=False)


def mac1_key(hub_public: bytes) -> bytes:
    return HASH(LABEL_MAC1 + hub_public)


def create_request(token: Token, static_private: bytes,
                   ephemeral_private: bytes) -> tuple[bytes, Pending]:
    """The request datagram for `token`, registering the public key of `static_private`."""
    static_private, ephemeral_private = clamp(static_private), clamp(ephemeral_private)
    hub = token.hub_public
    ck, h = noise.initial_state(hub, PROLOGUE)
    payload = token.invite_id + token.secret
    payload += bytes(PAYLOAD_LEN - len(payload))
    # -> e, es, s, ss, payload
    e_pub, enc_static, enc_payload, ck, h = noise.create_initiation(
        ck, h, static_public=DH_pubkey(static_private), static_static=DH(static_private, hub),
        responder_static=hub, ephemeral_private=ephemeral_private, payload=payload)
    body = bytes([MSG_REQUEST, 0, 0, 0]) + e_pub + enc_static + enc_payload
    datagram = body + MAC(mac1_key(hub), body)
    assert len(datagram) == REQUEST_LEN
    return datagram, Pending(hub, ck, h, ephemeral_private, static_private)


def open_reply_untrusted(pending: Pending, data: bytes) -> tuple[bool, str]:
    """(ok, text) from the hub's reply: the config (ok) or a one-line error. Only the hub that
    holds the token's key could have made a reply this opens; anything else is EnrollFailure."""
    data = bytes(data)
    if not REPLY_MIN <= len(data) <= REQUEST_LEN:
        raise EnrollFailure("bad_length")
    if data[:_HEADER_LEN] != bytes([MSG_REPLY, 0, 0, 0]):
        raise EnrollFailure("bad_type")
    try:
        # <- e, ee, se
        body, _, _ = noise.consume_response(
            pending.ck, pending.h, ephemeral_private=pending.ephemeral_private,
            static_private=pending.static_private, responder_ephemeral=data[4:36],
            encrypted_payload=data[36:])
    except CryptoFailure:
        raise EnrollFailure("bad_reply") from None
    if not body or body[0] not in (STATUS_OK, STATUS_ERROR):
        raise EnrollFailure("bad_status")
    try:
        text = body[1:].decode("utf-8")
    except UnicodeDecodeError:
        raise EnrollFailure("bad_text") from None
    return body[0] == STATUS_OK, text


# ---------------------------------------------------------------------------------- hub


@dataclass(frozen=True)
class Request:
    """An opened request: who wants to enroll with which invite."""
    laptop_public: bytes
    invite_id: bytes
    secret: bytes = field(repr=False)
    ephemeral: bytes = field(repr=False)
    ck: bytes = field(repr=False)
    h: bytes = field(repr=False)


def is_request(data: Buffer) -> bool:
    """The cheap test the hub's receive path makes on a datagram WireGuard does not know."""
    return len(data) >= _HEADER_LEN and data[0] == MSG_REQUEST


def open_request_untrusted(hub_private: bytes, data: bytes) -> Request:
    """Check and open a request with the hub's static private key; EnrollFailure otherwise.
    (The hub checks mac1 and the rate first, with `Gate`; this checks mac1 again.)"""
    data = bytes(data)
    if len(data) != REQUEST_LEN:
        raise EnrollFailure("bad_length")
    if data[:_HEADER_LEN] != bytes([MSG_REQUEST, 0, 0, 0]):
        raise EnrollFailure("bad_type")
    hub_private = clamp(hub_private)
    hub_public = DH_pubkey(hub_private)
    if not hmac.compare_digest(MAC(mac1_key(hub_public), data[:_MAC1_START]), data[_MAC1_START:]):
        raise EnrollFailure("bad_mac1")
    e_pub = data[_E]
    try:
        ck, h = noise.initial_state(hub_public, PROLOGUE)
        laptop_public, ck, h = noise.consume_initiation_static(
            ck, h, static_private=hub_private, e_pub=e_pub, encrypted_static=data[_STATIC])
        keys.check_public(laptop_public)
        if laptop_public == hub_public:
            raise EnrollFailure("own_key")
        payload, ck, h = noise.consume_initiation_payload(
            ck, h, static_static=DH(hub_private, laptop_public),
            encrypted_payload=data[_PAYLOAD_START:_MAC1_START])
    except (CryptoFailure, keys.BadKey):
        raise EnrollFailure("bad_request") from None
    invite_id = payload[:INVITE_ID_LEN]
    secret = payload[INVITE_ID_LEN:INVITE_ID_LEN + SECRET_LEN]
    return Request(laptop_public, invite_id, secret, e_pub, ck, h)


def create_reply(request: Request, ephemeral_private: bytes, ok: bool, text: str) -> bytes:
    """The reply to an opened request: a config without its PrivateKey line (ok), or an error."""
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_REPLY_TEXT:
        raise ValueError(f"a reply holds at most {MAX_REPLY_TEXT} bytes of text, not "
                         f"{len(encoded)}")
    body = bytes([STATUS_OK if ok else STATUS_ERROR]) + encoded
    e_pub, enc_body, _, _ = noise.create_response(
        request.ck, request.h, ephemeral_private=clamp(ephemeral_private),
        initiator_ephemeral=request.ephemeral, initiator_static=request.laptop_public,
        payload=body)
    return bytes([MSG_REPLY, 0, 0, 0]) + e_pub + enc_body


def request_digest(data: Buffer) -> bytes:
    """Names a request byte for byte (the hub answers a repeat of one it enrolled from memory)."""
    return HASH(bytes(data))


class EnrollLimiter(RateLimiter):
    """Requests per source (IPv6 per /64) before any X25519: one a second, bursts of 5, and a
    source whose request carried a wrong invite waits WRONG_INVITE_WAIT seconds more."""

    __slots__ = ()
    PACKETS_PER_SECOND = 1
    BURST = 5
    WRONG_INVITE_WAIT = 10.0

    def penalize(self, endpoint: Endpoint, now: float) -> None:
        key = self._key(endpoint)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_SOURCES:
                return
            bucket = self._buckets[key] = [0.0, now]
        tokens = min(self.BURST, bucket[0] + (now - bucket[1]) * self.PACKETS_PER_SECOND)
        bucket[0] = min(tokens, 0.0) - self.WRONG_INVITE_WAIT * self.PACKETS_PER_SECOND
        bucket[1] = now


class Gate:
    """The hub's checks before any X25519, cheapest first: mac1, then the source's rate."""

    __slots__ = ("_mac1_key", "limiter")

    def __init__(self, hub_public: bytes):
        self._mac1_key = mac1_key(hub_public)
        self.limiter = EnrollLimiter()

    def check_mac1(self, data: Buffer) -> bool:
        if len(data) != REQUEST_LEN:
            return False
        return hmac.compare_digest(MAC(self._mac1_key, bytes(data[:_MAC1_START])),
                                   bytes(data[_MAC1_START:]))

    def allow(self, src: Endpoint, now: float) -> bool:
        return self.limiter.allow(src, now)

    def penalize(self, src: Endpoint, now: float) -> None:
        self.limiter.penalize(src, now)

    def __repr__(self) -> str:
        return "Gate(<redacted>)"
