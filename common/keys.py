"""X25519 keys as `wg genkey` / `wg pubkey` write them: 32 bytes, standard base64 with padding."""

from __future__ import annotations

import base64
import binascii
import os

from . import crypto, files

# Public keys of small order: DH with any of them gives the zero point (or a point the kernel
# refuses). From the WireGuard kernel selftest netns.sh; see tests/vectors/low_order_keys.json.
LOW_ORDER_KEYS = frozenset(
    base64.b64decode(k)
    for k in (
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
        "X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEVc=",
        "7P///////////////////////////////////////38=",
        "7f///////////////////////////////////////38=",
        "7v///////////////////////////////////////38=",
    )
)


class BadKey(ValueError):
    """A key that cannot be used; the message says why and never contains the key."""


def decode_key(text: str, what: str = "key") -> bytes:
    """Decode a base64 key of exactly 32 bytes, as wg(8) accepts it."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise BadKey(f"{what} must be 44 characters of base64 (32 bytes), as `wg genkey` prints")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadKey(f"{what} is not valid base64") from None
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != text:
        raise BadKey(f"{what} is not canonical base64 of 32 bytes, as `wg genkey` prints")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def check_public(raw: bytes, what: str = "public key") -> bytes:
    if len(raw) != 32:
        raise BadKey(f"{what} must be 32 bytes")
    if raw[:31] + bytes([raw[31] & 0x7F]) in LOW_ORDER_KEYS:  # X25519 ignores bit 255
        raise BadKey(f"{what} is a low-order point and can never make a session")
    return raw


def parse_public(text: str, what: str = "public key") -> bytes:
    return check_public(decode_key(text, what), what)


def parse_private(text: str, what: str = "private key") -> bytes:
    raw = decode_key(text, what)
    if raw == bytes(32):
        raise BadKey(f"{what} is all zeros")
    return crypto.clamp(raw)


def parse_psk(text: str, what: str = "preshared key") -> bytes:
    return decode_key(text, what)


def generate_private(random32: bytes | None = None) -> bytes:
    return crypto.clamp(random32 if random32 is not None else os.urandom(32))


def public_from_private(private: bytes) -> bytes:
    return crypto.DH_pubkey(private)


def generate_psk() -> bytes:
    return os.urandom(32)


def write_secret_file(path: str, text: str) -> None:
    """Create (or replace) a file readable by its owner only, mode 0600 from the first byte."""
    files.write_atomic(path, text, mode=0o600)
