"""WireGuard's primitives: HASH, MAC, HMAC, KDF1-3, AEAD, XAEAD and DH.

Names follow the whitepaper (section 5.4). BLAKE2s comes from hashlib; X25519 and the
handshake's ChaCha20-Poly1305 from libsodium through PyNaCl's cffi module, XChaCha20-Poly1305
through PyNaCl's bindings. The transport AEAD is a per-session object from
`cryptography` (the same libsodium-grade ChaCha20-Poly1305, without a wrapper's
per-call argument checks); tests check it against PyNaCl byte for byte.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

import nacl.bindings as _sodium
import nacl.exceptions as _nacl_exc
from nacl._sodium import ffi as _ffi, lib as _lib
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
# A 32-byte key is padded with 32 zero bytes, which XOR to these tails.
_IPAD_TAIL = b"\x36" * (_BLOCK - KEY_LEN)
_OPAD_TAIL = b"\x5c" * (_BLOCK - KEY_LEN)
_IPAD_TAIL_1 = _IPAD_TAIL + b"\x01"  # ipad block then KDF's first counter byte
_blake2s = hashlib.blake2s


def _pads(key: bytes) -> tuple[bytes, bytes]:
    """(K ^ ipad, K ^ opad): the key padded to one block, as RFC 2104 prefixes it."""
    if len(key) == KEY_LEN and type(key) is bytes:  # every key of the handshake
        return key.translate(_IPAD) + _IPAD_TAIL, key.translate(_OPAD) + _OPAD_TAIL
    if len(key) > _BLOCK:
        key = HASH(key)
    key = bytes(key).ljust(_BLOCK, b"\0")
    return key.translate(_IPAD), key.translate(_OPAD)


def HMAC(key: bytes, data: bytes) -> bytes:
    """RFC 2104 HMAC over BLAKE2s; twice as fast as hmac.digest's generic path for this hash."""
    ipad, opad = _pads(key)
    return _blake2s(opad + _blake2s(ipad + data).digest()).digest()


# The KDFs inline HMAC and pad t0 once for its two or three uses (21 HMACs per handshake).

def KDF1(key: bytes, data: bytes) -> bytes:
    ipad, opad = _pads(key)
    # t0 := HMAC(key, data); t1 := HMAC(t0, 0x1)
    t0 = _blake2s(opad + _blake2s(ipad + data).digest()).digest()
    return _blake2s(t0.translate(_OPAD) + _OPAD_TAIL
                    + _blake2s(t0.translate(_IPAD) + _IPAD_TAIL_1).digest()).digest()


def KDF2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    ipad, opad = _pads(key)
    # t0 := HMAC(key, data)
    t0 = _blake2s(opad + _blake2s(ipad + data).digest()).digest()
    ipad, opad = t0.translate(_IPAD) + _IPAD_TAIL, t0.translate(_OPAD) + _OPAD_TAIL
    # t1 := HMAC(t0, 0x1); t2 := HMAC(t0, t1 || 0x2)
    t1 = _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()
    t2 = _blake2s(opad + _blake2s(ipad + t1 + b"\x02").digest()).digest()
    return t1, t2


def KDF3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    ipad, opad = _pads(key)
    # t0 := HMAC(key, data)
    t0 = _blake2s(opad + _blake2s(ipad + data).digest()).digest()
    ipad, opad = t0.translate(_IPAD) + _IPAD_TAIL, t0.translate(_OPAD) + _OPAD_TAIL
    # t1 := HMAC(t0, 0x1); t2 := HMAC(t0, t1 || 0x2); t3 := HMAC(t0, t2 || 0x3)
    t1 = _blake2s(opad + _blake2s(ipad + b"\x01").digest()).digest()
    t2 = _blake2s(opad + _blake2s(ipad + t1 + b"\x02").digest()).digest()
    t3 = _blake2s(opad + _blake2s(ipad + t2 + b"\x03").digest()).digest()
    return t1, t2, t3


_NONCE = struct.Struct("<4xQ")


def nonce(counter: int) -> bytes:
    """96-bit ChaCha20-Poly1305 nonce: 32 zero bits then the 64-bit little-endian counter."""
    return _NONCE.pack(counter)


