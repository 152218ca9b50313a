"""Noise_IKpsk2 pinned by published bytes, and WireGuard's framing against an independent oracle.

1. The cacophony vector (tests/vectors/noise_ikpsk2_cacophony.json): both handshake messages, the
   handshake hash and four transport messages, byte for byte. WireGuard is this pattern with its
   identifier as prologue, so noise.py takes prologue, ephemeral key and payloads as parameters.
2. The initial chaining key and hash (tests/vectors/wireguard_initial_hashes.json).
3. A whole Device against the `noiseprotocol` PyPI package with fixed ephemeral keys: our
   initiation bytes 8..116 are its message 1, it reads ours and answers, we read its answer, and
   transport data crosses both ways. Framing (type, indices, mac1) is rebuilt here with hashlib,
   not with pytun code, so a shared misreading of the paper cannot hide.
"""

from __future__ import annotations

import hashlib
import struct
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytun.common import noise
from pytun.common.crypto import (AEAD, CONSTRUCTION, DH, DH_pubkey, IDENTIFIER, CryptoFailure,
                                 SessionCipher)
from pytun.common.device import Device
from tests.conftest import load_vector
from tests.enginenet import ipv4, static_key

VEC = load_vector("noise_ikpsk2_cacophony.json")["vector"]


def h(name: str) -> bytes:
    return bytes.fromhex(VEC[name])


def payload(i: int) -> bytes:
    return bytes.fromhex(VEC["messages"][i]["payload"])


def ciphertext(i: int) -> bytes:
    return bytes.fromhex(VEC["messages"][i]["ciphertext"])


# -- 1. the cacophony vector ---------------------------------------------------------------------


def cacophony_handshake():
    """Run both messages with the vector's parameters; return everything the checks need."""
    assert VEC["protocol_name"].encode() == CONSTRUCTION
    prologue = h("init_prologue")
    assert prologue == h("resp_prologue")
    psk = bytes.fromhex(VEC["init_psks"][0])
    i_priv, r_priv = h("init_static"), h("resp_static")
    i_pub, r_pub = DH_pubkey(i_priv), DH_pubkey(r_priv)
    assert r_pub == h("init_remote_static")

    # Initiator writes message 1.
    ck, hh = noise.initial_state(r_pub, prologue)
    e_pub, enc_static, enc_payload, i_ck, i_h = noise.create_initiation(
        ck, hh, static_public=i_pub, static_static=DH(i_priv, r_pub), responder_static=r_pub,
        ephemeral_private=h("init_ephemeral"), payload=payload(0))
    msg1 = e_pub + enc_static + enc_payload

    # Responder reads it.
    ck, hh = noise.initial_state(r_pub, prologue)
    got_static, r_ck, r_h = noise.consume_initiation_static(
        ck, hh, static_private=r_priv, e_pub=msg1[:32], encrypted_static=msg1[32:80])
    got_payload, r_ck, r_h = noise.consume_initiation_payload(
        r_ck, r_h, static_static=DH(r_priv, got_static), encrypted_payload=msg1[80:])

    # Responder writes message 2, initiator reads it.
    re_pub, enc2, r_ck, r_h = noise.create_response(
        r_ck, r_h, ephemeral_private=h("resp_ephemeral"), initiator_ephemeral=msg1[:32],
        initiator_static=got_static, psk=psk, payload=payload(1))
    msg2 = re_pub + enc2
    got_payload2, i_ck, i_h = noise.consume_response(
        i_ck, i_h, ephemeral_private=h("init_ephemeral"), static_private=i_priv,
        responder_ephemeral=msg2[:32], encrypted_payload=msg2[32:], psk=psk)
    return dict(msg1=msg1, msg2=msg2, i_pub=i_pub, got_static=got_static,
                got_payload=got_payload, got_payload2=got_payload2,
                i_ck=i_ck, i_h=i_h, r_ck=r_ck, r_h=r_h)


