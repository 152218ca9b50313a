"""The engine's cost in-process: microseconds per packet and handshakes per second, one core.

    python3 bench/engine.py [--quick] [--json]

No root, no sockets: two sans-IO Devices with a session between them. A packet's cost is the
time of `Device.send` (allowed-IPs lookup, padding, seal, header; the encrypt path) and of
`Device.receive` (index lookup, replay check, open, source filter; the decrypt path), shown
next to the bare AEAD calls the engine could be compared with: PyNaCl's
`crypto_aead_chacha20poly1305_ietf_encrypt` and `cryptography`'s `ChaCha20Poly1305` object (the
one the engine uses). Every figure is the best of a few repeats, as timeit does, and every
time is this process's CPU time (time.process_time), so other load on the machine disturbs it
less; the cyclic garbage collector stays on, as in a running hub.

Handshakes: one responder Device and N initiator Devices, each completing a full handshake
(initiation, response, the initiator's first keepalive that confirms the session) through
`Device.initiate` and `Device.receive`; the two ends' time is summed separately. The
responder-only rate times nothing but the responder consuming N pre-generated initiations and
writing the responses. The under-load defence (cookie replies above 1,000 handshakes a second)
is switched off so that the handshake itself is measured.

Prints figures; never judges them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import struct
import sys
from time import process_time as clock

import cryptography
import nacl
import nacl.bindings
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pytun.common.crypto import clamp
from pytun.common.device import Device

HUB_EP = ("192.0.2.1", 51820)
LAPTOP_EP = ("192.0.2.2", 51820)
HUB_INNER, LAPTOP_INNER = "10.77.0.1", "10.77.0.2"
NOW = 1.0
NO_LOAD = 1 << 62  # under_load_threshold that is never reached
SIZES = (1420, 64)

PACKET_ROWS = (
    ("device_send", "Device.send (encrypt path)"),
    ("device_receive", "Device.receive (decrypt path)"),
    ("nacl_encrypt", "PyNaCl AEAD encrypt (bare)"),
    ("nacl_decrypt", "PyNaCl AEAD decrypt (bare)"),
    ("cryptography_encrypt", "cryptography AEAD encrypt (bare)"),
    ("cryptography_decrypt", "cryptography AEAD decrypt (bare)"),
)
HANDSHAKE_ROWS = (
    ("full_per_s", "full handshakes/s (both ends, one core)"),
    ("initiator_us", "initiator us/handshake"),
    ("responder_us", "responder us/handshake"),
    ("responder_only_per_s", "responder-only handshakes/s"),
)


def new_key() -> bytes:
    return clamp(os.urandom(32))


def ipv4_udp(src: str, dst: str, size: int) -> bytes:
    """An IPv4/UDP packet of exactly `size` bytes (at least 28)."""
    payload = bytes(size - 28)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return header + struct.pack("!HHHH", 40000, 5201, size - 20, 0) + payload


def _take_one(device: Device) -> bytes:
    """The single datagram a step must have produced."""
    out, device.net_out = device.net_out, []
    if len(out) != 1:
        raise RuntimeError(f"expected one datagram, got {len(out)}; drops: {dict(device.drops)}")
    return out[0][0]


def initiators(responder: Device, n: int, first_address: int = 2) -> list:
    """n (device, peer-of-responder, endpoint) initiators, each known to the responder."""
    out = []
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    for i in range(n):
        dev = Device(new_key(), under_load_threshold=NO_LOAD)
        peer = dev.add_peer(responder.public_key, allowed_ips=["10.64.0.0/16"], endpoint=HUB_EP)
        inner = ipaddress.IPv4Address(base + first_address + i)
        responder.add_peer(dev.public_key, allowed_ips=[f"{inner}/32"])
        out.append((dev, peer, ("198.51.100.2", 1024 + i % 60000)))
    return out


def handshake(ini: Device, ini_peer, responder: Device, src,
              now: float = NOW) -> tuple[float, float]:
    """One full handshake; returns the (initiator, responder) CPU seconds it took."""
    t0 = clock()
    ini.initiate(ini_peer, now)
    t1 = clock()
    initiation = _take_one(ini)
    t2 = clock()
    responder.receive(initiation, src, now)
    t3 = clock()
    response = _take_one(responder)
    t4 = clock()
    ini.receive(response, HUB_EP, now)
    t5 = clock()
    keepalive = _take_one(ini)
    t6 = clock()
    responder.receive(keepalive, src, now)
    t7 = clock()
    if ini_peer.current is None:
        raise RuntimeError(f"handshake did not complete; drops: {dict(responder.drops)}")
    return (t1 - t0) + (t5 - t4), (t3 - t2) + (t7 - t6)


def handshake_costs(n: int) -> dict:
    """Full handshakes through Device.receive, and the responder alone on pre-made initiations."""
    responder = Device(new_key(), under_load_threshold=NO_LOAD)
    t_ini = t_resp = 0.0
    for dev, peer, src in initiators(responder, n):
        a, b = handshake(dev, peer, responder, src)
        t_ini += a
        t_resp += b
    if len(responder.keypairs) != n:
        raise RuntimeError(f"{len(responder.keypairs)} sessions after {n} handshakes")

    responder = Device(new_key(), under_load_threshold=NO_LOAD)
    made = []
    for dev, peer, src in initiators(responder, n):
        dev.initiate(peer, NOW)
        made.append((_take_one(dev), src))
    receive = responder.receive
    t0 = clock()
    for datagram, src in made:
        receive(datagram, src, NOW)
    t_only = clock() - t0
    if len(responder.net_out) != n:
        raise RuntimeError(f"{len(responder.net_out)} responses to {n} initiations; "
                           f"drops: {dict(responder.drops)}")
    return {"n": n, "full_per_s": n / (t_ini + t_resp), "initiator_us": t_ini / n * 1e6,
            "responder_us": t_resp / n * 1e6, "responder_only_per_s": n / t_only}


def session_pair() -> tuple[Device, Device]:
    """A laptop Device and a hub Device with a confirmed session between them."""
    hub = Device(new_key(), under_load_threshold=NO_LOAD)
    lap = Device(new_key(), under_load_threshold=NO_LOAD)
    lap_peer = lap.add_peer(hub.public_key, allowed_ips=["10.77.0.0/24"], endpoint=HUB_EP)
    hub.add_peer(lap.public_key, allowed_ips=[f"{LAPTOP_INNER}/32"])
    handshake(lap, lap_peer, hub, LAPTOP_EP)
    return lap, hub


def _best(run, repeats: int) -> float:
    """The least of `repeats` timings of run(), which returns (seconds, count)."""
    return min(seconds / count for seconds, count in (run() for _ in range(repeats)))


def packet_costs(n: int, repeats: int) -> dict:
    """{row: {size: microseconds per packet}} for the rows of PACKET_ROWS."""
    lap, hub = session_pair()
    out: dict = {key: {} for key, _ in PACKET_ROWS}
    for size in SIZES:
        packet = ipv4_udp(LAPTOP_INNER, HUB_INNER, size)

        def send():
            lap.net_out.clear()
            fn = lap.send
            t0 = clock()
            for _ in range(n):
                fn(packet, NOW)
            dt = clock() - t0
            if len(lap.net_out) != n:
                raise RuntimeError(f"Device.send: {len(lap.net_out)} datagrams for {n} packets")
            return dt, n

        def receive():
            lap.net_out.clear()
            for _ in range(n):
                lap.send(packet, NOW)
            datagrams = [d for d, _ in lap.net_out]
            lap.net_out.clear()
            hub.tun_out.clear()
            fn = hub.receive
            t0 = clock()
            for d in datagrams:
                fn(d, LAPTOP_EP, NOW)
            dt = clock() - t0
            if len(hub.tun_out) != n:
                raise RuntimeError(f"Device.receive: {len(hub.tun_out)} packets out of {n}; "
                                   f"drops: {dict(hub.drops)}")
            hub.tun_out.clear()
            return dt, n

        out["device_send"][size] = _best(send, repeats) * 1e6
        out["device_receive"][size] = _best(receive, repeats) * 1e6
        lap.net_out.clear()

        key, nonce = os.urandom(32), struct.pack("<4xQ", 7)
        nacl_enc = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt
        nacl_dec = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt
        aead = ChaCha20Poly1305(key)
        sealed = aead.encrypt(nonce, packet, None)

        def loop(fn, *args):
            def run():
                t0 = clock()
                for _ in range(n):
                    fn(*args)
                return clock() - t0, n
            return run

        out["nacl_encrypt"][size] = _best(loop(nacl_enc, packet, None, nonce, key), repeats) * 1e6
        out["nacl_decrypt"][size] = _best(loop(nacl_dec, sealed, None, nonce, key), repeats) * 1e6
        out["cryptography_encrypt"][size] = _best(loop(aead.encrypt, nonce, packet, None),
                                                  repeats) * 1e6
        out["cryptography_decrypt"][size] = _best(loop(aead.decrypt, nonce, sealed, None),
                                                  repeats) * 1e6
    return out


def measure(quick: bool) -> dict:
    n, repeats, hs = (2_000, 3, 200) if quick else (10_000, 5, 2_000)
    return {
        "environment": {"python": platform.python_version(), "pynacl": nacl.__version__,
                        "cryptography": cryptography.__version__, "packets_per_repeat": n,
                        "repeats": repeats},
        "packet_us": packet_costs(n, repeats),
        "handshake": handshake_costs(hs),
    }


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"pytun engine in-process, one core: Python {env['python']}, PyNaCl {env['pynacl']}, "
             f"cryptography {env['cryptography']}; best of {env['repeats']} x "
             f"{env['packets_per_repeat']} packets",
             f"{'per packet':<36}{'1420 B us':>11}{'64 B us':>10}{'1420 B Mbit/s':>15}"]
    for key, label in PACKET_ROWS:
        row = result["packet_us"][key]
        mbit = 1420 * 8 / row[1420]
        lines.append(f"{label:<36}{row[1420]:>11.2f}{row[64]:>10.2f}{mbit:>15.0f}")
    hs = result["handshake"]
    lines.append("")
    lines.append(f"handshakes (N={hs['n']}, under-load cookies off)")
    for key, label in HANDSHAKE_ROWS:
        lines.append(f"{label:<44}{hs[key]:>12.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/engine.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer packets and handshakes (seconds)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    result = measure(args.quick)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
