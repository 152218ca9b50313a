"""server/nat.py in a hub namespace: exact rule sets, crash and restart, real masquerading.

    [lap] 10.9.0.2/24 ---veth "tun"--- 10.9.0.1/24 [hub] 192.0.2.1/24 ---veth egress--- [net]
          default via 10.9.0.1                     default via 192.0.2.2        192.0.2.2/24

A veth stands in for the hub's TUN interface. The "internet" namespace has no route back to the
VPN subnet, so a reply reaches the laptop only when the hub masquerades.
The code under test runs inside the hub namespace (`hub.python`), never in the test process.
"""

import collections
import json
import subprocess
import sys
import textwrap

import pytest

from tests.netns import ping, topology

__all__ = ["topology"]  # the fixture
pytestmark = pytest.mark.netns

SUBNET = "10.9.0.0/24"


class Hub:
    def __init__(self, topo, state_dir):
        self.ns, self.net, self.lap = topo.netns("hub"), topo.netns("net"), topo.netns("lap")
        self.egress, _ = topo.veth(self.ns, "192.0.2.1/24", self.net, "192.0.2.2/24")
        self.tun, _ = topo.veth(self.ns, "10.9.0.1/24", self.lap, "10.9.0.2/24")
        self.ns.run("ip route add default via 192.0.2.2")
        self.lap.run("ip route add default via 10.9.0.1")
        self.state_dir = str(state_dir)
        for table in ("filter", "nat", "mangle", "raw", "security"):  # all loaded in "before"
            self.ns.run("iptables-legacy", "-t", table, "-S")

    def nat(self, code: str, **kw) -> dict:
        """Run `code` in the hub with `n = Nat(...)` ready; return what it passed to out()."""
        prelude = textwrap.dedent(f"""
            import json, os
            from pytun.server import nat
            from pytun.server.nat import Nat, NatError
            def out(**kw): print(json.dumps(kw), flush=True)
            n = Nat({self.tun!r}, [{SUBNET!r}], mtu=1420, state_dir={self.state_dir!r})
        """)
        done = self.ns.python(prelude + textwrap.dedent(code), **kw)
        assert "Traceback" not in done.stderr, done.stderr
        lines = done.stdout.splitlines()
        return json.loads(lines[-1]) if lines else {}

    def saved(self) -> dict[str, list[str]]:
        """iptables-legacy-save as {table: lines}, without comments and counters."""
        tables: dict[str, list[str]] = collections.defaultdict(list)
        table = None
        for line in self.ns.run("iptables-legacy-save").stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith((":", "-A")):
                tables[table].append(line.split(" [")[0] if line.startswith(":") else line)
        return dict(tables)

    def ip_forward(self) -> str:
        return self.ns.sysctl("net.ipv4.ip_forward")


@pytest.fixture
def hub(topology, tmp_path):
    return Hub(topology, tmp_path / "state")


def ours(saved: dict[str, list[str]]) -> list[str]:
    return [f"{t} {line}" for t, lines in sorted(saved.items()) for line in lines
            if "PYTUN" in line or "pytun" in line]


def expected(hub: Hub, egress: bool = True) -> list[str]:
    tun, out = hub.tun, hub.egress
    fwd = [f"-A PYTUN-FORWARD -i {tun} -o {out} -j ACCEPT",
           f"-A PYTUN-FORWARD -i {out} -o {tun} -m conntrack --ctstate RELATED,ESTABLISHED"
           " -j ACCEPT"]
    if not egress:
        fwd = [f"-A PYTUN-FORWARD -i {tun} ! -o {tun} -j ACCEPT",
               f"-A PYTUN-FORWARD ! -i {tun} -o {tun} -m conntrack --ctstate RELATED,ESTABLISHED"
               " -j ACCEPT"]
    lines = [
        "filter :PYTUN-FORWARD -",
        "filter -A FORWARD -m comment --comment pytun -j PYTUN-FORWARD",
        *[f"filter {r}" for r in fwd],
        "mangle :PYTUN-MSS -",
        "mangle -A FORWARD -m comment --comment pytun -j PYTUN-MSS",
        f"mangle -A PYTUN-MSS -o {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN"
        " -j TCPMSS --clamp-mss-to-pmtu",
        f"mangle -A PYTUN-MSS -i {tun} -p tcp -m tcp --tcp-flags SYN,RST SYN"
        " -j TCPMSS --set-mss 1380",
    ]
    if egress:
        lines += [
            "nat :PYTUN-POSTROUTING -",
            "nat -A POSTROUTING -m comment --comment pytun -j PYTUN-POSTROUTING",
            f"nat -A PYTUN-POSTROUTING -s {SUBNET} -o {hub.egress} -j MASQUERADE",
        ]
    return sorted(lines)