def test_cacophony_message_1_byte_for_byte():
    run = cacophony_handshake()
    assert run["msg1"].hex() == VEC["messages"][0]["ciphertext"]
    assert run["got_static"] == run["i_pub"]
    assert run["got_payload"] == payload(0)


def test_cacophony_message_2_byte_for_byte():
    run = cacophony_handshake()
    assert run["msg2"].hex() == VEC["messages"][1]["ciphertext"]
    assert run["got_payload2"] == payload(1)


def test_cacophony_handshake_hash_both_sides():
    run = cacophony_handshake()
    assert run["i_h"].hex() == VEC["handshake_hash"]
    assert run["r_h"].hex() == VEC["handshake_hash"]
    assert run["i_ck"] == run["r_ck"]


def test_cacophony_transport_messages_after_split():
    run = cacophony_handshake()
    i_to_r, r_to_i = noise.split(run["i_ck"])
    # Messages 2..5 alternate initiator->responder, responder->initiator; counters 0, 0, 1, 1.
    plan = [(2, i_to_r, 0), (3, r_to_i, 0), (4, i_to_r, 1), (5, r_to_i, 1)]
    for index, key, counter in plan:
        assert AEAD(key, counter, payload(index), b"") == ciphertext(index), index
        # The per-session cipher the data path uses must agree byte for byte.
        assert SessionCipher(key).seal(counter, payload(index)) == ciphertext(index), index
        assert SessionCipher(key).open(counter, ciphertext(index)) == payload(index)


def test_cacophony_split_is_the_same_on_both_sides():
    run = cacophony_handshake()
    assert noise.split(run["i_ck"]) == noise.split(run["r_ck"])


@pytest.mark.parametrize("where", ["ephemeral", "static", "payload"])
def test_tampered_message_1_fails_with_crypto_failure_only(where):
    msg1 = bytearray(ciphertext(0))
    msg1[{"ephemeral": 5, "static": 40, "payload": 100}[where]] ^= 1
    r_priv = h("resp_static")
    ck, hh = noise.initial_state(DH_pubkey(r_priv), h("resp_prologue"))
    with pytest.raises(CryptoFailure):
        s, ck, hh = noise.consume_initiation_static(
            ck, hh, static_private=r_priv, e_pub=bytes(msg1[:32]),
            encrypted_static=bytes(msg1[32:80]))
        noise.consume_initiation_payload(ck, hh, static_static=DH(r_priv, s),
                                         encrypted_payload=bytes(msg1[80:]))


def test_message_2_with_another_psk_fails():
    run = cacophony_handshake()
    prologue = h("init_prologue")
    i_priv, r_pub = h("init_static"), h("init_remote_static")
    ck, hh = noise.initial_state(r_pub, prologue)
    *_, i_ck, i_h = noise.create_initiation(
        ck, hh, static_public=DH_pubkey(i_priv), static_static=DH(i_priv, r_pub),
        responder_static=r_pub, ephemeral_private=h("init_ephemeral"), payload=payload(0))
    with pytest.raises(CryptoFailure):
        noise.consume_response(i_ck, i_h, ephemeral_private=h("init_ephemeral"),
                               static_private=i_priv, responder_ephemeral=run["msg2"][:32],
                               encrypted_payload=run["msg2"][32:], psk=bytes(32))


# -- 2. the initial chaining key and hash ----------------------------------------------------------


def test_initial_chaining_key_and_hash():
    vec = load_vector("wireguard_initial_hashes.json")
    assert vec["construction"].encode() == CONSTRUCTION
    assert vec["identifier"].encode() == IDENTIFIER
    _, responder = static_key("responder")
    ck, hh = noise.initial_state(responder)
    assert ck.hex() == vec["initial_chaining_key"]
    # Hi := HASH(HASH(Ci || IDENTIFIER) || Spub_r), with HASH = BLAKE2s-256 from hashlib.
    expected_h = hashlib.blake2s(bytes.fromhex(vec["initial_hash"]) + responder).digest()
    assert hh == expected_h


