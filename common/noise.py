"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s, the handshake of WireGuard (whitepaper 5.4.2-5.4.5).

Pure functions over the chaining key `ck` and hash `h`. The prologue, the ephemeral private key
and the payloads are parameters, so the published Noise test vector checks this code byte for
byte; WireGuard passes IDENTIFIER as prologue, a TAI64N timestamp as first payload and nothing
as second payload. Failures raise crypto.CryptoFailure only.
"""

from __future__ import annotations

import struct

from .crypto import (AEAD, AEAD_open, CONSTRUCTION, DH, DH_pubkey, HASH, IDENTIFIER, KDF1, KDF2,
                     KDF3)

EMPTY_PSK = bytes(32)


def initial_state(responder_static: bytes, prologue: bytes = IDENTIFIER) -> tuple[bytes, bytes]:
    """(ck, h) before the first message, for a responder with this static public key."""
    # Ci := HASH(CONSTRUCTION); Hi := HASH(Ci || IDENTIFIER); Hi := HASH(Hi || Spub_r)
    ck = HASH(CONSTRUCTION)
    h = HASH(ck + prologue)
    h = HASH(h + responder_static)
    return ck, h


def create_initiation(ck: bytes, h: bytes, *, static_public: bytes, static_static: bytes,
                      responder_static: bytes, ephemeral_private: bytes,
                      payload: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Message 1 (-> e, es, s, ss). Returns (e_pub, encrypted_static, encrypted_payload, ck, h).

    `static_static` is DH(Spriv_i, Spub_r), precomputed per peer.
    """
    e_pub = DH_pubkey(ephemeral_private)
    # Ci := KDF1(Ci, Epub_i); Hi := HASH(Hi || Epub_i)
    ck = KDF1(ck, e_pub)
    h = HASH(h + e_pub)
    # (Ci, k) := KDF2(Ci, DH(Epriv_i, Spub_r))
    ck, k = KDF2(ck, DH(ephemeral_private, responder_static))
    # msg.static := AEAD(k, 0, Spub_i, Hi); Hi := HASH(Hi || msg.static)
    enc_static = AEAD(k, 0, static_public, h)
    h = HASH(h + enc_static)
    # (Ci, k) := KDF2(Ci, DH(Spriv_i, Spub_r))
    ck, k = KDF2(ck, static_static)
    # msg.timestamp := AEAD(k, 0, TAI64N(), Hi); Hi := HASH(Hi || msg.timestamp)
    enc_payload = AEAD(k, 0, payload, h)
    h = HASH(h + enc_payload)
    return e_pub, enc_static, enc_payload, ck, h


def consume_initiation_static(ck: bytes, h: bytes, *, static_private: bytes, e_pub: bytes,
                              encrypted_static: bytes) -> tuple[bytes, bytes, bytes]:
    """First half of reading message 1: returns (initiator static public key, ck, h)."""
    ck = KDF1(ck, e_pub)
    h = HASH(h + e_pub)
    # (Cr, k) := KDF2(Cr, DH(Spriv_r, Epub_i))
    ck, k = KDF2(ck, DH(static_private, e_pub))
    initiator_static = AEAD_open(k, 0, encrypted_static, h)
    h = HASH(h + encrypted_static)
    return initiator_static, ck, h


def consume_initiation_payload(ck: bytes, h: bytes, *, static_static: bytes,
                               encrypted_payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Second half, once the peer is known: returns (payload, ck, h)."""
    # (Cr, k) := KDF2(Cr, DH(Spriv_r, Spub_i))
    ck, k = KDF2(ck, static_static)
    payload = AEAD_open(k, 0, encrypted_payload, h)
    h = HASH(h + encrypted_payload)
    return payload, ck, h


def create_response(ck: bytes, h: bytes, *, ephemeral_private: bytes, initiator_ephemeral: bytes,
                    initiator_static: bytes, psk: bytes = EMPTY_PSK,
                    payload: bytes = b"") -> tuple[bytes, bytes, bytes, bytes]:
    """Message 2 (<- e, ee, se, psk). Returns (e_pub, encrypted_payload, ck, h)."""
    e_pub = DH_pubkey(ephemeral_private)
    # Cr := KDF1(Cr, Epub_r); Hr := HASH(Hr || Epub_r)
    ck = KDF1(ck, e_pub)
    h = HASH(h + e_pub)
    # Cr := KDF1(Cr, DH(Epriv_r, Epub_i)); Cr := KDF1(Cr, DH(Epriv_r, Spub_i))
    ck = KDF1(ck, DH(ephemeral_private, initiator_ephemeral))
    ck = KDF1(ck, DH(ephemeral_private, initiator_static))
    # (Cr, tau, k) := KDF3(Cr, Q); Hr := HASH(Hr || tau)
    ck, tau, k = KDF3(ck, psk)
    h = HASH(h + tau)
    # msg.empty := AEAD(k, 0, e, Hr); Hr := HASH(Hr || msg.empty)
    enc_payload = AEAD(k, 0, payload, h)
    h = HASH(h + enc_payload)
    return e_pub, enc_payload, ck, h


def consume_response(ck: bytes, h: bytes, *, ephemeral_private: bytes, static_private: bytes,
                     responder_ephemeral: bytes, encrypted_payload: bytes,
                     psk: bytes = EMPTY_PSK) -> tuple[bytes, bytes, bytes]:
    """Read message 2 as the initiator. Returns (payload, ck, h)."""
    ck = KDF1(ck, responder_ephemeral)
    h = HASH(h + responder_ephemeral)
    ck = KDF1(ck, DH(ephemeral_private, responder_ephemeral))
    ck = KDF1(ck, DH(static_private, responder_ephemeral))
    ck, tau, k = KDF3(ck, psk)
    h = HASH(h + tau)
    payload = AEAD_open(k, 0, encrypted_payload, h)
    h = HASH(h + encrypted_payload)
    return payload, ck, h


def split(ck: bytes) -> tuple[bytes, bytes]:
    """(T_i->r, T_r->i) := KDF2(C, e): the initiator sends with the first and receives with
    the second."""
    return KDF2(ck, b"")


# TAI64N: 8-byte big-endian seconds since 1970 + 2^62 + 10, then 4-byte nanoseconds. The
# nanoseconds are rounded down to 2^24 ns (~16.8 ms) so the timestamp says little about the clock.
_TAI64N = struct.Struct(">QI")
_TAI64_BASE = 0x400000000000000A
_WHITEN = 0x1000000 - 1


def tai64n(unix_seconds: float) -> bytes:
    secs = int(unix_seconds)
    nanos = int((unix_seconds - secs) * 1e9) & ~_WHITEN
    return _TAI64N.pack(_TAI64_BASE + secs, nanos)
