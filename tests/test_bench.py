"""Smoke runs of the benchmarks: every row is printed with numeric figures, nothing is left behind.

The figures themselves are never judged here (bench/ prints, people compare).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from bench import memory
from pytun.common.crypto import clamp
from pytun.common.device import Device

from .conftest import require_tools

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]?\d+)?$")

ENGINE_PACKET_ROWS = (
    "Device.send (encrypt path)",
    "Device.receive (decrypt path)",
    "PyNaCl AEAD encrypt (bare)",
    "PyNaCl AEAD decrypt (bare)",
    "cryptography AEAD encrypt (bare)",
    "cryptography AEAD decrypt (bare)",
)
ENGINE_HANDSHAKE_ROWS = (
    "full handshakes/s (both ends, one core)",
    "initiator us/handshake",
    "responder us/handshake",
    "responder-only handshakes/s",
)
LEG_ROWS = (
    "TCP laptop->hub 1 stream Mbit/s",
    "TCP hub->laptop 1 stream Mbit/s",
    "TCP laptop->hub 4 streams Mbit/s",
    "TCP hub->laptop 4 streams Mbit/s",
    "hub CPU s/GB laptop->hub saturated",
    "hub CPU s/GB hub->laptop saturated",
    "TCP laptop->hub at 100M Mbit/s",
    "hub CPU s/GB laptop->hub at 100M",
    "ping RTT median ms",
    "UDP 64 B laptop->hub kpps",
    "UDP 64 B hub->laptop kpps",
    "hub RSS MiB after the load",
    "add-peer command ms",
    "add-peer to first reply ms",
)
PYTUN_ROWS = (
    "pytun handshakes/s, full, one core",
    "pytun handshake initiator us",
    "pytun handshake responder us",
    "pytun handshakes/s, responder only",
    "hub Device RSS MiB, 10k peers",
    "hub Device RSS MiB, +1k sessions",
    "pytun-server RSS MiB, no peers",
    "pytun-server RSS MiB, 10k rows",
    "pytun-server RSS MiB, +1k sessions",
    "pytun-server RSS MiB, after `get`",
    "pytun-server start s, 10k rows",
    "pytun-server 1k sessions made s",
)


def figures(output: str, label: str) -> list[str]:
    """The words after `label` on the one line that starts with it."""
    lines = [line for line in output.splitlines() if line.startswith(label + " ")]
    assert len(lines) == 1, f"row {label!r} appears {len(lines)} times in:\n{output}"
    return lines[0][len(label):].split()


def assert_numeric(output: str, label: str, count: int) -> None:
    words = figures(output, label)
    assert len(words) == count and all(NUMBER.match(w) for w in words), (label, words)


def run_bench(args: list[str], timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.out, proc.err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops measuring, cleans up and prints what it has
        try:
            proc.out, proc.err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.out, proc.err = proc.communicate()
        pytest.fail(f"{' '.join(args)} took over {timeout} s:\n{proc.err[-3000:]}")
    return proc


def test_engine_quick_prints_every_row():
    proc = run_bench(["bench/engine.py", "--quick"], timeout=90)
    assert proc.returncode == 0, proc.err
    for label in ENGINE_PACKET_ROWS:
        assert_numeric(proc.out, label, 3)  # 1420 B us, 64 B us, 1420 B Mbit/s
    for label in ENGINE_HANDSHAKE_ROWS:
        assert_numeric(proc.out, label, 1)


@pytest.mark.netns
def test_run_quick_leg_b_prints_every_row_and_leaves_nothing(netns_ok):
    require_tools("wireguard-go", "wg", "iperf3", "ping", "ss")
    proc = run_bench(["bench/run.py", "--quick", "--only", "b"], timeout=90)
    assert proc.returncode == 0, f"{proc.out}\n{proc.err[-3000:]}"
    assert figures(proc.out, "metric") == ["pytun/wg-go"]
    for label in LEG_ROWS:
        assert_numeric(proc.out, label, 1)
    for label in PYTUN_ROWS:
        assert_numeric(proc.out, label, 1)
    # Namespaces, wireguard-go interfaces and processes are named after the bench's PID.
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = re.compile(rf"^[a-z]+{proc.pid}-[0-9a-f]+\b")
    assert not [n for n in left.splitlines() if mine.match(n)], left
    sockets = os.listdir("/run/wireguard") if os.path.isdir("/run/wireguard") else []
    assert not [s for s in sockets if mine.match(s)], sockets


def test_memory_laptops_route_by_receiver_index_and_see_the_echo_reply():
    """What the memory measurement's laptop process relies on, with in-process Devices."""
    hub = Device(clamp(os.urandom(32)))
    hub_peers, laptops = [], []
    for address in memory._addresses(3):
        dev = Device(clamp(os.urandom(32)))
        dev.add_peer(hub.public_key, allowed_ips=[memory.MEMORY_SUBNET], endpoint=memory.HUB_EP)
        hub_peers.append(hub.add_peer(dev.public_key, allowed_ips=[f"{address}/32"]))
        laptops.append((dev, memory.icmp_echo(str(address), memory.HUB_INNER, 7)))
    by_index = {}
    for n, (dev, echo) in enumerate(laptops):
        dev.send(echo, 1.0)
        (initiation, _), = dev.net_out
        dev.net_out.clear()
        by_index.update((i, n) for i in dev.handshakes)
        hub.receive(initiation, ("198.51.100.2", 1000 + n), 1.0)
    responses, hub.net_out = hub.net_out, []
    for response, _ in reversed(responses):  # any order: the index says whose it is
        n = by_index[memory._receiver_index(response)]
        dev = laptops[n][0]
        dev.receive(response, memory.HUB_EP, 1.0)
        (transport, _), = dev.net_out
        dev.net_out.clear()
        by_index.update((i, n) for i in dev.keypairs)
        hub.receive(transport, ("198.51.100.2", 1000 + n), 1.0)
    assert [p.current is not None for p in hub_peers] == [True] * 3
    assert sorted(hub.tun_out) == sorted(echo for _, echo in laptops)
    # The hub's kernel answers each echo; the hub seals the reply to the right laptop.
    for packet in hub.tun_out:
        reply = bytearray(packet)
        reply[12:16], reply[16:20] = packet[16:20], packet[12:16]
        reply[20] = 0  # echo reply (checksums are not checked on this path)
        hub.send(bytes(reply), 1.0)
    for datagram, _ in hub.net_out:
        dev = laptops[by_index[memory._receiver_index(datagram)]][0]
        dev.receive(datagram, memory.HUB_EP, 1.0)
        assert len(dev.tun_out) == 1 and memory.is_echo_reply(dev.tun_out[0], memory.HUB_INNER)
    assert not memory.is_echo_reply(laptops[0][1], memory.HUB_INNER)  # a request is not


