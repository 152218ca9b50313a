"""server/nat.py carrying out policy plans in a hub namespace: exact rule sets, live changes,
crash and restart, two hubs side by side, real masquerading and default deny.

    [lap] 10.9.0.2/24 ---veth "tun"--- 10.9.0.1/24 [hub] 192.0.2.1/24 ---veth egress--- [net]
          default via 10.9.0.1                     |   default via 192.0.2.2        192.0.2.2/24
                                                   198.51.100.1/24 ---veth--- [side] 198.51.100.2/24

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
KEY = "ZW9V06+oMaS1j0/9YvjkCfDTDCIkJ3ldRIkddzk8N0A="
class Hub:
    def __init__(self, topo, state_dir):
        self.ns, self.net, self.lap = topo.netns("hub"), topo.netns("net"), topo.netns("lap")
        self.side = topo.netns("side")
        self.egress, _ = topo.veth(self.ns, "192.0.2.1/24", self.net, "192.0.2.2/24")
        self.tun, _ = topo.veth(self.ns, "10.9.0.1/24", self.lap, "10.9.0.2/24")
        topo.veth(self.ns, "198.51.100.1/24", self.side, "198.51.100.2/24")
        self.ns.run("ip route add default via 192.0.2.2")
        self.lap.run("ip route add default via 10.9.0.1")
        self.net.run("ip route add 198.51.100.0/24 via 192.0.2.1")
        self.side.run("ip route add default via 198.51.100.1")
        self.state_dir = str(state_dir)
        for table in ("filter", "nat", "mangle", "raw", "security"):  # all loaded in "before"
            self.ns.run("iptables-legacy", "-t", table, "-S")

    def nat(self, code: str, rules=("everyone hub icmp",), tun=None, egress=True, **kw) -> dict:
        """Run `code` in the hub with `plan` (a dict) for the veth "tun" and `rules` ready;
        return what it passed to out()."""
        prelude = textwrap.dedent(f"""
            import json, os, time
            from pytun.server import firewall, nat, policy
            from pytun.server.nat import NatError
            from pytun.server.registry import Peer
            def out(**kw): print(json.dumps(kw), flush=True)
            tag = {tun or self.tun!r}
            view = policy.HubView(tag, (policy.ipaddress.ip_network({SUBNET!r}),),
                                  (policy.ipaddress.ip_address("10.9.0.1"),), 51820, 1420,
                                  {self.egress if egress else None!r})
            peers = [Peer(name="lap", public_key={KEY!r}, address="10.9.0.2", groups=["dev"])]
            rules = [policy.parse_rule(*r.split()) for r in {list(rules)!r}]
            plan = firewall.plan(view, peers, rules, time.time(), 4).to_dict()
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

    def ipsets(self) -> list[str]:
        return sorted(self.ns.run("ipset list -n").stdout.split())

    def ip_forward(self) -> str:
        return self.ns.sysctl("net.ipv4.ip_forward")


@pytest.fixture
def hub(topology, tmp_path):
    return Hub(topology, tmp_path / "state")


def ours(saved: dict[str, list[str]], tag: str | None = None) -> list[str]:
    """Our rules as 'table -A ...' lines; of one hub when `tag` is given."""
    out = []
    for table, lines in sorted(saved.items()):
        for line in lines:
            if line.startswith("-A") and ("PYTUN" in line or "pytun" in line):
                if tag is None or f"PYTUN-{tag}-" in line:
                    out.append(f"{table} {line}")
    return sorted(out)


def planned(hub: Hub, **kw) -> list[str]:
    """What the plan says the kernel must hold, in the same form."""
    lines = hub.nat("out(lines=firewall.Plan.from_dict(plan).lines())", **kw)["lines"]
    out, table = [], None
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
        else:
            out.append(f"{table} {line}")
    return sorted(out)


ISOLATE = ["filter -A FORWARD -m comment --comment \"pytun:isolate\" -j PYTUN-ISOLATE",
           "filter -A PYTUN-ISOLATE -j DROP"]


