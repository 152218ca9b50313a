"""Expiry and key rotation on a running hub, with stock wireguard-go laptops (see hubnet.py)."""

from __future__ import annotations

import json
import time

import pytest

from pytun.common import config as wgconfig

from .conftest import require_tools
from .hubnet import HUB_INNER, Hub, WgGoLaptop, write_config
from .netns import Topology, ping, wait_until

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def hub(tmp_path_factory, netns_ok):
    require_tools("wireguard-go", "wg", "ping")
    tmp = tmp_path_factory.mktemp("life")
    with Topology() as topo:
        hub = Hub(topo, tmp)
        hub.start()
        yield hub, tmp


def state_of(hub, name: str) -> dict:
    return {p["name"]: p for p in json.loads(hub.admin("show", "--json").stdout)}[name]


def test_a_peer_is_cut_within_a_second_of_its_expiry(hub):
    hub, tmp = hub
    ns, _ = hub.connect_laptop()
    WgGoLaptop(ns, tmp, hub.add_peer("temp", "--ttl", "8s", "--keepalive", "1"))
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=6, what="temp's tunnel")
    expires = state_of(hub, "temp")["expires"]
    assert expires > time.time()  # it is up, and the hub was running before it expired
    while time.time() < expires - 0.5:
        assert ping(ns, HUB_INNER, timeout=0.3), "cut before its time"
    wait_until(lambda: not ping(ns, HUB_INNER, timeout=0.2), timeout=5,
               what="the expired peer to be cut")
    cut = time.time()
    assert cut - expires < 1.5, f"cut {cut - expires:.2f} s after the expiry"
    assert state_of(hub, "temp")["state"] == "expired"
    assert "peer temp expired at" in hub.log()
    assert not ping(ns, HUB_INNER, count=2, timeout=0.5)


def test_rotate_key_cuts_the_old_key_and_the_new_config_connects(hub):
    hub, tmp = hub
    ns, _ = hub.connect_laptop()
    laptop = WgGoLaptop(ns, tmp, hub.add_peer("rot", "--keepalive", "1"))
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=6, what="rot's tunnel")
    new_conf = tmp / "rot-new.conf"
    hub.admin("rotate-key", "rot", "-o", str(new_conf))
    assert wait_until(lambda: not ping(ns, HUB_INNER, timeout=0.3), timeout=2,
                      what="the old key to stop working")
    assert not ping(ns, HUB_INNER, count=2, timeout=0.5)
    # The laptop takes its new config (new private key): back in.
    stripped = write_config(tmp, "rot-new-setconf", wgconfig.strip(new_conf.read_text()))
    ns.run("wg", "setconf", laptop.ifname, stripped)
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=10,
                      what="the new key to connect")


def test_an_enabled_laptop_is_back_within_a_second_or_two(hub):
    """The hub calls a laptop it saw lately when it is enabled again, instead of leaving it
    to the laptop's own retry (REKEY_TIMEOUT plus KEEPALIVE_TIMEOUT: 10-15 s)."""
    hub, tmp = hub
    ns, _ = hub.connect_laptop()
    WgGoLaptop(ns, tmp, hub.add_peer("back", "--keepalive", "25"))
    assert wait_until(lambda: ping(ns, HUB_INNER, timeout=0.5), timeout=6, what="back's tunnel")
    hub.admin("disable-peer", "back")
    assert not ping(ns, HUB_INNER, count=2, timeout=0.5)
    t0 = time.monotonic()
    hub.admin("enable-peer", "back")
    wait_until(lambda: ping(ns, HUB_INNER, timeout=0.3), timeout=8,
               what="the enabled laptop to be back")
    assert time.monotonic() - t0 < 3.0, f"back after {time.monotonic() - t0:.1f} s"