def test_tai64n_known_values():
    # TAI64 label of 1970-01-01 00:00:00 UTC is 2^62 + 10 (the leap seconds of 1972).
    assert noise.tai64n(0.0) == bytes.fromhex("400000000000000a" "00000000")
    assert noise.tai64n(1.0) == bytes.fromhex("400000000000000b" "00000000")
    # Nanoseconds are rounded down to a multiple of 2^24 (~16.8 ms): 0.5 s = 500,000,000 ns.
    assert noise.tai64n(0.5)[8:] == struct.pack(">I", 500_000_000 & ~0xFFFFFF)


@given(st.floats(0, 2**33, allow_nan=False), st.floats(0, 2**33, allow_nan=False))
def test_tai64n_never_goes_backwards(a, b):
    a, b = sorted((a, b))
    assert noise.tai64n(a) <= noise.tai64n(b)  # byte order is time order: replay check relies on it
    assert struct.unpack(">I", noise.tai64n(a)[8:])[0] % (1 << 24) == 0


# -- 3. a whole Device against the noiseprotocol package -------------------------------------------

PROTOCOL = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
WALL = 1_700_000_123.456
PSK = bytes(range(32))
INITIATOR_INDEX = 0x11223344
RESPONDER_INDEX = 0x55667788
E_I = bytes(range(100, 132))  # fixed ephemeral private keys
E_R = bytes(range(200, 232))


class ScriptedRng:
    """An rng that hands out scripted bytes in order (checking the sizes asked for), then zeros."""

    def __init__(self, *script: bytes):
        self.script = list(script)

    def __call__(self, n: int) -> bytes:
        if self.script:
            item = self.script.pop(0)
            assert len(item) == n, f"asked for {n} random bytes, script has {len(item)}"
            return item
        return bytes(n)


def tai64n_independent(unix: float) -> bytes:
    secs = int(unix)
    nanos = int(round((unix - secs) * 1e9)) & ~((1 << 24) - 1)
    return struct.pack(">QI", (1 << 62) + 10 + secs, nanos)


def mac1(receiver_public: bytes, msg_alpha: bytes) -> bytes:
    key = hashlib.blake2s(b"mac1----" + receiver_public).digest()
    return hashlib.blake2s(msg_alpha, digest_size=16, key=key).digest()


def oracle(initiator: bool, static_private: bytes, remote_public: bytes | None,
           ephemeral_private: bytes):
    from noise.connection import Keypair, NoiseConnection

    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.set_prologue(IDENTIFIER)
    conn.set_psks(psk=PSK)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static_private)
    if remote_public is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_public)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns that a fixed ephemeral is for testing only
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral_private)
        conn.start_handshake()
    return conn


def transport(receiver: int, counter: int, sealed: bytes) -> bytes:
    return struct.pack("<IIQ", 4, receiver, counter) + sealed


