"""Keys as `wg genkey` / `wg pubkey` write them, and the refusals around them."""

from __future__ import annotations

import base64
import os
import stat
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytun.common import crypto, keys
from pytun.common.keys import BadKey
from tests.conftest import load_vector, require_tools

LOW_ORDER_TEXT = load_vector("low_order_keys.json")["keys"]


@given(st.binary(min_size=32, max_size=32))
def test_encode_decode_round_trip(raw):
    text = keys.encode_key(raw)
    assert len(text) == 44 and text.endswith("=")
    assert keys.decode_key(text) == raw
    assert keys.decode_key(f"  {text}\n") == raw  # as read from a file


SECRET = keys.encode_key(bytes(range(1, 33)))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n",
        SECRET[:-1],  # 43 characters
        SECRET[:-1] + "==",  # 45
        SECRET[:-2] + "==",  # 44 characters but 31 bytes
        SECRET.rstrip("="),  # no padding
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(bytes(48)).decode(),
        "!" + SECRET[1:],
        SECRET[:10] + " " + SECRET[11:],
        base64.urlsafe_b64encode(bytes([0xFB]) * 32).decode(),  # '-' and '_' are not wg's alphabet
        "=" * 44,
    ],
)
def test_malformed_keys_are_refused_without_echoing_them(text):
    with pytest.raises(BadKey) as info:
        keys.decode_key(text, "peer public key")
    message = str(info.value)
    assert "peer public key" in message
    if text.strip():
        assert text.strip() not in message
        assert text.strip()[:8] not in message


def test_non_canonical_base64_is_refused_like_wg():
    # The character before '=' carries 4 key bits and 2 bits that must be zero. Python's decoder
    # ignores those 2 bits; wg's key_from_base64 refuses the key. Two spellings of one key would
    # defeat comparing keys by their text (e.g. a UNIQUE column in the registry).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    canonical = keys.encode_key(bytes(32))
    other = canonical[:42] + alphabet[alphabet.index(canonical[42]) | 1] + "="
    assert base64.b64decode(other) == bytes(32)
    with pytest.raises(BadKey):
        keys.decode_key(other)


def test_bad_key_is_a_value_error():
    assert issubclass(BadKey, ValueError)


def test_low_order_list_is_the_vector_file():
    assert keys.LOW_ORDER_KEYS == {base64.b64decode(k) for k in LOW_ORDER_TEXT}
    assert len(keys.LOW_ORDER_KEYS) == 7


@pytest.mark.parametrize("text", LOW_ORDER_TEXT)
def test_low_order_public_keys_are_refused(text):
    with pytest.raises(BadKey) as info:
        keys.parse_public(text)
    assert text not in str(info.value)
    with pytest.raises(BadKey):
        keys.check_public(base64.b64decode(text))


def test_low_order_public_keys_with_the_top_bit_set_are_refused():
    # X25519 ignores bit 255, so these are the same seven points. crypto.DH still refuses them
    # (see test_crypto), but the configuration-time check should too.
    refused = 0
    for text in LOW_ORDER_TEXT:
        raw = base64.b64decode(text)
        try:
            keys.check_public(raw[:31] + bytes([raw[31] | 0x80]))
        except BadKey:
            refused += 1
    assert refused == len(LOW_ORDER_TEXT)


def test_check_public_length():
    for raw in (b"", bytes(31), bytes(33)):
        with pytest.raises(BadKey):
            keys.check_public(raw)


def test_parse_public_accepts_a_real_key():
    public = crypto.DH_pubkey(keys.generate_private(os.urandom(32)))
    assert keys.parse_public(keys.encode_key(public)) == public


def test_private_keys():
    with pytest.raises(BadKey) as info:
        keys.parse_private(keys.encode_key(bytes(32)))
    assert "zero" in str(info.value)
    unclamped = b"\xff" * 32
    assert keys.parse_private(keys.encode_key(unclamped)) == crypto.clamp(unclamped)
    private = keys.generate_private()
    assert private == crypto.clamp(private)
    assert keys.generate_private(b"\x01" * 32) == crypto.clamp(b"\x01" * 32)
    assert keys.public_from_private(private) == crypto.DH_pubkey(private)


def test_psk():
    psk = keys.generate_psk()
    assert len(psk) == 32
    assert keys.parse_psk(keys.encode_key(psk)) == psk
    assert keys.generate_psk() != psk
    with pytest.raises(BadKey):
        keys.parse_psk("not a key")


def _wg(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_wg_genkey_pubkey_compatibility():
    require_tools("wg")
    for _ in range(5):
        private_text = _wg("genkey")
        expected = _wg("pubkey", stdin=private_text + "\n")
        private = keys.parse_private(private_text)
        assert keys.encode_key(keys.public_from_private(private)) == expected
        assert keys.parse_public(expected) == keys.public_from_private(private)
    # And the other way: our key, wg's public key. An unclamped private key checks the clamping.
    raw = b"\xff" + os.urandom(30) + b"\xff"
    ours = keys.public_from_private(keys.parse_private(keys.encode_key(raw)))
    assert _wg("pubkey", stdin=keys.encode_key(raw) + "\n") == keys.encode_key(ours)
    assert len(keys.parse_psk(_wg("genpsk"))) == 32


def test_write_secret_file_is_0600_from_the_start(tmp_path):
    path = tmp_path / "server.key"
    old_umask = os.umask(0)
    try:
        keys.write_secret_file(str(path), SECRET + "\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == SECRET + "\n"
        # Replacing a world-readable file leaves a 0600 one.
        path.chmod(0o644)
        keys.write_secret_file(str(path), "second\n")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "second\n"
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]  # no temporary left
