"""The enrollment protocol (common/enroll.py): token, request and reply, by case table.

Each field of each message is tampered with, one at a time, and the table says which check must
refuse it: mac1 when the tamperer does not recompute it, else the AEAD (or the type check). An
attacker who knows the hub's public key can recompute mac1, so the second column is the one
that matters for security; the first shows the cheap check comes first.
"""

from __future__ import annotations

import base64
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common import enroll, keys, noise
from pytun.common.crypto import DH, HASH, MAC
from pytun.common.enroll import (MSG_REPLY, MSG_REQUEST, REQUEST_LEN, BadToken, EnrollFailure,
                                 Gate, Token)

HUB = keys.generate_private(bytes(range(32)))
HUB_PUB = keys.public_from_private(HUB)
LAPTOP = keys.generate_private(bytes(range(32, 64)))
LAPTOP_PUB = keys.public_from_private(LAPTOP)
E1 = bytes(range(64, 96))
E2 = bytes(range(96, 128))
TOKEN = Token(HUB_PUB, "vpn.example.com:51820", bytes.fromhex("0123456789abcdef"),
              bytes(range(200, 232)), "alice")


def request(token=TOKEN, laptop=LAPTOP, ephemeral=E1):
    return enroll.create_request(token, laptop, ephemeral)


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    b = bytearray(data)
    b[offset] ^= 1 << bit
    return bytes(b)


def with_mac1(data: bytes, hub_public: bytes = HUB_PUB) -> bytes:
    """What an attacker who knows the hub's public key can do after tampering."""
    body = data[:REQUEST_LEN - 16]
    return body + MAC(enroll.mac1_key(hub_public), body)


# -- the token --------------------------------------------------------------------------------


def test_token_round_trip_and_size():
    text = TOKEN.encode()
    assert text.startswith("pytun1:") and len(text) < 160
    assert enroll.parse_token(text) == TOKEN
    # a mail client's line breaks and spaces do not matter
    assert enroll.parse_token(" " + text[:40] + "\n  " + text[40:] + "\n") == TOKEN
    assert "alice" in repr(TOKEN) and TOKEN.secret.hex() not in repr(TOKEN)


def test_token_holds_128_bits_of_secret_at_least():
    t = enroll.new_token(HUB_PUB, "h:1", "bob", random.Random(1).randbytes)
    assert len(t.secret) * 8 >= 128 and len(t.secret) == enroll.SECRET_LEN == 32
    assert len(t.invite_id) == 8


@pytest.mark.parametrize("text, says", [
    ("", "starts with pytun1:"),
    ("wg1:abcd", "starts with pytun1:"),
    ("pytun1:", "too short"),
    ("pytun1:!!!!", "not base64url"),
    ("pytun1:" + "A" * 40, "too short"),
])
def test_token_refused(text, says):
    with pytest.raises(BadToken, match=says):
        enroll.parse_token(text)


def test_every_changed_character_of_a_token_is_caught():
    text = TOKEN.encode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    caught = same = 0
    for i in range(len("pytun1:"), len(text)):
        for c in (alphabet[(alphabet.index(text[i]) + 1) % 64], alphabet[(alphabet.index(text[i]) + 17) % 64]):
            changed = text[:i] + c + text[i + 1:]
            try:
                parsed = enroll.parse_token(changed)
            except BadToken:
                caught += 1
                continue
            # only the unused low bits of the last character may change nothing
            assert i == len(text) - 1 and parsed == TOKEN
            same += 1
    assert caught >= 2 * (len(text) - len("pytun1:") - 1)


def test_token_with_a_low_order_hub_key_is_refused():
    low = next(iter(keys.LOW_ORDER_KEYS))
    with pytest.raises(BadToken, match="low-order"):
        enroll.parse_token(Token(low, "h:1", bytes(8), bytes(32), "a").encode())


def test_token_checksum_covers_a_forged_body():
    raw = base64.urlsafe_b64decode(TOKEN.encode()[7:] + "==")
    forged = raw[:40] + bytes(32) + raw[72:]  # another secret, old checksum
    with pytest.raises(BadToken, match="checksum"):
        enroll.parse_token("pytun1:" + base64.urlsafe_b64encode(forged).decode().rstrip("="))


