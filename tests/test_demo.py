"""scripts/demo.py end to end: every check passes, and the machine is left as it was.

Also interrupted half-way (Ctrl-C): it still removes every namespace and process it made.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from .conftest import require_tools
from .netns import process_alive

pytestmark = pytest.mark.netns

DEMO = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
TIMEOUT = 120  # the demo bounds itself well under a minute; this only guards the test


def root_namespace() -> dict[str, str]:
    """What the demo promises never to change in the namespace it is started from."""
    def out(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return done.stdout if done.returncode == 0 else f"<{argv[0]} failed>"

    def sysctl(key: str) -> str:
        try:
            return pathlib.Path("/proc/sys", *key.split(".")).read_text().strip()
        except OSError:
            return "<unreadable>"

    def rules(text: str) -> str:  # without the counters and timestamps that move anyway
        return "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in text.splitlines()
                         if not line.startswith("#"))

    return {
        "addresses": out("ip", "-o", "addr", "show"),
        "routes": out("ip", "route", "show", "table", "all"),
        "rules": out("ip", "rule", "show"),
        "links": re.sub(r"\s+link/.*", "", out("ip", "-o", "link", "show")),
        "iptables-legacy": rules(out("iptables-legacy-save")),
        "ip_forward": sysctl("net.ipv4.ip_forward"),
        "src_valid_mark": sysctl("net.ipv4.conf.all.src_valid_mark"),
    }


def listed(label: str, output: str) -> list[str]:
    m = re.search(rf"^{label}: ?(.*)$", output, re.M)
    assert m, f"the demo printed no '{label}:' line:\n{output}"
    return m.group(1).split()


def assert_nothing_left(output: str, demo_pid: int) -> None:
    names = listed("namespaces", output)
    pids = [int(p) for p in listed("processes", output)]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not [n for n in names if n in netns], netns
    # Also none it made but did not list: its names carry its PID (tests/netns.py unique()).
    assert not [n for n in netns if re.fullmatch(rf"[a-z]{{1,5}}{demo_pid}-[0-9a-f]+", n)], netns
    assert not [p for p in pids if process_alive(p)]
    work = re.search(r"work files in (\S+)", output)
    assert work and not os.path.exists(work.group(1))
    leftovers = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if work.group(1) in cmdline:
                leftovers.append(f"{proc.name}: {cmdline}")
    assert not leftovers, leftovers


@pytest.fixture
def demo_ready(netns_ok):
    require_tools("wireguard-go", "wg", "ping", "iptables-legacy-save")


def test_demo_passes_every_check_and_leaves_the_machine_as_it_was(demo_ready):
    before = root_namespace()
    proc = subprocess.Popen([sys.executable, str(DEMO)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        output, errors = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output + errors
    checks = re.findall(r"^(PASS|FAIL)  (.*)$", output, re.M)
    assert len(checks) >= 10, output
    assert all(verdict == "PASS" for verdict, _ in checks), output
    for laptop in ("alice", "bob", "carol"):
        assert any(text.startswith(f"{laptop} pings the hub") for _, text in checks)
        assert any(text.startswith(f"{laptop} reaches the internet host") for _, text in checks)
    assert "--- pytun-admin show" in output and re.search(r"^NAME\s+PUBLIC KEY", output, re.M)
    assert "PrivateKey" not in output
    assert_nothing_left(output, proc.pid)
    assert root_namespace() == before


def test_demo_interrupted_half_way_still_removes_everything(demo_ready):
    before = root_namespace()
    proc = subprocess.Popen([sys.executable, str(DEMO)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lines = []
    try:
        for line in proc.stdout:  # wait until the hub and a laptop run, then press Ctrl-C
            lines.append(line)
            if "brings its tunnel up" in line:
                proc.send_signal(signal.SIGINT)
                break
        lines += proc.stdout.readlines()
        code = proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines)
    assert code == 1, output
    assert re.search(r"^FAIL  .*stopped by SIGINT", output, re.M), output
    assert re.search(r"^PASS  teardown", output, re.M), output
    assert len(listed("namespaces", output)) >= 3
    assert_nothing_left(output, proc.pid)
    assert root_namespace() == before
