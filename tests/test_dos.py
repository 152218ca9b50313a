"""Hostile datagrams against the sans-IO device: what they cost (Curve25519 operations, counted
at libsodium's door), what they get back (nothing), and how much state they can make it keep."""

from __future__ import annotations

import random

import pytest

from pytun.common import crypto
from pytun.common.cookie import RateLimiter
from pytun.common.crypto import MAC, HASH, LABEL_MAC1
from pytun.common.device import Device
from pytun.common import wire
from pytun.server import admin, state
from pytun.server.hub import Hub
from pytun.server.registry import SqliteRegistry

from .enginenet import WALL0, seeded_rng, static_key

HUB_EP = ("192.0.2.1", 51820)
LAPTOP_EP = ("198.51.100.18", 40000)


class CountingSodium:
    """Stands in for libsodium's cffi module in crypto.py; counts X25519 scalar multiplications."""

    def __init__(self, real):
        self._real = real
        self.x25519 = 0

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name.startswith("crypto_scalarmult"):
            def counted(*args):
                self.x25519 += 1
                return attr(*args)
            return counted
        return attr


@pytest.fixture
def sodium(monkeypatch):
    counter = CountingSodium(crypto._lib)
    monkeypatch.setattr(crypto, "_lib", counter)
    return counter


def hub_and_laptop(**device_kw):
    hub_private, hub_public = static_key("hub")
    laptop_private, laptop_public = static_key("laptop")
    hub = Device(hub_private, rng=seeded_rng("hub"), wallclock=lambda: WALL0, **device_kw)
    hub.add_peer(laptop_public, allowed_ips=[], name="laptop")
    laptop = Device(laptop_private, rng=seeded_rng("laptop"), wallclock=lambda: WALL0 + 1)
    lp = laptop.add_peer(hub_public, endpoint=HUB_EP, allowed_ips=[])
    return hub, hub_public, laptop, lp


def hostile_datagrams(hub_public: bytes, initiation: bytes, response: bytes) -> dict[str, list]:
    rng = random.Random(5)
    bad_mac1 = []
    for _ in range(300):
        body = bytes([1, 0, 0, 0]) + rng.randbytes(wire.INITIATION_MAC1 - 4)
        bad_mac1.append(body + rng.randbytes(32))  # a random mac1
    flipped = bytearray(initiation)
    flipped[wire.INITIATION_MAC1] ^= 1
    bad_mac1.append(bytes(flipped))
    wrong_key = bytearray(initiation)  # a genuine message whose mac1 is made for another hub
    wrong_key[wire.INITIATION_MAC1:wire.INITIATION_MAC1 + 16] = MAC(
        HASH(LABEL_MAC1 + static_key("other hub")[1]), initiation[:wire.INITIATION_MAC1])
    bad_mac1.append(bytes(wrong_key))
    truncated = [initiation[:n] for n in range(len(initiation))]
    truncated += [response[:n] for n in range(len(response))]
    truncated += [initiation + b"\0", response + b"\0"]  # one byte too long is as bad
    truncated += [bytes([3, 0, 0, 0]) + rng.randbytes(n - 4) for n in range(4, wire.COOKIE_REPLY_LEN)]
    truncated += [bytes([4, 0, 0, 0]) + rng.randbytes(n - 4) for n in range(4, wire.TRANSPORT_MIN_LEN)]
    rand = [rng.randbytes(n) for n in range(1501)]
    return {"random": rand, "bad mac1": bad_mac1, "truncated": truncated}


def test_hostile_datagrams_cost_no_curve25519_and_get_no_reply(sodium):
    hub, hub_public, laptop, lp = hub_and_laptop()
    before = sodium.x25519
    laptop.initiate(lp, 0.0)
    (initiation, _), = laptop.net_out
    laptop.net_out.clear()
    assert sodium.x25519 > before  # the counter sees the work a real initiation costs
    response_for_nobody = bytearray(wire.RESPONSE_LEN)
    response_for_nobody[0] = 2
    kinds = hostile_datagrams(hub_public, bytes(initiation), bytes(response_for_nobody))
    report = []
    for kind, datagrams in kinds.items():
        start, drops_before = sodium.x25519, sum(hub.drops.values())
        for i, datagram in enumerate(datagrams):
            hub.receive(datagram, ("203.0.113.66", 1000 + i), 1.0 + i * 1e-4)
        hub.tick(2.0)
        assert sodium.x25519 - start == 0, kind
        assert hub.net_out == [] and hub.events == [], kind
        assert sum(hub.drops.values()) - drops_before == len(datagrams), kind
        report.append(f"{kind}: {len(datagrams)} datagrams, 0 X25519, 0 replies")
    print("\n" + "; ".join(report) + f"; drops {dict(hub.drops)}")
    # The genuine initiation still costs what it should and is answered.
    start = sodium.x25519
    hub.receive(initiation, LAPTOP_EP, 3.0)
    assert len(hub.net_out) == 1 and sodium.x25519 - start == 4  # es, e, ee, se (ss is kept per peer)