@settings(max_examples=60, deadline=None)
@given(name=st.from_regex(r"[A-Za-z0-9._@-]{1,32}", fullmatch=True),
       endpoint=st.from_regex(r"[a-z0-9.-]{1,40}:[0-9]{1,5}", fullmatch=True),
       invite_id=st.binary(min_size=8, max_size=8), secret=st.binary(min_size=32, max_size=32))
def test_token_round_trips(name, endpoint, invite_id, secret):
    t = Token(HUB_PUB, endpoint, invite_id, secret, name)
    assert enroll.parse_token(t.encode()) == t


def test_verifier_is_a_keyed_hash_of_id_and_secret():
    v = enroll.verifier(TOKEN.invite_id, TOKEN.secret)
    assert len(v) == 32 and TOKEN.secret not in v
    assert v != enroll.verifier(TOKEN.invite_id, flip(TOKEN.secret, 31))
    assert v != enroll.verifier(flip(TOKEN.invite_id, 0), TOKEN.secret)
    assert v != HASH(TOKEN.invite_id + TOKEN.secret)  # keyed: not a plain hash


# -- the request --------------------------------------------------------------------------------


def test_request_round_trip():
    data, pending = request()
    assert len(data) == REQUEST_LEN and data[:4] == bytes([MSG_REQUEST, 0, 0, 0])
    req = enroll.open_request_untrusted(HUB, data)
    assert req.laptop_public == LAPTOP_PUB
    assert req.invite_id == TOKEN.invite_id and req.secret == TOKEN.secret
    assert "secret" not in repr(req) or TOKEN.secret.hex() not in repr(req)
    reply = enroll.create_reply(req, E2, True, "[Interface]\n")
    assert enroll.open_reply_untrusted(pending, reply) == (True, "[Interface]\n")


def test_a_capture_reveals_neither_secret_nor_id_nor_laptop_key():
    data, _ = request()
    for hidden in (TOKEN.secret, TOKEN.secret[:8], TOKEN.invite_id, LAPTOP_PUB, LAPTOP_PUB[:8],
                   LAPTOP, LAPTOP[:8]):
        assert hidden not in data
    req = enroll.open_request_untrusted(HUB, data)
    reply = enroll.create_reply(req, E2, True, "Address = 10.77.0.2/32\n")
    assert b"10.77" not in reply and b"Address" not in reply


def test_requests_from_the_same_token_differ_by_ephemeral():
    a, _ = request(ephemeral=E1)
    b, _ = request(ephemeral=E2)
    assert a[4:36] != b[4:36] and a[36:] != b[36:]


REQUEST_FIELDS = [
    # field, offsets, refused without a new mac1, refused with a new mac1
    ("type", (0,), "bad_type", "bad_type"),
    ("reserved", (1, 2, 3), "bad_type", "bad_type"),
    ("ephemeral", (4, 20, 35), "bad_mac1", "bad_request"),
    ("encrypted static key", (36, 67, 68, 83), "bad_mac1", "bad_request"),
    ("encrypted invite id", (84, 91), "bad_mac1", "bad_request"),
    ("encrypted secret", (92, 123), "bad_mac1", "bad_request"),
    ("encrypted padding", (124, 700, 1167), "bad_mac1", "bad_request"),
    ("payload tag", (1168, 1183), "bad_mac1", "bad_request"),
    ("mac1", (1184, 1199), "bad_mac1", "bad_mac1"),
]


@pytest.mark.parametrize("field, offsets, plain, remac", REQUEST_FIELDS,
                         ids=[f[0] for f in REQUEST_FIELDS])
def test_request_tampering_case_table(field, offsets, plain, remac):
    data, _ = request()
    gate = Gate(HUB_PUB)
    for offset, bit in itertools.product(offsets, (0, 7)):
        bad = flip(data, offset, bit)
        with pytest.raises(EnrollFailure) as exc:
            enroll.open_request_untrusted(HUB, bad)
        assert exc.value.reason == plain, f"{field} byte {offset} bit {bit}"
        assert not gate.check_mac1(bad)  # mac1 covers every byte before it
        if field != "mac1":
            with pytest.raises(EnrollFailure) as exc:
                enroll.open_request_untrusted(HUB, with_mac1(bad))
            assert exc.value.reason == remac, f"{field} byte {offset} bit {bit}, new mac1"
    assert gate.check_mac1(data)
    # the table covers every byte of the request
    covered = {o for _, offsets, _, _ in REQUEST_FIELDS for o in offsets}
    assert min(covered) == 0 and max(covered) == REQUEST_LEN - 1