def test_setup_is_exact_survives_restart_and_teardown_restores(hub):
    # Foreign rules, some before our setup and one inserted in front of our jump afterwards.
    hub.ns.run("iptables-legacy -A FORWARD -s 203.0.113.0/24 -j DROP")
    hub.ns.run("iptables-legacy -t nat -A POSTROUTING -d 198.51.100.9 -j RETURN")
    hub.ns.run("iptables-legacy -N OTHER")
    pristine = hub.saved()
    assert hub.ip_forward() == "0"

    assert hub.nat("out(warnings=n.setup())") == {"warnings": []}
    assert sorted(ours(hub.saved())) == expected(hub)
    # Our jump is first in its built-in chain, the foreign rule after it.
    assert [r for r in hub.saved()["filter"] if r.startswith("-A FORWARD")] == [
        "-A FORWARD -m comment --comment pytun -j PYTUN-FORWARD",
        "-A FORWARD -s 203.0.113.0/24 -j DROP",
    ]
    assert hub.ip_forward() == "1"

    # Set up twice in one process, then again in another (a restart after a crash).
    hub.nat("n.setup(); n.setup()")
    hub.nat("n.setup(); os._exit(0)")
    assert sorted(ours(hub.saved())) == expected(hub)
    with open(f"{hub.state_dir}/ip_forward.saved") as f:
        assert f.read() == "0\n"  # the original, not the 1 of the crashed run

    hub.ns.run("iptables-legacy -I FORWARD 1 -s 198.51.100.0/24 -j ACCEPT")
    hub.nat("n.teardown(); n.teardown()")
    after = hub.saved()
    after["filter"].remove("-A FORWARD -s 198.51.100.0/24 -j ACCEPT")
    assert after == pristine
    assert hub.ip_forward() == "0"
    assert not ours(after)


def test_cleanup_after_a_crash_removes_everything(hub):
    hub.nat("n.setup(); os._exit(1)", check=False)  # crash: no teardown
    assert sorted(ours(hub.saved())) == expected(hub)
    hub.nat(f"nat.cleanup({hub.state_dir!r}); nat.cleanup({hub.state_dir!r})")
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"
    assert hub.ns.run("ls", "-A", hub.state_dir).stdout == ""


def test_without_default_route_forwarding_but_no_masquerade(hub):
    hub.ns.run("ip route del default")
    result = hub.nat("out(warnings=n.setup())")
    assert result["warnings"] == ["no default route and no egress interface given: VPN clients"
                                  " get no masquerading to the outside"]
    assert sorted(ours(hub.saved())) == expected(hub, egress=False)
    hub.nat("n.teardown()")
    assert ours(hub.saved()) == []


def test_errors_are_nat_errors_and_a_failed_setup_rolls_back(hub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = hub.nat(f"""
        errors = []
        def mangle_breaks(table_name, rules, real=Nat._chain):
            if table_name == "mangle":
                raise NatError("mangle broke")
            real(table_name, rules)
        for attempt in (
            lambda: Nat("bad name", []),
            lambda: Nat({hub.tun!r}, [], mtu=40),
            lambda: Nat({hub.tun!r}, [{SUBNET!r}], state_dir={str(blocker / "state")!r}).setup(),
            lambda: setattr(Nat, "_chain", staticmethod(mangle_breaks)) or n.setup(),
        ):
            try:
                attempt()
            except NatError as exc:
                errors.append(str(exc))
        out(errors=errors, left=os.listdir({hub.state_dir!r}))
    """)
    assert result["errors"] == [
        "bad interface name 'bad name': no '/', ':' or whitespace allowed",
        "bad MTU 40: must be 68 to 65535",
        f"cannot save /proc/sys/net/ipv4/ip_forward in {blocker}/state: Not a directory",
        "mangle broke",
    ]
    # The filter and nat chains made before mangle broke are gone again, forwarding is back.
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"
    assert result["left"] == []


def test_a_foreign_jump_to_our_chain_is_reported(hub):
    hub.nat("n.setup()")
    hub.ns.run("iptables-legacy -t mangle -N OTHER")
    hub.ns.run("iptables-legacy -t mangle -A OTHER -j PYTUN-MSS")
    result = hub.nat("""
        try:
            n.teardown()
        except NatError as exc:
            out(error=str(exc))
    """)
    assert result["error"].startswith("cannot delete chain PYTUN-MSS of the mangle table:")
    assert result["error"].endswith("(does a rule pytun did not create jump to it?)")
    hub.ns.run("iptables-legacy -t mangle -F OTHER")
    hub.nat("n.teardown()")
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"


def test_laptop_reaches_the_internet_masqueraded(hub):
    # A UDP echo in the "internet" that answers with the source address it saw.
    server = hub.net.popen([sys.executable, "-u", "-c", textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("192.0.2.2", 5555))
        print("ready", flush=True)
        while True:
            data, peer = s.recvfrom(100)
            s.sendto(peer[0].encode(), peer)
    """)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline() == "ready\n"
    ask = textwrap.dedent("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        s.sendto(b"who am I", ("192.0.2.2", 5555))
        try:
            print(s.recv(100).decode())
        except socket.timeout:
            print("no answer")
    """)
    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)

    hub.nat("n.setup()")
    assert ping(hub.lap, "192.0.2.2", count=3)
    assert hub.lap.python(ask).stdout == "192.0.2.1\n"

    hub.nat("n.teardown()")
    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)
    assert hub.lap.python(ask).stdout == "no answer\n"


def test_backend_warnings(topology):
    ns = topology.netns("fw")
    iptables_is_nft = "nf_tables" in ns.run("iptables --version", check=False).stdout
    quiet = json.loads(ns.python("import json; from pytun.server import nat;"
                                 " print(json.dumps(nat.backend_warnings()))").stdout)
    assert len(quiet) == int(iptables_is_nft)
    if iptables_is_nft:
        assert "iptables-legacy-save" in quiet[0]

    ns.run("nft", "add table inet guard")
    ns.run("nft", "add chain inet guard dropper"
           " { type filter hook forward priority 0; policy drop; }")
    warned = json.loads(ns.python("import json; from pytun.server import nat;"
                                  " print(json.dumps(nat.backend_warnings()))").stdout)
    assert warned[:len(quiet)] == quiet
    assert warned[len(quiet):] == [
        "nftables chain inet guard dropper hooks forward with policy drop (Docker, ufw?):"
        " forwarded VPN traffic may be dropped by it"
    ]