def test_under_load_a_flood_with_valid_mac1_costs_no_curve25519(sodium):
    """Anyone who knows the hub's public key can make a valid mac1: under load such initiations
    get a cookie reply (cheap), not a response, and make no rate-limiter state."""
    hub, hub_public, laptop, lp = hub_and_laptop(under_load_threshold=10)
    rng = random.Random(9)
    mac1_key = HASH(LABEL_MAC1 + hub_public)
    start = sodium.x25519
    n = 5000
    for i in range(n):
        body = bytes([1, 0, 0, 0]) + rng.randbytes(wire.INITIATION_MAC1 - 4)
        datagram = body + MAC(mac1_key, body) + bytes(16)
        src = (f"203.0.{rng.randrange(256)}.{rng.randrange(256)}", rng.randrange(1024, 65536))
        hub.receive(datagram, src, 1.0 + i * 1e-5)
    cookies = [d for d, _ in hub.net_out if d[0] == wire.MSG_COOKIE_REPLY]
    dh_while_loaded = sodium.x25519 - start
    print(f"\n{n} mac1-valid initiations from random sources: {dh_while_loaded} X25519 "
          f"(the first {hub.under_load_threshold} before load), {len(cookies)} cookie replies, "
          f"rate limiter {len(hub.rate_limiter)} sources")
    assert hub.under_load(1.0 + n * 1e-5)
    # Before the threshold, each costs one X25519 (it then fails to decrypt the static key).
    assert dh_while_loaded == hub.under_load_threshold
    assert len(cookies) == n - hub.under_load_threshold and len(hub.net_out) == len(cookies)
    assert len(hub.rate_limiter) == 0


def test_the_rate_limiter_has_a_size_bound():
    rl = RateLimiter()
    rng = random.Random(1)
    n = 3 * RateLimiter.MAX_SOURCES
    allowed = sum(rl.allow((f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}."
                            f"{rng.randrange(256)}", 1), 10.0) for _ in range(n))
    v6 = sum(rl.allow((f"2001:db8:{rng.randrange(65536):x}:{rng.randrange(65536):x}::1", 1), 10.0)
             for _ in range(1000))
    print(f"\n{n} + 1000 random sources within one second: {len(rl)} buckets kept "
          f"(bound {RateLimiter.MAX_SOURCES}), {allowed + v6} allowed")
    assert len(rl) == RateLimiter.MAX_SOURCES
    assert allowed == RateLimiter.MAX_SOURCES and v6 == 0
    # A second later the idle sources are forgotten and new ones are welcome again.
    assert rl.allow(("198.51.100.7", 1), 11.5)
    assert len(rl) == 1


def test_the_under_load_threshold_is_a_hub_setting(tmp_path, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com", "--under-load", "250"]) == 0
    settings = state.load_settings(d)
    assert settings.under_load_threshold == 250
    registry = SqliteRegistry(state.registry_path(d))
    try:
        hub = Hub(d, settings, state.load_private_key(d), registry)
        assert hub.device.under_load_threshold == 250
    finally:
        registry.close()
    d2 = str(tmp_path / "default")
    assert admin.main(["--state-dir", d2, "init", "--subnet", "10.77.0.0/24", "--endpoint", "h"]) == 0
    assert state.load_settings(d2).under_load_threshold == 1000
    assert "under_load" not in open(state.settings_path(d2)).read()  # older hubs still read it
    for bad in ("0", "-5", "2000000"):
        rc = admin.main(["--state-dir", str(tmp_path / f"bad{bad}"), "init", "--subnet",
                         "10.77.0.0/24", "--endpoint", "h", "--under-load", bad])
        assert rc == 1 and "under-load threshold must be" in capsys.readouterr().err


def test_under_load_begins_past_the_setting():
    hub, _, laptop, lp = hub_and_laptop(under_load_threshold=3)
    rng = random.Random(2)
    mac1_key = HASH(LABEL_MAC1 + hub.public_key)
    for i in range(4):
        body = bytes([1, 0, 0, 0]) + rng.randbytes(wire.INITIATION_MAC1 - 4)
        hub.receive(body + MAC(mac1_key, body) + bytes(16), ("203.0.113.9", 9), 5.0)
        assert hub.under_load(5.0) == (i == 3), i