@pytest.mark.parametrize("cut", [0, 3, 4, 100, REQUEST_LEN - 1])
def test_request_of_another_length_is_refused(cut):
    data, _ = request()
    for bad in (data[:cut], data + bytes(REQUEST_LEN + 1 - len(data) if cut == 0 else 1)):
        with pytest.raises(EnrollFailure) as exc:
            enroll.open_request_untrusted(HUB, bad)
        assert exc.value.reason == "bad_length"
        assert not Gate(HUB_PUB).check_mac1(bad)


def test_a_request_for_another_hub_is_dropped_before_any_dh():
    other = keys.generate_private(bytes(range(1, 33)))
    data, _ = request()
    with pytest.raises(EnrollFailure) as exc:
        enroll.open_request_untrusted(other, data)
    assert exc.value.reason == "bad_mac1"
    assert not Gate(keys.public_from_private(other)).check_mac1(data)
    # and with mac1 made for it, the AEAD still refuses
    with pytest.raises(EnrollFailure) as exc:
        enroll.open_request_untrusted(other, with_mac1(data, keys.public_from_private(other)))
    assert exc.value.reason == "bad_request"


def test_the_proof_cannot_be_spliced_into_another_request():
    """The secret's ciphertext of one request, pasted into another laptop's request."""
    a, _ = request(laptop=LAPTOP, ephemeral=E1)
    other = keys.generate_private(bytes(range(7, 39)))
    b, _ = request(laptop=other, ephemeral=E2)
    for spliced in (b[:84] + a[84:1184], a[:36] + b[36:84] + a[84:1184],
                    b[:4] + a[4:36] + b[36:1184]):
        with pytest.raises(EnrollFailure) as exc:
            enroll.open_request_untrusted(HUB, with_mac1(spliced))
        assert exc.value.reason == "bad_request"


def _hand_made_request(static_public: bytes, static_static: bytes) -> bytes:
    ck, h = noise.initial_state(HUB_PUB, enroll.PROLOGUE)
    e_pub, enc_s, enc_p, _, _ = noise.create_initiation(
        ck, h, static_public=static_public, static_static=static_static,
        responder_static=HUB_PUB, ephemeral_private=E1,
        payload=TOKEN.invite_id + TOKEN.secret + bytes(enroll.PAYLOAD_LEN - 40))
    return with_mac1(bytes([MSG_REQUEST, 0, 0, 0]) + e_pub + enc_s + enc_p + bytes(16))


def test_a_low_order_laptop_key_or_the_hubs_own_key_is_refused():
    for low in keys.LOW_ORDER_KEYS:
        with pytest.raises(EnrollFailure) as exc:
            enroll.open_request_untrusted(HUB, _hand_made_request(low, bytes(32)))
        assert exc.value.reason == "bad_request"
    with pytest.raises(EnrollFailure) as exc:
        enroll.open_request_untrusted(HUB, _hand_made_request(HUB_PUB, DH(HUB, HUB_PUB)))
    assert exc.value.reason == "own_key"


def test_a_laptop_must_hold_the_private_key_it_registers():
    """ss: a request naming someone else's public key without its private key is refused."""
    victim = keys.public_from_private(keys.generate_private(bytes(range(3, 35))))
    with pytest.raises(EnrollFailure) as exc:
        enroll.open_request_untrusted(HUB, _hand_made_request(victim, DH(LAPTOP, HUB_PUB)))
    assert exc.value.reason == "bad_request"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=REQUEST_LEN - 4, max_size=REQUEST_LEN - 4))
def test_random_requests_raise_only_enroll_failure(tail):
    data = bytes([MSG_REQUEST, 0, 0, 0]) + tail
    for d in (data, with_mac1(data)):
        with pytest.raises(EnrollFailure):
            enroll.open_request_untrusted(HUB, d)


# -- the reply ----------------------------------------------------------------------------------


def _reply(ok=True, text="[Interface]\nAddress = 10.77.0.2/32\n"):
    data, pending = request()
    req = enroll.open_request_untrusted(HUB, data)
    return enroll.create_reply(req, E2, ok, text), pending, req


def test_error_reply_round_trip():
    reply, pending, _ = _reply(False, "this invite was revoked")
    assert enroll.open_reply_untrusted(pending, reply) == (False, "this invite was revoked")


