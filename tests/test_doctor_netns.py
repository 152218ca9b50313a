"""pytun-admin doctor against a real hub in a namespace: healthy, it fails nothing; each thing
broken for real (and put back) makes its own check fail, with a fix.

    hub namespace: pytun-server, lo 192.0.2.1 (the endpoint), veth to inet (the default route)
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import require_tools
from .hubnet import INET_HOST, PY, Hub
from .netns import wait_until

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def hub(tmp_path_factory, netns_ok):
    require_tools("iptables-legacy-save", "nft", "ipset")
    from .netns import Topology
    tmp = tmp_path_factory.mktemp("doctor")
    with Topology() as topo:
        h = Hub(topo, tmp)
        h.start()
        yield h


def doctor(hub, state_dir=None) -> dict[str, dict]:
    done = hub.ns.run([PY, "-m", "pytun.server.admin", "--state-dir", state_dir or hub.state_dir,
                       "doctor", "--json"], check=False)
    assert done.returncode in (0, 1), done.stderr
    checks = json.loads(done.stdout)
    assert (done.returncode == 1) == any(c["status"] == "FAIL" for c in checks)
    return {c["name"]: c for c in checks}


def failed(hub, state_dir=None) -> dict[str, dict]:
    return {n: c for n, c in doctor(hub, state_dir).items() if c["status"] == "FAIL"}


def only_failure(hub, name, state_dir=None) -> dict:
    fails = failed(hub, state_dir)
    assert set(fails) == {name}, fails
    assert fails[name]["fix"], fails[name]
    return fails[name]


def egress_dev(hub) -> str:
    return hub.ns.ip_json("route show default")[0]["dev"]


def test_a_healthy_hub_fails_nothing(hub):
    checks = doctor(hub)
    assert {n for n, c in checks.items() if c["status"] == "FAIL"} == set()
    for name in ("forwarding", "egress", "udp port", "mtu", "hub rules", "registry", "endpoint",
                 "state directory mode", "private key mode"):
        assert checks[name]["status"] == "PASS", checks[name]
    # The human form: one line per check, then the tally.
    done = hub.admin("doctor")
    assert done.stdout.splitlines()[0].startswith(("PASS  ", "WARN  "))
    assert "0 failed" in done.stdout.splitlines()[-1]


def test_forwarding_off(hub):
    hub.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        assert "while the hub runs" in only_failure(hub, "forwarding")["detail"]
    finally:
        hub.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")


def test_an_nftables_forward_chain_with_a_drop_policy(hub):
    hub.ns.run(["nft", "add table inet dockerish"])
    hub.ns.run(["nft", "add chain inet dockerish dockerfwd { type filter hook forward priority 0;"
                " policy drop; }"])
    try:
        assert "inet dockerish dockerfwd" in only_failure(hub, "nftables forward")["detail"]
    finally:
        hub.ns.run(["nft", "delete table inet dockerish"])


def test_no_default_route(hub):
    hub.ns.run("ip", "route", "del", "default")
    try:
        fail = failed(hub)
        assert "egress" in fail and "no default route" in fail["egress"]["detail"]
    finally:
        hub.ns.run("ip", "route", "add", "default", "via", INET_HOST)


def test_egress_mtu_below_the_tunnels(hub):
    dev = egress_dev(hub)
    hub.ns.run("ip", "link", "set", dev, "mtu", "1400")
    try:
        assert f"egress {dev} 1400" in only_failure(hub, "mtu")["detail"]
    finally:
        hub.ns.run("ip", "link", "set", dev, "mtu", "1500")


def test_a_jump_to_the_hubs_chain_removed(hub):
    rule = ["FORWARD", "-m", "comment", "--comment", f"pytun:{hub.ifname}", "-j",
            f"PYTUN-{hub.ifname}-FWD"]
    hub.ns.run(["iptables-legacy", "-D", *rule])
    try:
        assert "no jump from FORWARD" in only_failure(hub, "hub rules")["detail"]
    finally:
        hub.ns.run(["iptables-legacy", "-I", *rule])
    assert "hub rules" not in failed(hub)


def test_strict_rp_filter_warns(hub):
    before = hub.ns.sysctl("net.ipv4.conf.all.rp_filter")
    hub.ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    try:
        check = doctor(hub)["rp_filter"]
        assert check["status"] == "WARN" and "all.rp_filter=2" in check["fix"]
    finally:
        hub.ns.run("sysctl", "-qw", f"net.ipv4.conf.all.rp_filter={before}")


def test_state_directory_and_key_modes(hub):
    import os
    os.chmod(hub.state_dir, 0o755)
    try:
        assert "0755" in only_failure(hub, "state directory mode")["detail"]
    finally:
        os.chmod(hub.state_dir, 0o700)
    key = os.path.join(hub.state_dir, "private.key")
    os.chmod(key, 0o640)
    try:
        assert "chmod 0600" in only_failure(hub, "private key mode")["fix"]
    finally:
        os.chmod(key, 0o600)


def test_a_corrupt_registry_and_an_endpoint_that_does_not_resolve(hub, tmp_path):
    """On a copy of the state directory: the running hub keeps its own."""
    import os
    copy = str(tmp_path / "state-copy")
    shutil.copytree(hub.state_dir, copy, ignore=shutil.ignore_patterns("control.sock"))
    os.chmod(copy, 0o700)
    for wal in ("registry.db-wal", "registry.db-shm"):  # else the log masks the damage
        if os.path.exists(os.path.join(copy, wal)):
            os.unlink(os.path.join(copy, wal))
    path = os.path.join(copy, "registry.db")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(4096)  # every page after the header page
        f.write(b"\x55" * (size - 4096))
    assert "registry" in failed(hub, copy)
    settings = json.loads(open(os.path.join(copy, "hub.json")).read())
    settings["endpoint"] = "hub.does-not-exist.invalid:51820"
    with open(os.path.join(copy, "hub.json"), "w") as f:
        json.dump(settings, f)
    fail = failed(hub, copy)
    assert "does not resolve" in fail["endpoint"]["detail"]


def test_the_udp_port_held_by_another_process(hub):
    """Last: the hub stops, something else takes its port."""
    assert hub.stop() == 0
    holder = hub.ns.popen([PY, "-c", "import socket, time; s = socket.socket(socket.AF_INET,"
                           " socket.SOCK_DGRAM); s.bind(('0.0.0.0', 51820)); print('bound',"
                           " flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "bound"
    fail = failed(hub)
    assert f"held by PID {holder.pid} " in fail["udp port"]["detail"], fail
    holder.kill()
    holder.wait(10)
    wait_until(lambda: "nothing listens" in failed(hub)["udp port"]["detail"], timeout=10,
               what="the port to be free")