# The handshake AEAD and X25519 call libsodium through PyNaCl's own cffi module: nacl.bindings
# costs ~4 us a call in argument checks and error-string formatting, twice the cipher's cost. The
# checks that keep libsodium inside its buffers (32-byte keys, the length limits) are made here;
# cffi refuses str, bytearray and memoryview buffers with TypeError.
_UCHARS = _ffi.typeof("unsigned char[]")
_AEAD_MAX = _sodium.crypto_aead_chacha20poly1305_ietf_MESSAGEBYTES_MAX


def AEAD(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    size = len(plaintext)
    if len(key) != KEY_LEN or size > _AEAD_MAX:
        raise CryptoFailure("ChaCha20-Poly1305 takes a 32-byte key and a message under its limit")
    out = _ffi.new(_UCHARS, size + TAG_LEN)
    _lib.crypto_aead_chacha20poly1305_ietf_encrypt(out, _ffi.NULL, plaintext, size, ad, len(ad),
                                                    _ffi.NULL, _NONCE.pack(counter), key)
    return bytes(_ffi.buffer(out))


def AEAD_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        size = len(ciphertext) - TAG_LEN
        if size < 0 or size > _AEAD_MAX or len(key) != KEY_LEN:
            raise CryptoFailure("AEAD authentication failed")
        out = _ffi.new(_UCHARS, size)
        failed = _lib.crypto_aead_chacha20poly1305_ietf_decrypt(
            out, _ffi.NULL, _ffi.NULL, ciphertext, size + TAG_LEN, ad, len(ad),
            _NONCE.pack(counter), key)
    except (ValueError, TypeError, OverflowError, struct.error) as exc:
        raise CryptoFailure("AEAD authentication failed") from exc
    if failed:
        raise CryptoFailure("AEAD authentication failed")
    return bytes(_ffi.buffer(out))


def XAEAD(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return _sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce24, key)


def XAEAD_open(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return _sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce24, key)
    except (_nacl_exc.CryptoError, ValueError, TypeError, RuntimeError) as exc:
        raise CryptoFailure("XAEAD authentication failed") from exc


def DH(private: bytes, public: bytes) -> bytes:
    """X25519. A low-order public key gives an all-zero result, refused here."""
    # libsodium reads 32 bytes from each pointer: a short key would be read past its end.
    if len(private) != KEY_LEN or len(public) != KEY_LEN:
        raise CryptoFailure("X25519 keys are 32 bytes")
    private, public = bytes(private), bytes(public)
    out = _ffi.new(_UCHARS, KEY_LEN)
    if _lib.crypto_scalarmult(out, private, public) != 0:
        raise CryptoFailure("X25519 failed (low-order point)")
    shared = bytes(_ffi.buffer(out))
    if _hmac.compare_digest(shared, EMPTY32):
        raise CryptoFailure("X25519 gave the zero point")
    return shared


def DH_pubkey(private: bytes) -> bytes:
    if len(private) != KEY_LEN:
        raise CryptoFailure("X25519 keys are 32 bytes")
    out = _ffi.new(_UCHARS, KEY_LEN)
    if _lib.crypto_scalarmult_base(out, bytes(private)) != 0:
        raise CryptoFailure("X25519 failed")
    return bytes(_ffi.buffer(out))


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

    def seal_into(self, counter: int, plaintext: bytes | bytearray | memoryview, out: bytearray,
                  offset: int = 16) -> None:
        """Seal into `out` from `offset` on (len(plaintext) + 16 bytes), saving a copy."""
        self._aead.encrypt_into(_NONCE.pack(counter), plaintext, None,
                                memoryview(out)[offset:offset + len(plaintext) + TAG_LEN])

    def open(self, counter: int, ciphertext: bytes | bytearray | memoryview) -> bytes:
        try:
            return self._aead.decrypt(_NONCE.pack(counter), ciphertext, None)
        except (InvalidTag, ValueError, TypeError, OverflowError, struct.error) as exc:
            raise CryptoFailure("transport authentication failed") from exc

    def __repr__(self) -> str:
        return "SessionCipher(<redacted>)"