def test_device_initiation_is_noiseprotocols_message_1_and_its_response_is_accepted():
    a_priv, a_pub = static_key("oracle-a")
    b_priv, b_pub = static_key("oracle-b")
    # Device.initiate asks the rng for the sender index (4 bytes), then the ephemeral (32).
    dev = Device(a_priv, rng=ScriptedRng(struct.pack("<I", INITIATOR_INDEX), E_I),
                 wallclock=lambda: WALL)
    dev.add_peer(b_pub, preshared_key=PSK, allowed_ips=["10.0.0.2/32"],
                 endpoint=("192.0.2.2", 51820))
    packet = ipv4("10.0.0.1", "10.0.0.2", b"ping")
    dev.send(packet, 1.0)
    [(init, endpoint)] = dev.net_out
    dev.net_out.clear()
    assert endpoint == ("192.0.2.2", 51820)
    assert len(init) == 148
    assert init[:4] == b"\x01\x00\x00\x00"
    assert init[4:8] == struct.pack("<I", INITIATOR_INDEX)

    timestamp = tai64n_independent(WALL)
    theirs = oracle(True, a_priv, b_pub, E_I).write_message(timestamp)
    assert init[8:116] == bytes(theirs)
    assert init[116:132] == mac1(b_pub, init[:116])
    assert init[132:148] == bytes(16)  # no cookie yet: mac2 is zeros

    # The oracle, as responder, reads our message and answers it.
    resp = oracle(False, b_priv, None, E_R)
    assert bytes(resp.read_message(init[8:116])) == timestamp
    body = bytes(resp.write_message(b""))
    assert len(body) == 48  # e (32) + AEAD of the empty payload (16)
    alpha = struct.pack("<III", 2, RESPONDER_INDEX, INITIATOR_INDEX) + body
    dev.receive(alpha + mac1(a_pub, alpha) + bytes(16), ("192.0.2.2", 51820), 1.1)
    assert dev.drops == {}
    assert [e[0] for e in dev.events] == ["handshake"]

    # The staged packet goes out on the new session, padded to 16, counter 0.
    [(data, _)] = dev.net_out
    assert data[:16] == struct.pack("<IIQ", 4, RESPONDER_INDEX, 0)
    assert resp.decrypt(bytes(data[16:])) == packet + bytes(16 - len(packet) % 16)
    # And the oracle's data comes through to the tunnel.
    reply = ipv4("10.0.0.2", "10.0.0.1", b"pong!")
    dev.receive(transport(INITIATOR_INDEX, 0, resp.encrypt(reply)), ("192.0.2.2", 51820), 1.2)
    assert dev.tun_out == [reply]
    assert dev.drops == {}


def test_device_answers_noiseprotocols_initiation_byte_for_byte():
    a_priv, a_pub = static_key("oracle-a")
    b_priv, b_pub = static_key("oracle-b")
    # Device._receive_initiation asks for the receiver index (4 bytes), then the ephemeral (32).
    dev = Device(b_priv, rng=ScriptedRng(struct.pack("<I", RESPONDER_INDEX), E_R),
                 wallclock=lambda: WALL)
    dev.add_peer(a_pub, preshared_key=PSK, allowed_ips=["10.0.0.1/32"])

    init = oracle(True, a_priv, b_pub, E_I)
    body = bytes(init.write_message(tai64n_independent(WALL)))
    alpha = struct.pack("<II", 1, INITIATOR_INDEX) + body
    dev.receive(alpha + mac1(b_pub, alpha) + bytes(16), ("198.51.100.7", 40000), 5.0)
    assert dev.drops == {}
    [(response, endpoint)] = dev.net_out
    dev.net_out.clear()
    assert endpoint == ("198.51.100.7", 40000)  # answered where the initiation came from
    assert len(response) == 92
    assert response[:12] == struct.pack("<III", 2, RESPONDER_INDEX, INITIATOR_INDEX)
    assert response[60:76] == mac1(a_pub, response[:60])
    assert response[76:92] == bytes(16)

    # Byte for byte what the oracle responder with the same ephemeral writes...
    twin = oracle(False, b_priv, None, E_R)
    twin.read_message(body)
    assert response[12:60] == bytes(twin.write_message(b""))
    # ...and the oracle initiator accepts it.
    assert bytes(init.read_message(response[12:60])) == b""
    assert init.handshake_finished

    # Key confirmation: nothing is sent on the new session until the initiator uses it.
    packet = ipv4("10.0.0.2", "10.0.0.1", b"early")
    dev.send(packet, 5.01)
    assert dev.net_out == []
    hello = ipv4("10.0.0.1", "10.0.0.2", b"hello")
    dev.receive(transport(RESPONDER_INDEX, 0, init.encrypt(hello)), ("198.51.100.7", 40000), 5.1)
    assert dev.tun_out == [hello]
    [(data, _)] = dev.net_out
    assert data[:16] == struct.pack("<IIQ", 4, INITIATOR_INDEX, 0)
    assert init.decrypt(bytes(data[16:]))[:len(packet)] == packet