def test_setup_is_exact_survives_restart_and_teardown_restores(hub):
    # Foreign rules, some before our setup and one inserted in front of our jump afterwards.
    hub.ns.run("iptables-legacy -A FORWARD -s 203.0.113.0/24 -j DROP")
    hub.ns.run("iptables-legacy -t nat -A POSTROUTING -d 198.51.100.9 -j RETURN")
    hub.ns.run("iptables-legacy -N OTHER")
    hub.ns.run("iptables-legacy -A OTHER -m comment --comment pytun -j ACCEPT")  # not ours
    pristine = hub.saved()
    assert hub.ip_forward() == "0"

    assert hub.nat("out(warnings=nat.setup(plan))") == {"warnings": []}
    expected = planned(hub)
    assert len(expected) > 30
    assert ours(hub.saved(), hub.tun) == expected
    # The hub's jump is first in FORWARD, then the isolation of other forwarding, then the rest.
    assert [r for r in hub.saved()["filter"] if r.startswith("-A FORWARD")] == [
        f"-A FORWARD -m comment --comment \"pytun:{hub.tun}\" -j PYTUN-{hub.tun}-FWD",
        "-A FORWARD -m comment --comment \"pytun:isolate\" -j PYTUN-ISOLATE",
        "-A FORWARD -s 203.0.113.0/24 -j DROP",
    ]
    assert hub.ip_forward() == "1"
    sets = hub.ipsets()
    assert sets and all(s.startswith(f"pt-{hub.tun}-") for s in sets)

    # Set up twice in one process, then again in another (a restart after a crash): the
    # record that forwarding was off survives, as PYTUN-ISOLATE.
    hub.nat("nat.setup(plan); nat.setup(plan)")
    hub.nat("nat.setup(plan); os._exit(0)")
    assert ours(hub.saved(), hub.tun) == expected
    assert all(line in ours(hub.saved()) for line in ISOLATE)
    assert hub.ipsets() == sets

    hub.ns.run("iptables-legacy -I FORWARD 1 -s 198.51.100.0/24 -j ACCEPT")
    hub.nat("nat.teardown(tag, 4); nat.teardown(tag, 4)")
    after = hub.saved()
    after["filter"].remove("-A FORWARD -s 198.51.100.0/24 -j ACCEPT")
    assert after == pristine
    assert hub.ip_forward() == "0"
    assert hub.ipsets() == []


def test_cleanup_after_a_crash_removes_everything(hub):
    hub.nat("nat.setup(plan); os._exit(1)", check=False)  # crash: no teardown
    assert ours(hub.saved(), hub.tun) == planned(hub)
    hub.nat(f"nat.cleanup(tag, {hub.state_dir!r}); nat.cleanup(tag, {hub.state_dir!r})")
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"
    assert hub.ipsets() == []


def test_cleanup_removes_an_earlier_pytuns_chains_and_restores_forwarding(hub, tmp_path):
    """What pytun 0.1 left after a crash: PYTUN-FORWARD & co. and ip_forward.saved."""
    for table, builtin, chain in (("filter", "FORWARD", "PYTUN-FORWARD"),
                                  ("nat", "POSTROUTING", "PYTUN-POSTROUTING"),
                                  ("mangle", "FORWARD", "PYTUN-MSS")):
        hub.ns.run(f"iptables-legacy -t {table} -N {chain}")
        hub.ns.run(f"iptables-legacy -t {table} -A {chain} -j ACCEPT")
        hub.ns.run(f"iptables-legacy -t {table} -I {builtin} -m comment --comment pytun -j {chain}")
    hub.ns.run("mkdir", "-p", hub.state_dir)
    hub.ns.run("sh", "-c", f"echo 0 > {hub.state_dir}/ip_forward.saved && "
                           "echo 1 > /proc/sys/net/ipv4/ip_forward")
    hub.nat(f"nat.cleanup(tag, {hub.state_dir!r})")
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"
    assert hub.ns.run("ls", "-A", hub.state_dir).stdout == ""


def test_without_egress_no_masquerade_and_a_warning(hub):
    result = hub.nat("out(warnings=nat.setup(plan))", egress=False)
    assert result["warnings"] == ["no IPv4 default route and no egress interface given: laptops"
                                  " get no masquerading to the internet over IPv4"]
    lines = ours(hub.saved(), hub.tun)
    assert lines == planned(hub, egress=False)
    assert not any(line.startswith("nat ") for line in lines)
    hub.nat("nat.teardown(tag, 4)")
    assert ours(hub.saved()) == []


def test_a_failed_setup_rolls_back(hub):
    result = hub.nat("""
        real = nat._apply_table
        def filter_breaks(p, name, isolate):
            if name == "filter":
                raise NatError("filter broke")
            real(p, name, isolate)
        nat._apply_table = filter_breaks
        try:
            nat.setup(plan)
        except NatError as exc:
            out(error=str(exc))
    """)
    assert result == {"error": "filter broke"}
    # The raw, mangle and nat chains made before filter broke are gone again.
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"
    assert hub.ipsets() == []


