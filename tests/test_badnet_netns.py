"""The hub over a bad network, in namespaces (the hub's side is hubnet.py's):

    laptop (wireguard-go) 192.0.2.66 --- 192.0.2.65 relay 198.51.100.18 --- hub 192.0.2.1
                                         nft: 10 % loss
                                         badnet.RELAY: delay, reorder, duplicate, capture

- 10 % random loss each way, reordering, duplication and delay: the handshake completes by
  retransmission (the relay also drops the first handshake message each way), 20 MB arrive
  with the right hash, every duplicate the relay sent the hub is a counted drop;
- the relay's capture of that whole session holds no static public key, private key,
  preshared key, inner address pair or payload, and the hub's log holds no secret.
"""

from __future__ import annotations

import base64
import random
import time

import pytest

from pytun.common import keys
from pytun.server import state

from .badnet import Relay, io_errors, loss_counted, loss_rule, read_capture
from .conftest import require_tools
from .hubnet import HUB_ENDPOINT, HUB_INNER, Hub, WgGoLaptop
from .netns import ping, topology, wait_until  # noqa: F401 (fixture)
from .test_hub_netns import tcp_transfer

pytestmark = pytest.mark.netns

RELAY_LAN, LAPTOP_LAN = "192.0.2.65", "192.0.2.66"
SIZE = 20 << 20


def _config_value(text: str, key: str) -> str:
    return [line.split("=", 1)[1].strip() for line in text.splitlines()
            if line.split("=", 1)[0].strip() == key][0]


def test_loss_reordering_duplication_and_nothing_in_clear(topology, tmp_path):
    require_tools("wireguard-go", "wg", "nft", "ping")
    hub = Hub(topology, tmp_path)
    hub.admin("access", "add", "everyone", "hub", "tcp/5001")
    hub.start()
    relay_ns, _ = hub.connect_laptop("rel")
    lap = topology.netns("lap")
    topology.veth(relay_ns, f"{RELAY_LAN}/28", lap, f"{LAPTOP_LAN}/28")
    capture = tmp_path / "underlay.cap"
    relay = Relay(relay_ns, RELAY_LAN, 51820, HUB_ENDPOINT, 51820, 40000, seed=3,
                  capture=str(capture))
    loss_rule(relay_ns, [51820, 40000], 10)
    config = hub.add_peer("lossy", "--psk")
    config = config.replace(f"Endpoint = {HUB_ENDPOINT}:51820", f"Endpoint = {RELAY_LAN}:51820")
    assert f"Endpoint = {RELAY_LAN}:51820" in config
    drops_before = hub.drops()
    t0 = time.monotonic()
    WgGoLaptop(lap, tmp_path, config, ipv6=False)
    wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=40,
               what="the handshake through the lossy relay")
    handshake_s = time.monotonic() - t0
    t1 = time.monotonic()
    tcp_transfer(lap, hub.ns, HUB_INNER, SIZE)
    transfer_s = time.monotonic() - t1
    errors = io_errors(hub)
    lost = loss_counted(relay_ns)
    stats = relay.stop()
    drops = {k: v - drops_before.get(k, 0) for k, v in hub.drops().items()}
    up, down = stats["up"], stats["down"]
    up_loss = lost[51820] / (lost[51820] + up["in"])
    print(f"\nhandshake in {handshake_s:.1f} s (first initiation and response dropped); "
          f"{SIZE >> 20} MB in {transfer_s:.1f} s ({SIZE * 8 / transfer_s / 1e6:.1f} Mbit/s); "
          f"nft dropped {lost[51820]} datagrams from the laptop ({100 * up_loss:.1f} %) and "
          f"{lost[40000]} packets from the hub; relay up: {up['in']} in, {up['late']} late, "
          f"dups {up['dup']}; "
          f"down: {down['in']} in, {down['late']} late, dups {down['dup']}; hub drops {drops}")
    assert up["forced_drop"] == 1 and down["forced_drop"] == 1
    assert errors == dict.fromkeys(errors, 0), errors
    # wireguard-go sends one datagram at a time: its side shows the rate itself
    assert 0.08 < up_loss < 0.12, (lost, up)
    assert lost[40000] > 0
    assert up["late"] > 100 and sum(up["dup"].values()) > 100
    # Every duplicate the relay sent the hub is dropped and counted, and nothing else is.
    assert drops.get("replay", 0) == up["dup"].get("4", 0), (drops, up["dup"])
    dup_handshakes = up["dup"].get("1", 0)
    assert drops.get("replayed_initiation", 0) + drops.get("initiation_flood", 0) \
        == dup_handshakes, (drops, up["dup"])

    # The capture of the whole session: no key, no inner address, no payload in clear.
    seen = b"\0".join(d for _, d in read_capture(capture))
    assert len(seen) > SIZE
    hub_private = state.load_private_key(hub.state_dir)
    lap_private = keys.parse_private(_config_value(config, "PrivateKey"))
    psk = base64.b64decode(_config_value(config, "PresharedKey"))
    secrets = {"hub static public key": keys.public_from_private(hub_private),
               "laptop static public key": keys.public_from_private(lap_private),
               "hub private key": hub_private, "laptop private key": lap_private,
               "preshared key": psk}
    for what, raw in list(secrets.items()):
        secrets[what + " (base64)"] = base64.b64encode(raw)
    inner = [bytes([10, 77, 0, 1]), bytes(map(int, hub.show()["lossy"]["address"]
                                               .split("/")[0].split(".")))]
    secrets["inner address pair"] = inner[0] + inner[1]
    secrets["inner address pair, reversed"] = inner[1] + inner[0]
    payload = random.Random(7).randbytes(SIZE)
    for i in range(0, SIZE, SIZE // 64):
        secrets[f"payload at {i}"] = payload[i:i + 16]
    found = [what for what, raw in secrets.items() if raw in seen]
    assert found == [], found
    log = hub.log()
    assert "Traceback" not in log
    for what in ("hub private key", "laptop private key", "preshared key"):
        assert secrets[what + " (base64)"].decode() not in log, what
