"""WireGuard's primitives: HASH, MAC, HMAC, KDF1-3, AEAD, XAEAD and DH.

Names follow the whitepaper (section 5.4). BLAKE2s comes from hashlib, X25519 and
XChaCha20-Poly1305 from PyNaCl. The transport AEAD is a per-session object from
`cryptography` (the same libsodium-grade ChaCha20-Poly1305, without a wrapper's
per-call argument checks); tests check it against PyNaCl byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

import nacl.bindings as _sodium
import nacl.exceptions as _nacl_exc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32
TAG_LEN = 16
EMPTY32 = bytes(32)


class CryptoFailure(Exception):
    """Authentication failed or a key was unusable. Never carries key material."""


def HASH(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


_BLOCK = 64  # BLAKE2s block size
_IPAD = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x36 for b in range(256)))
_OPAD = bytes.maketrans(bytes(range(256)), bytes(b ^ 0x5C for b in range(256)))


def HMAC(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2s; twice as fast as hmac.digest's generic path for this hash."""
    if len(key) > _BLOCK:
        key = HASH(key)
    key = bytes(key).ljust(_BLOCK, b"\0")
    inner = hashlib.blake2s(key.translate(_IPAD) + data).digest()
    return hashlib.blake2s(key.translate(_OPAD) + inner).digest()


def KDF1(key: bytes, data: bytes) -> bytes:
    t0 = HMAC(key, data)
    return HMAC(t0, b"\x01")


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = HMAC(key, data)
    t1 = HMAC(t0, b"\x01")
    t2 = HMAC(t0, t1 + b"\x02")
    return t1, t2


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = HMAC(key, data)
    t1 = HMAC(t0, b"\x01")
    t2 = HMAC(t0, t1 + b"\x02")
    t3 = HMAC(t0, t2 + b"\x03")
    return t1, t2, t3


_NONCE = struct.Struct("<4xQ")


def nonce(counter: int) -> bytes:
    """96-bit ChaCha20-Poly1305 nonce: 32 zero bits then the 64-bit little-endian counter."""
    return _NONCE.pack(counter)


def AEAD(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return _sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, nonce(counter), key)


def AEAD_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return _sodium.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, nonce(counter), key)
    except (_nacl_exc.CryptoError, ValueError, TypeError, RuntimeError, struct.error) as exc:
        raise CryptoFailure("AEAD authentication failed") from exc


def XAEAD(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce24, key)


def XAEAD_open(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce24, key)
    except (_nacl_exc.CryptoError, ValueError, TypeError, RuntimeError) as exc:
        raise CryptoFailure("XAEAD authentication failed") from exc


def DH(private: bytes, public: bytes) -> bytes:
    """X25519. A low-order public key gives an all-zero result, refused here."""
    # PyNaCl hands the buffers to libsodium unchecked: a short key would be read past its end.
    if len(private) != KEY_LEN or len(public) != KEY_LEN:
        raise CryptoFailure("X25519 keys are 32 bytes")
    private, public = bytes(private), bytes(public)
    try:
        shared = _sodium.crypto_scalarmult(private, public)
    except (_nacl_exc.CryptoError, ValueError, TypeError, RuntimeError) as exc:
        raise CryptoFailure("X25519 failed (low-order point)") from exc
    if _hmac.compare_digest(shared, EMPTY32):
        raise CryptoFailure("X25519 gave the zero point")
    return shared


def DH_pubkey(private: bytes) -> bytes:
    if len(private) != KEY_LEN:
        raise CryptoFailure("X25519 keys are 32 bytes")
    return _sodium.crypto_scalarmult_base(private)


def clamp(key: bytes) -> bytes:
    b = bytearray(key)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class SessionCipher:
    """One direction of a transport keypair: a ChaCha20-Poly1305 object kept for the session."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        self._aead = ChaCha20Poly1305(key)

    def seal(self, counter: int, plaintext: bytes) -> bytes:
        return self._aead.encrypt(_NONCE.pack(counter), plaintext, None)

    def seal_into(self, counter: int, plaintext, out: bytearray, offset: int = 16) -> None:
        """Seal into `out` from `offset` on (len(plaintext) + 16 bytes), saving a copy."""
        self._aead.encrypt_into(_NONCE.pack(counter), plaintext, None,
                                memoryview(out)[offset:offset + len(plaintext) + TAG_LEN])

    def open(self, counter: int, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(_NONCE.pack(counter), ciphertext, None)
        except (InvalidTag, ValueError, TypeError, OverflowError, struct.error) as exc:
            raise CryptoFailure("transport authentication failed") from exc

    def __repr__(self) -> str:
        return "SessionCipher(<redacted>)"