def test_a_foreign_jump_to_our_chain_is_reported(hub):
    hub.nat("nat.setup(plan)")
    hub.ns.run("iptables-legacy -t mangle -N OTHER")
    hub.ns.run(f"iptables-legacy -t mangle -A OTHER -j PYTUN-{hub.tun}-MSS")
    result = hub.nat("""
        try:
            nat.teardown(tag, 4)
        except NatError as exc:
            out(error=str(exc))
    """)
    assert result["error"].startswith(f"cannot delete chain PYTUN-{hub.tun}-MSS:")
    assert result["error"].endswith("(does a rule pytun did not create jump to it?)")
    hub.ns.run("iptables-legacy -t mangle -F OTHER")
    hub.nat("nat.teardown(tag, 4)")
    assert ours(hub.saved()) == []
    assert hub.ip_forward() == "0"


UDP_ECHO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 5555))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(100)
        s.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
""")

ASK = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.settimeout(0.5)
    s.sendto(b"who am I", (sys.argv[1], 5555))
    try:
        print(s.recv(100).decode())
    except socket.timeout:
        print("no answer")
""")


def test_laptop_reaches_the_internet_masqueraded_only_as_a_rule_says(hub):
    server = hub.net.popen([sys.executable, "-u", "-c", UDP_ECHO, "192.0.2.2"],
                           stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline() == "ready\n"

    def ask(port: int = 4000) -> str:
        return hub.lap.python([ "-c", ASK, "192.0.2.2", str(port)]).stdout.strip()

    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)

    # Default deny: the hub answers pings (a rule allows it), the internet is out of reach.
    hub.nat("nat.setup(plan)")
    assert ping(hub.lap, "10.9.0.1")
    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)
    assert ask() == "no answer"

    # A live change: everyone may reach the internet, through NAT.
    hub.nat("nat.apply(plan)", rules=["everyone hub icmp", "everyone internet"])
    assert ping(hub.lap, "192.0.2.2", count=3)
    assert ask() == "192.0.2.1:4000"  # masqueraded, source port kept
    # The hub's own listen port is never handed to a laptop's flow (CVE-2021-3773 class).
    seen = ask(51820)
    assert seen.startswith("192.0.2.1:") and seen != "192.0.2.1:51820", seen

    hub.nat("nat.apply(plan)")  # the rule removed again: denied at once
    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)
    hub.nat("nat.teardown(tag, 4)")
    assert not ping(hub.lap, "192.0.2.2", timeout=0.3)
    assert ask() == "no answer"


def test_nothing_from_outside_starts_a_connection_to_a_laptop(hub):
    hub.net.run("ip route add 10.9.0.0/24 via 192.0.2.1")
    hub.ns.run("sysctl -qw net.ipv4.ip_forward=1")  # a router: forwarding was on before
    assert ping(hub.net, "10.9.0.2")  # without pytun, the uplink reaches the laptop
    hub.nat("nat.setup(plan)", rules=["everyone hub icmp", "everyone internet"])
    assert not ping(hub.net, "10.9.0.2", timeout=0.3)
    assert ping(hub.lap, "192.0.2.2")  # the laptop's own connection and its replies pass
    # Anti-spoofing: a packet from the uplink claiming a VPN source is dropped before routing.
    counts = hub.ns.run(f"iptables-legacy -t raw -L PYTUN-{hub.tun}-RAW -v -n -x").stdout
    before = int(counts.splitlines()[4].split()[0])
    hub.net.run("ip addr add 10.9.0.77/32 dev lo")
    assert not ping(hub.net, "198.51.100.2", source="10.9.0.77", timeout=0.3)
    counts = hub.ns.run(f"iptables-legacy -t raw -L PYTUN-{hub.tun}-RAW -v -n -x").stdout
    assert int(counts.splitlines()[4].split()[0]) >= before + 1
    hub.nat("nat.teardown(tag, 4)")
    assert hub.ip_forward() == "1"  # it was on before the hub: left on
    assert ping(hub.net, "10.9.0.2")


def test_forwarding_switched_on_by_the_hub_stays_for_the_tunnel_only(hub):
    assert hub.ip_forward() == "0"
    hub.nat("nat.setup(plan)", rules=["everyone hub icmp", "everyone internet"])
    assert hub.ip_forward() == "1"
    assert ping(hub.lap, "192.0.2.2")
    assert not ping(hub.net, "198.51.100.2", timeout=0.3)  # uplink to side: not through us
    assert not ping(hub.side, "192.0.2.2", timeout=0.3)
    hub.nat("nat.teardown(tag, 4)")
    assert hub.ip_forward() == "0"