@pytest.mark.netns
def test_memory_server_small_hub_reports_every_session_and_leaves_nothing(netns_ok):
    """The real-server measurement with small numbers: 200 registry rows, 20 live sessions."""
    proc = run_bench(["bench/memory.py", "--server", "--rows", "200", "--sessions", "20",
                      "--json"], timeout=60)
    assert proc.returncode == 0, f"{proc.out}\n{proc.err[-3000:]}"
    r = json.loads(proc.out)
    assert (r["registered"], r["live"], r["laptops"]["replied"]) == (200, 20, 20), r
    assert r["laptops"]["counts"]["received_type4"] >= 20, r  # the echo replies, sealed
    for key in ("empty_kib", "rows_kib", "sessions_kib", "after_get_kib"):
        assert isinstance(r[key], int) and r[key] > 0, (key, r[key])
    assert r["total_s"] < 60, r
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = re.compile(rf"^[a-z]+{proc.pid}-[0-9a-f]+\b")
    assert not [n for n in left.splitlines() if mine.match(n)], left


@pytest.mark.netns
def test_policy_bench_small_prints_every_figure_and_leaves_nothing(netns_ok):
    """bench/policy.py with small numbers: 60 peers, 5 rules, 1 s per iperf3 run."""
    require_tools("wireguard-go", "wg", "iperf3", "ping", "ss", "ipset")
    proc = run_bench(["bench/policy.py", "--peers", "60", "--rules", "5", "--seconds", "1",
                      "--repeat", "1", "--json"], timeout=120)
    assert proc.returncode == 0, f"{proc.out}\n{proc.err[-3000:]}"
    r = json.loads(proc.out)
    assert (r["peers"], r["rules"]) == (60, 5)
    for key in ("plan_s", "apply_s", "access_add_s", "set_groups_s"):
        assert 0 < r[key] < 30, (key, r[key])
    for label in ("none1", "rules1", "none2", "rules2"):
        assert r[f"{label}_tcp_mbps"] > 1 and r[f"{label}_cpu_s_per_gb"] > 0, (label, r)
    # Every peer is in `everyone` (iperf3's rule names it), plus the subnet in the sources set.
    assert r["entries"] >= 60 + 1 and r["kernel_rules"] >= 5
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = re.compile(rf"^[a-z]+{proc.pid}-[0-9a-f]+\b")
    assert not [n for n in left.splitlines() if mine.match(n)], left
