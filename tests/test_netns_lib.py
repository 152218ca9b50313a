"""The namespace helpers keep their promises: unique names, clean-up, nothing in the root ns.

    [a] 192.0.2.1 ---veth--- 192.0.2.2 [b]
"""

import subprocess
import sys

import pytest

from tests.netns import (CommandFailed, Topology, ping, process_alive, topology, unique,
                         wait_until)

__all__ = ["topology"]  # the fixture


def root_links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def test_unique_names_fit_an_interface():
    names = {unique("veth") for _ in range(100)}
    assert len(names) == 100
    assert all(len(n) <= 15 for n in names)
    with pytest.raises(ValueError):
        unique("toolong")


def test_wait_until_returns_value_or_says_what():
    assert wait_until(lambda: 42, timeout=0.1) == 42
    with pytest.raises(AssertionError, match="the moon"):
        wait_until(lambda: False, timeout=0.1, what="the moon")


@pytest.mark.netns
def test_veth_ping_and_nothing_in_root(topology):
    before = root_links()
    a, b = topology.netns("a"), topology.netns("b")
    va, vb = topology.veth(a, "192.0.2.1/24", b, ["192.0.2.2/24", "fd00::2/64"])
    assert root_links() == before
    assert ping(a, "192.0.2.2", count=3)
    assert not ping(a, "192.0.2.99", timeout=0.2)
    assert vb in b.ip("link")
    assert va not in b.ip("link")
    assert a.sysctl("net.ipv4.ip_forward") == "0"


@pytest.mark.netns
def test_failed_command_is_an_assertion_with_output(topology):
    ns = topology.netns("f")
    with pytest.raises(CommandFailed, match="No such file or directory|does not exist"):
        ns.run("ip link show nosuchdev")
    assert ns.run("false", check=False).returncode == 1
    assert ns.python("print(6 * 7)").stdout == "42\n"


@pytest.mark.netns
def test_close_stops_processes_and_stragglers(netns_ok):
    with Topology() as topo:
        ns = topo.netns("p")
        child = ns.popen([sys.executable, "-c", "import time; time.sleep(60)"])
        # A daemon that leaves its parent behind, as `wireguard-go` without -f does.
        ns.run([sys.executable, "-c",
                "import subprocess as s; s.Popen(['sleep', '60'], start_new_session=True,"
                " stdout=s.DEVNULL, stderr=s.DEVNULL)"])
        stragglers = wait_until(lambda: [p for p in ns.pids() if p != child.pid], what="daemon")
        name = ns.name
    assert child.poll() is not None
    assert not any(map(process_alive, stragglers))
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout


@pytest.mark.netns
def test_topology_closes_on_exception(netns_ok):
    with pytest.raises(RuntimeError):
        with Topology() as topo:
            name = topo.netns("x").name
            raise RuntimeError("test failed")
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                      text=True).stdout
    assert topo.namespaces == []