def test_two_hubs_in_one_namespace_keep_to_their_own(hub, topology):
    other, _ = topology.veth(hub.ns, "10.8.0.1/24", topology.netns("lap"), "10.8.0.2/24")
    hub.ns.run("iptables-legacy -A FORWARD -m comment --comment pytun -j ACCEPT")
    hub.nat("nat.setup(plan)")
    first = ours(hub.saved(), hub.tun)
    hub.nat("nat.setup(plan)", tun=other)
    second = ours(hub.saved(), other)
    assert first and second and not set(first) & set(second)
    assert ours(hub.saved(), hub.tun) == first

    hub.nat(f"nat.cleanup(tag, {hub.state_dir!r})", tun=other)  # stop and clean up one
    assert ours(hub.saved(), other) == []
    assert ours(hub.saved(), hub.tun) == first
    assert all(line in ours(hub.saved()) for line in ISOLATE)
    assert hub.ip_forward() == "1"  # the other hub still forwards
    assert ping(hub.lap, "10.9.0.1")
    assert all(s.startswith(f"pt-{hub.tun}-") for s in hub.ipsets())

    hub.nat("nat.teardown(tag, 4)")
    assert hub.ip_forward() == "0"  # the last hub out switches forwarding off again
    assert ours(hub.saved()) == ["filter -A FORWARD -m comment --comment pytun -j ACCEPT"]


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


def test_an_ipv6_plan_is_exact_in_ip6tables_and_comes_out_again(hub):
    """The same plan shape for IPv6, in ip6tables (a process of its own: one family each)."""
    hub.ns.run(f"ip addr add fd09::1/64 dev {hub.tun} nodad")
    code = textwrap.dedent(f"""
        import json, time, ipaddress
        from pytun.server import firewall, nat, policy
        from pytun.server.registry import Peer
        view = policy.HubView({hub.tun!r}, (ipaddress.ip_network("fd09::/64"),),
                              (ipaddress.ip_address("fd09::1"),), 51820, 1420, None,
                              {hub.egress!r})
        rules = [policy.parse_rule("everyone", "hub", "icmp"),
                 policy.parse_rule("everyone", "internet")]
        plan = firewall.plan(view, [], rules, time.time(), 6)
        print(json.dumps(plan.lines()))
        print(json.dumps(nat.setup(plan.to_dict())))
    """)
    done = hub.ns.python(code)
    lines, warnings = map(json.loads, done.stdout.splitlines())
    assert warnings == ["IPv6 forwarding is now on: interfaces with accept_ra=1 stop taking"
                        " router advertisements (use accept_ra=2 on an uplink that needs them)"]
    expected, table = [], None
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
        else:
            expected.append(f"{table} {line}")
    saved, table = [], None
    for line in hub.ns.run("ip6tables-legacy-save").stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A") and f"PYTUN-{hub.tun}-" in line:
            saved.append(f"{table} {line}")
    assert sorted(saved) == sorted(expected)
    assert any("-p ipv6-icmp" in line for line in saved)
    assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert hub.ip_forward() == "0"  # IPv4 is not touched by an IPv6 plan
    hub.ns.python(f"from pytun.server import nat; nat.teardown({hub.tun!r}, 6)")
    assert "PYTUN" not in hub.ns.run("ip6tables-legacy-save").stdout
    assert hub.ns.sysctl("net.ipv6.conf.all.forwarding") == "0"


def test_cleanup_is_quiet_where_ipv6_tables_cannot_be_opened(hub):
    """`pytun-server --cleanup` runs before every start: on a host without ip6_tables it must
    still clean up IPv4 and succeed."""
    hub.nat("nat.setup(plan); os._exit(1)", check=False)  # a crashed IPv4 hub
    result = hub.nat(f"""
        real = nat._table
        def no_ipv6(family, name):
            if family == 6:
                raise NatError("cannot open the ip6tables filter table: Table does not exist")
            return real(family, name)
        nat._table = no_ipv6
        for family in (4, 6):
            nat._cleanup_family(tag, family, {hub.state_dir!r})
        out(ok=True)
    """)
    assert result == {"ok": True}
    assert ours(hub.saved()) == [] and hub.ip_forward() == "0" and hub.ipsets() == []