def test_reply_tampering_case_table():
    reply, pending, _ = _reply()
    n = len(reply)
    cases = [("type", 0, "bad_type"), ("reserved", 2, "bad_type"), ("ephemeral", 4, "bad_reply"),
             ("ephemeral end", 35, "bad_reply"), ("status", 36, "bad_reply"),
             ("text", 40, "bad_reply"), ("tag", n - 1, "bad_reply")]
    for field, offset, reason in cases:
        for bit in (0, 7):
            with pytest.raises(EnrollFailure) as exc:
                enroll.open_reply_untrusted(pending, flip(reply, offset, bit))
            assert exc.value.reason == reason, field
    for bad in (reply[:-1], reply + b"\0", reply[:enroll.REPLY_MIN - 1], bytes(REQUEST_LEN + 1)):
        with pytest.raises(EnrollFailure):
            enroll.open_reply_untrusted(pending, bad)


def test_reply_from_another_key_or_for_another_request_is_refused():
    data, pending = request()
    impostor = keys.generate_private(bytes(range(5, 37)))
    # an impostor that could read the request (it cannot) still lacks the hub's key for `es`
    real = enroll.open_request_untrusted(HUB, data)
    fake = enroll.Request(real.laptop_public, real.invite_id, real.secret, real.ephemeral,
                          *noise.initial_state(keys.public_from_private(impostor), enroll.PROLOGUE))
    with pytest.raises(EnrollFailure) as exc:
        enroll.open_reply_untrusted(pending, enroll.create_reply(fake, E2, True, "x"))
    assert exc.value.reason == "bad_reply"
    # the hub's genuine reply to another request (another laptop's) does not open either
    other_data, _ = request(laptop=keys.generate_private(bytes(range(9, 41))), ephemeral=E2)
    other = enroll.open_request_untrusted(HUB, other_data)
    with pytest.raises(EnrollFailure):
        enroll.open_reply_untrusted(pending, enroll.create_reply(other, E1, True, "x"))


def test_a_reply_is_never_longer_than_the_request():
    reply, _, req = _reply(True, "x" * enroll.MAX_REPLY_TEXT)
    assert len(reply) == REQUEST_LEN and reply[0] == MSG_REPLY
    with pytest.raises(ValueError):
        enroll.create_reply(req, E2, True, "x" * (enroll.MAX_REPLY_TEXT + 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=REQUEST_LEN + 2))
def test_random_replies_raise_only_enroll_failure(data):
    _, pending = request()
    with pytest.raises(EnrollFailure):
        enroll.open_reply_untrusted(pending, bytes([MSG_REPLY, 0, 0, 0]) + data)


# -- the gate: per-source limits before any X25519 -------------------------------------------------


def test_limiter_bursts_then_one_a_second():
    gate, src = Gate(HUB_PUB), ("198.51.100.2", 40000)
    assert [gate.allow(src, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert not gate.allow(src, 0.5)
    assert gate.allow(src, 1.6) and not gate.allow(src, 1.7)
    assert gate.allow(("198.51.100.3", 1), 1.7)  # another source has its own bucket


def test_a_wrong_invite_makes_its_source_wait():
    gate, src = Gate(HUB_PUB), ("198.51.100.2", 40000)
    assert gate.allow(src, 0.0)
    gate.penalize(src, 0.0)
    wait = enroll.EnrollLimiter.WRONG_INVITE_WAIT
    assert not any(gate.allow(src, t) for t in (0.1, 1.0, wait / 2, wait - 0.1))
    assert gate.allow(src, wait + 1.0)
    # the port does not matter, and an IPv6 source is counted per /64
    gate.penalize(("2001:db8::1", 1), 100.0)
    assert not gate.allow(("2001:db8::ffff", 2), 100.5)
    assert gate.allow(("2001:db8:1::1", 2), 100.5)


def test_collect_keeps_a_waiting_source():
    gate = Gate(HUB_PUB)
    gate.penalize(("198.51.100.2", 1), 0.0)
    gate.allow(("198.51.100.3", 1), 0.0)
    gate.limiter.collect(5.0)
    assert len(gate.limiter) == 1  # the idle, full one went; the waiting one stayed
    assert not gate.allow(("198.51.100.2", 1), 5.0)
