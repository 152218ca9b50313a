"""The four WireGuard messages, parsed by (type, exact length), and the IP header peek.

Every parser of untrusted bytes here raises `BadPacket` and nothing else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
TRANSPORT_HEADER_LEN = 16
TAG_LEN = 16  # ChaCha20-Poly1305's tag after every transport payload
TRANSPORT_MIN_LEN = TRANSPORT_HEADER_LEN + TAG_LEN  # a keepalive
# The first four bytes of every transport message (type 4, three reserved zeros): the hot
# path's one-comparison test.
TRANSPORT_PREFIX = bytes([MSG_TRANSPORT, 0, 0, 0])

# Offsets of mac1 / mac2 in the handshake messages.
INITIATION_MAC1 = 116
RESPONSE_MAC1 = 60


class BadPacket(Exception):
    """Untrusted bytes that are not a well-formed message. `reason` names the drop counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_INIT = struct.Struct("<I I 32s 48s 28s 16s 16s")
_RESP = struct.Struct("<I I I 32s 16s 16s 16s")
_COOKIE = struct.Struct("<I I 24s 32s")
TRANSPORT_HDR = struct.Struct("<I I Q")  # type, receiver index, counter
_TRANSPORT_HDR = TRANSPORT_HDR
_U32 = struct.Struct("<I")


@dataclass(slots=True)
class Initiation:
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    def pack_without_macs(self) -> bytes:
        return _INIT.pack(MSG_INITIATION, self.sender, self.ephemeral, self.encrypted_static,
                          self.encrypted_timestamp, b"", b"")[:INITIATION_MAC1]


@dataclass(slots=True)
class Response:
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    def pack_without_macs(self) -> bytes:
        return _RESP.pack(MSG_RESPONSE, self.sender, self.receiver, self.ephemeral,
                          self.encrypted_nothing, b"", b"")[:RESPONSE_MAC1]


@dataclass(slots=True)
class CookieReply:
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE.pack(MSG_COOKIE_REPLY, self.receiver, self.nonce, self.encrypted_cookie)


def message_type(data: Buffer) -> int:
    """The message type, checked against its exact length; raises BadPacket otherwise."""
    n = len(data)
    if n < 4:
        raise BadPacket("short")
    t: int = _U32.unpack_from(data, 0)[0]
    if t == MSG_TRANSPORT:
        if n < TRANSPORT_MIN_LEN:
            raise BadPacket("bad_length")
        return t
    if t == MSG_INITIATION:
        if n != INITIATION_LEN:
            raise BadPacket("bad_length")
        return t
    if t == MSG_RESPONSE:
        if n != RESPONSE_LEN:
            raise BadPacket("bad_length")
        return t
    if t == MSG_COOKIE_REPLY:
        if n != COOKIE_REPLY_LEN:
            raise BadPacket("bad_length")
        return t
    raise BadPacket("bad_type")


def parse_initiation(data: bytes) -> Initiation:
    if len(data) != INITIATION_LEN:
        raise BadPacket("bad_length")
    t, *fields = _INIT.unpack(data)
    if t != MSG_INITIATION:
        raise BadPacket("bad_type")
    return Initiation(*fields)


def parse_response(data: bytes) -> Response:
    if len(data) != RESPONSE_LEN:
        raise BadPacket("bad_length")
    t, *fields = _RESP.unpack(data)
    if t != MSG_RESPONSE:
        raise BadPacket("bad_type")
    return Response(*fields)


def parse_cookie_reply(data: bytes) -> CookieReply:
    if len(data) != COOKIE_REPLY_LEN:
        raise BadPacket("bad_length")
    t, *fields = _COOKIE.unpack(data)
    if t != MSG_COOKIE_REPLY:
        raise BadPacket("bad_type")
    return CookieReply(*fields)


def parse_transport_header(data: Buffer) -> tuple[int, int]:
    """(receiver index, counter) of a transport message."""
    if len(data) < TRANSPORT_MIN_LEN:
        raise BadPacket("bad_length")
    t, receiver, counter = _TRANSPORT_HDR.unpack_from(data, 0)
    if t != MSG_TRANSPORT:
        raise BadPacket("bad_type")
    return int(receiver), int(counter)


def pack_transport_header(receiver: int, counter: int) -> bytes:
    return _TRANSPORT_HDR.pack(MSG_TRANSPORT, receiver, counter)


def ip_packet_length(packet: Buffer) -> int:
    """The length an IPv4/IPv6 header claims, or -1 if `packet` is not a plausible IP packet.

    Used on decrypted payloads to strip WireGuard's zero padding.
    """
    n = len(packet)
    if n < 20:
        return -1
    version = packet[0] >> 4
    if version == 4:
        length: int = (packet[2] << 8) | packet[3]
        if length < 20 or length > n:
            return -1
        return length
    if version == 6 and n >= 40:
        length = 40 + ((packet[4] << 8) | packet[5])  # typed above
        if length > n:
            return -1
        return length
    return -1
