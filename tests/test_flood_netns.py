"""A flood of handshake initiations with a valid mac1, in namespaces (topology in hubnet.py):

    attacker (badnet.FLOOD: 2,500 initiations/s from 200 source ports, 20 s) ---------+
    established laptop (pytun-client): ping and a 20 MB transfer during the flood ----+-- hub
    new laptop (stock wireguard-go), started during the flood -----------------------+

Anyone holding a laptop config knows the hub's public key, so can make a valid mac1. Past
`init --under-load N` handshake messages a second the hub answers such an initiation with a
64-byte cookie reply and does no Curve25519 work: never more bytes out than in. A stock laptop
gets through by the cookie exchange (its next retry carries mac2), and sessions already
established carry on.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from pytun.common import keys
from pytun.server import state

from .badnet import FLOOD, io_errors
from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INNER, PY, Hub, OurLaptop, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)
from .test_hub_netns import tcp_transfer

pytestmark = pytest.mark.netns

RATE, SECONDS, PORTS = 2500, 20.0, 200


def test_a_valid_mac1_flood_gets_cookies_only_and_laptops_carry_on(topology, tmp_path):
    require_tools("wireguard-go", "wg", "ping")
    hub = Hub(topology, tmp_path)  # the default threshold: 1,000 handshake messages a second
    hub.admin("access", "add", "everyone", "hub", "tcp/5001")
    hub.start()
    est_ns, _ = hub.connect_laptop()
    OurLaptop(est_ns, tmp_path, hub.add_peer("established"), "established")
    wait_until(lambda: ping(est_ns, HUB_INNER, timeout=1), timeout=15, what="the first laptop")
    new_ns, _ = hub.connect_laptop()
    new_config = hub.add_peer("newcomer")
    attacker, _ = hub.connect_laptop("atk")
    hub_public = keys.parse_public(state.public_key(hub.state_dir)).hex()
    before = hub.drops()
    flood = attacker.popen([PY, "-u", "-c", FLOOD, HUB_ENDPOINT, str(RATE), str(SECONDS),
                            str(PORTS), hub_public], stdout=subprocess.PIPE, text=True)
    assert flood.stdout.readline().strip() == "start"
    t0 = time.monotonic()
    wait_until(lambda: hub.drops().get("cookie_sent", 0) > before.get("cookie_sent", 0),
               timeout=5, what="the hub to be under load")
    under_load_s = time.monotonic() - t0
    pinger = est_ns.popen(["ping", "-n", "-q", "-i", "0.1", "-c", "100", HUB_INNER],
                          stdout=subprocess.PIPE, text=True)
    t1 = time.monotonic()
    WgGoLaptop(new_ns, tmp_path, new_config, ipv6=False)
    wait_until(lambda: ping(new_ns, HUB_INNER, timeout=0.5), timeout=15,
               what="the new laptop's handshake through the cookie exchange")
    newcomer_s = time.monotonic() - t1
    t2 = time.monotonic()
    tcp_transfer(est_ns, hub.ns, HUB_INNER, 20 << 20)
    transfer_s = time.monotonic() - t2
    assert flood.poll() is None, "the flood ended before the laptops' checks"
    ping_out, _ = pinger.communicate(timeout=30)
    answered = int(ping_out.split(" received")[0].rsplit(" ", 1)[1])
    out, _ = flood.communicate(timeout=SECONDS + 30)
    stats = json.loads(out.strip().splitlines()[-1])
    drops = {k: v - before.get(k, 0) for k, v in hub.drops().items() if v != before.get(k, 0)}
    errors = io_errors(hub)
    print(f"\n{stats['sent']} mac1-valid initiations in {stats['seconds']} s "
          f"({stats['sent'] / stats['seconds']:.0f}/s, {stats['sent_bytes']} bytes) from {PORTS} "
          f"ports: {stats['replies']} replies ({stats['reply_bytes']} bytes, sizes "
          f"{stats['sizes']}, types {stats['kinds']}); under load after {under_load_s:.2f} s; "
          f"hub drops {drops}; new wireguard-go laptop in {newcomer_s:.1f} s; established "
          f"laptop: {answered}/100 pings, 20 MB in {transfer_s:.1f} s")
    assert stats["sent"] == int(RATE * SECONDS) and stats["seconds"] < SECONDS * 1.1
    assert set(stats["kinds"]) <= {"3"} and set(stats["sizes"]) <= {"64"}, stats
    assert stats["reply_bytes"] <= stats["sent_bytes"]
    # Every flood initiation was answered with a cookie, or (before load) cost its one X25519.
    assert drops.get("cookie_sent", 0) >= stats["replies"] >= 0.9 * (stats["sent"] - 1000)
    assert drops.get("bad_initiation", 0) <= 1000 + 100  # the first second's, before load
    assert answered >= 95
    assert newcomer_s <= 15
    assert errors == dict.fromkeys(errors, 0), errors
