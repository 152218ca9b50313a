"""Smoke runs of the benchmarks: every row is printed with numeric figures, nothing is left behind.

The figures themselves are never judged here (bench/ prints, people compare).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

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
    "pytun-server start s, 10k rows",
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
