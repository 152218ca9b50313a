"""server/policy.py: rule parsing, default rules, the kernel plan, and `explain`.

The plan is checked line by line for a small hub, and `explain` against a slow reference: a
walk through the plan's own chains, rule by rule, as netfilter would take a new connection. So
what `pytun-admin access explain` says is what the kernel does with the same registry.
"""

import collections
import ipaddress
import random

import pytest

from pytun.server import firewall, policy, state
from pytun.server.policy import PolicyError, Rule, parse_rule
from pytun.server.registry import Peer

KEYS = ["ZW9V06+oMaS1j0/9YvjkCfDTDCIkJ3ldRIkddzk8N0A=",
        "F3R5lQKmb7C84M88pbFlxtglatkvTO2iRYWj4apuBiQ=",
        "9nzvCqFqVqba9P5Oqdw+WsK2YOmBnBD7BJqoDts98F8=",
        "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="]
NOW = 1_800_000_000


def peer(name, n, groups=(), **kw) -> Peer:
    return Peer(name=name, public_key=KEYS[n], address=f"10.77.0.{n + 2}", groups=list(groups),
                **kw)


def view(**kw) -> policy.HubView:
    fields = dict(interface="pt0", subnets=(ipaddress.ip_network("10.77.0.0/24"),),
                  hub_addresses=(ipaddress.ip_address("10.77.0.1"),), listen_port=51820,
                  mtu=1420, egress="eth0")
    return policy.HubView(**{**fields, **kw})


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("words, text", [
    (("dev", "10.20.3.0/24", "tcp/5432"), "dev -> 10.20.3.0/24 tcp/5432"),
    (("dev", "10.20.3.4", "udp/8000-8100"), "dev -> 10.20.3.4/32 udp/8000-8100"),
    (("everyone", "hub", "icmp"), "everyone -> hub icmp"),
    (("full-tunnel", "internet"), "full-tunnel -> internet any"),
    (("peer:alice", "peer:bob", "tcp"), "peer:alice -> peer:bob tcp"),
    (("ops", "group:dev"), "ops -> dev any"),
    (("ops", "fd77::/64", "TCP/22"), "ops -> fd77::/64 tcp/22"),
])
def test_rules_are_parsed_and_printed_as_typed(words, text):
    assert parse_rule(*words).text() == text


@pytest.mark.parametrize("words, message", [
    (("10.0.0.0/8", "hub"), "a source is a group or peer:NAME"),
    (("dev", "10.20.3.1/24"), "bad network '10.20.3.1/24'"),
    (("dev", "hub", "sctp/5"), "bad service 'sctp/5'"),
    (("dev", "hub", "icmp/8"), "icmp has no ports"),
    (("dev", "hub", "tcp/0"), "ports are 1 to 65535"),
    (("dev", "hub", "tcp/90-80"), "first <= last"),
    (("dev", "hub", "tcp/http"), "bad port range 'http'"),
    (("Dev", "hub"), "bad group name 'Dev'"),
    (("dev\n", "hub"), "bad group name"),
    (("internet", "hub"), "bad group name 'internet'"),
    (("peer:", "hub"), "peer: needs a peer name"),
    (("dev", "fd77::1::2"), "bad network"),
])
def test_bad_rules_are_refused_with_one_line(words, message):
    with pytest.raises(PolicyError) as info:
        parse_rule(*words)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_default_rules_keep_the_documented_behaviour():
    s = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com",
                          dns=["10.77.0.1", "9.9.9.9"], routes=["10.20.0.0/16"])
    assert [r.text() for r in policy.default_rules(s)] == [
        "everyone -> hub icmp", "everyone -> hub udp/53", "everyone -> hub tcp/53",
        "everyone -> 10.20.0.0/16 any", "full-tunnel -> internet any"]
    s = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com",
                          allow_peer_to_peer=True)
    assert [r.text() for r in policy.default_rules(s)] == [
        "everyone -> hub icmp", "full-tunnel -> internet any", "everyone -> everyone any"]


# ------------------------------------------------------------------------------ the plan


def test_the_plan_of_a_small_hub_line_by_line():
    peers = [peer("alice", 0, ["dev"], sites=["192.168.50.0/24"]), peer("bob", 1),
             peer("carol", 2, ["dev"], disabled=True)]
    rules = [Rule("everyone", "hub", "icmp", id=1),
             Rule("dev", "10.20.3.0/24", "tcp", (5432, 5432), id=2),
             Rule("dev", "169.254.169.254/32", id=3),
             Rule("everyone", "internet", id=4, expires=NOW - 1),  # expired: absent
             Rule("peer:bob", "dev", "udp", (5000, 5100), id=5)]
    p = firewall.plan(view(), peers, rules, NOW, 4)
    src = firewall.set_name("pt0", "@sources", 4)
    everyone, dev = firewall.set_name("pt0", "everyone", 4), firewall.set_name("pt0", "dev", 4)
    bob = firewall.set_name("pt0", "peer:bob", 4)
    assert p.sets == {src: ["10.77.0.0/24", "192.168.50.0/24"],
                      everyone: ["10.77.0.2/32", "10.77.0.3/32", "192.168.50.0/24"],
                      dev: ["10.77.0.2/32", "192.168.50.0/24"],  # carol is disabled
                      bob: ["10.77.0.3/32"]}
    c = '-m comment --comment "pytun:pt0"'
    assert p.lines() == [
        "*raw",
        f"-A PREROUTING {c} -j PYTUN-pt0-RAW",
        "-A PYTUN-pt0-RAW -i pt0 -j RETURN",
        "-A PYTUN-pt0-RAW -i lo -j RETURN",
        f"-A PYTUN-pt0-RAW -m set --match-set {src} src -j DROP",
        "-A PYTUN-pt0-RAW -d 10.77.0.1/32 -j DROP",
        "*mangle",
        f"-A FORWARD {c} -j PYTUN-pt0-MSS",
        "-A PYTUN-pt0-MSS -o pt0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS"
        " --clamp-mss-to-pmtu",
        "-A PYTUN-pt0-MSS -i pt0 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1380",
        "*nat",
        f"-A POSTROUTING {c} -j PYTUN-pt0-NAT",
        f"-A PYTUN-pt0-NAT -o eth0 -p udp -m set --match-set {src} src -m udp --sport 1:51819"
        " -j MASQUERADE --to-ports 1-51819",
        f"-A PYTUN-pt0-NAT -o eth0 -p udp -m set --match-set {src} src -m udp --sport"
        " 51821:65535 -j MASQUERADE --to-ports 51821-65535",
        f"-A PYTUN-pt0-NAT -o eth0 -p udp -m set --match-set {src} src -m udp --sport 51820"
        " -j MASQUERADE --to-ports 1-51819",
        f"-A PYTUN-pt0-NAT -o eth0 -m set --match-set {src} src -j MASQUERADE",
        "*filter",
        f"-A FORWARD {c} -j PYTUN-pt0-FWD",
        f"-A INPUT -i pt0 {c} -j PYTUN-pt0-IN",
        "-A PYTUN-pt0-FWD ! -i pt0 ! -o pt0 -j RETURN",
        "-A PYTUN-pt0-FWD -m conntrack --ctstate INVALID -j DROP",
        "-A PYTUN-pt0-FWD -m conntrack --ctstate RELATED -j ACCEPT",
        "-A PYTUN-pt0-FWD -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT",
        "-A PYTUN-pt0-FWD ! -i pt0 -j DROP",
        "-A PYTUN-pt0-FWD -j PYTUN-pt0-POL",
        "-A PYTUN-pt0-FWD -j DROP",
        "-A PYTUN-pt0-IN -m conntrack --ctstate INVALID -j DROP",
        "-A PYTUN-pt0-IN -m conntrack --ctstate RELATED -j ACCEPT",
        "-A PYTUN-pt0-IN -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT",
        "-A PYTUN-pt0-IN -j PYTUN-pt0-POL",
        "-A PYTUN-pt0-IN -j DROP",
        "-A PYTUN-pt0-POL -d 127.0.0.0/8 -j PYTUN-pt0-SPC",
        "-A PYTUN-pt0-POL -d 169.254.0.0/16 -j PYTUN-pt0-SPC",
        "-A PYTUN-pt0-POL -d 224.0.0.0/4 -j PYTUN-pt0-SPC",
        f"-A PYTUN-pt0-POL -p icmp -m comment --comment \"rule 1\" -m addrtype --dst-type LOCAL -m set --match-set {everyone}"
        " src -j ACCEPT",
        f"-A PYTUN-pt0-POL -d 10.20.3.0/24 -p tcp -m comment --comment \"rule 2\" -m set --match-set {dev} src -m tcp --dport"
        " 5432 -j ACCEPT",
        f"-A PYTUN-pt0-POL -p udp -m comment --comment \"rule 5\" -m set --match-set {bob} src -m set --match-set {dev} dst"
        " -m udp --dport 5000:5100 -j ACCEPT",
        f"-A PYTUN-pt0-SPC -d 169.254.169.254/32 -m comment --comment \"rule 3\" -m set --match-set {dev} src -j ACCEPT",
        "-A PYTUN-pt0-SPC -j DROP",
    ]
    assert firewall.plan(view(), peers, rules, NOW, 6) is None  # no IPv6 subnet
    assert policy.next_expiry(rules, NOW - 10) == NOW - 1
    assert policy.reaches_peers(view(), peers, rules, NOW)  # rule 5: bob to dev's laptops
    assert not policy.reaches_peers(view(), peers, rules[:4], NOW)


def test_names_fit_the_kernel_and_never_collide_between_hubs():
    longest = "a" * 15
    assert len(firewall.chain(longest, "POL")) <= 28  # XT_EXTENSION_MAXNAMELEN - 1
    assert len(firewall.set_name(longest, "everyone", 6)) <= 31  # IPSET_MAXNAMELEN - 1
    # Hub "pt" and hub "pt-a": one's names are never the other's.
    from pytun.server import nat
    name = firewall.set_name("pt-a", "dev", 4)
    assert nat._is_our_set(name, "pt-a", 4) and not nat._is_our_set(name, "pt", 4)
    assert not nat._is_our_set(firewall.set_name("pt", "dev", 4), "pt", 6)


def test_a_listen_port_at_either_end_of_the_range_is_never_a_masquerade_port():
    for port in (1, 1024, 65535):
        p = firewall.plan(view(listen_port=port), [], [], NOW, 4)
        for rule in p.chains["PYTUN-pt0-NAT"]:
            if rule.get("to_ports"):
                lo, hi = map(int, rule["to_ports"].split("-"))
                assert not lo <= port <= hi and lo <= hi, (port, rule)


# ------------------------------------------------------------------------------ explain

LOCAL = {ipaddress.ip_address(a) for a in ("10.77.0.1", "192.0.2.1", "203.0.113.1")}
INTERNET = ipaddress.ip_network("0.0.0.0/0")
LAN = ipaddress.ip_network("10.20.0.0/16")  # behind the hub, not via egress


def _explain(peers, rules, name, dst, service=None):
    return policy.explain(peers, rules, name, dst, service, NOW, is_local=lambda ip: ip in LOCAL,
                          via_egress=lambda ip: ip not in LAN and
                          not ip.is_private and ip not in LOCAL)


DB = [Rule("dev", "10.20.3.0/24", "tcp", (5432, 5432), id=1),
      Rule("ops", "10.20.3.0/24", id=2),
      Rule("everyone", "hub", "icmp", id=3),
      Rule("full-tunnel", "internet", id=4),
      Rule("ops", "169.254.169.254/32", "tcp", (80, 80), id=5),
      Rule("dev", "internet", "udp", (53, 53), id=6, expires=NOW)]  # expired at NOW
TEAM = [peer("alice", 0, ["dev"]), peer("olga", 1, ["ops"]), peer("fred", 2, full_tunnel=True),
        peer("dora", 3, ["dev"], disabled=True)]


@pytest.mark.parametrize("who, dst, service, verdict", [
    ("alice", "10.20.3.4", "tcp/5432", "allow: rule #1 dev -> 10.20.3.0/24 tcp/5432"),
    ("alice", "10.20.3.4", "tcp/22", "deny: no rule allows it (default deny)"),
    ("alice", "10.20.3.4", None, "deny: no rule allows it (default deny)"),
    ("olga", "10.20.3.4", "tcp/22", "allow: rule #2 ops -> 10.20.3.0/24 any"),
    ("olga", "10.20.3.4", "tcp/5432", "allow: rule #2 ops -> 10.20.3.0/24 any"),
    ("alice", "10.77.0.1", "icmp", "allow: rule #3 everyone -> hub icmp"),
    ("alice", "203.0.113.1", "icmp", "allow: rule #3 everyone -> hub icmp"),
    ("alice", "10.77.0.1", "tcp/22", "deny: no rule allows it (default deny)"),
    ("fred", "8.8.8.8", "udp/53", "allow: rule #4 full-tunnel -> internet any"),
    ("alice", "8.8.8.8", "udp/53", "deny: no rule allows it (default deny)"),  # rule 6 expired
    ("fred", "169.254.169.254", "tcp/80",
     "deny: 169.254.169.254 is in 169.254.0.0/16, which only a rule naming it opens"),
    ("olga", "169.254.169.254", "tcp/80", "allow: rule #5 ops -> 169.254.169.254/32 tcp/80"),
    ("alice", "10.77.0.3", "icmp", "deny: no rule allows it (default deny)"),  # olga
    ("dora", "10.77.0.1", "icmp", "deny: peer dora is disabled: the hub refuses its handshakes"),
    ("ALICE", "10.20.3.4", "tcp/5432", "allow: rule #1 dev -> 10.20.3.0/24 tcp/5432"),
    ("alice", "fd77::1", "icmp", "deny: peer alice has no IPv6 address"),
])
def test_explain_case_table(who, dst, service, verdict):
    assert _explain(TEAM, DB, who, dst, service).text() == verdict


def test_explain_refuses_what_it_cannot_answer():
    for args, message in ((("nobody", "10.0.0.1"), "no peer named 'nobody'"),
                          (("alice", "10.0.0.0/8"), "is not an IP address"),
                          (("alice", "10.0.0.1", "tcp/1-2"), "one port, not a range")):
        with pytest.raises(PolicyError, match=message):
            _explain(TEAM, DB, *args)


# --- explain against a walk through the plan (the slow reference) ---------------------------

def _walk(p, chain_name, pkt) -> str | None:
    """netfilter's verdict for a NEW connection `pkt` in one of our chains: ACCEPT, DROP or
    None (RETURN / fell off the end)."""
    for rule in p.chains[chain_name]:
        if not all(_matches(p, key, value, pkt) for key, value in rule.items()
                   if key not in ("target", "comment")):
            continue
        target = rule["target"]
        if target in ("ACCEPT", "DROP"):
            return target
        if target == "RETURN":
            return None
        verdict = _walk(p, target, pkt)
        if verdict is not None:
            return verdict
    return None


def _matches(p, key, value, pkt) -> bool:
    if key in ("in", "out"):
        negate, name = value.startswith("!"), value.lstrip("!")
        return (pkt[key] == name) != negate
    if key in ("src", "dst"):
        return pkt[key] in ipaddress.ip_network(value)
    if key == "proto":
        return pkt["proto"] == value
    if key == "dport":
        lo, _, hi = value.partition(":")
        return pkt["port"] is not None and int(lo) <= pkt["port"] <= int(hi or lo)
    if key in ("set_src", "set_dst"):
        ip = pkt["src" if key == "set_src" else "dst"]
        return any(ip in ipaddress.ip_network(e) for e in p.sets[value])
    if key == "addrtype":
        return pkt["local"]
    if key == "ctstate":  # a new connection is neither INVALID, RELATED nor ESTABLISHED
        return False
    raise AssertionError(f"the reference does not know {key}")


GROUPS = ["dev", "ops", "qa"]
DESTS = ["10.20.3.4", "10.20.9.9", "8.8.8.8", "169.254.169.254", "10.77.0.1", "203.0.113.1",
         "10.77.0.2", "10.77.0.3", "10.77.0.4", "192.168.50.7"]
CIDRS = ["10.20.3.0/24", "10.20.0.0/16", "0.0.0.0/0", "169.254.169.254/32", "169.254.0.0/16",
         "10.77.0.0/24", "192.168.50.0/24", "8.8.8.0/24"]

SOURCES = ["everyone", "full-tunnel", *GROUPS, "peer:alice", "peer:bob"]
DESTINATIONS = ["hub", "internet", *CIDRS, *GROUPS, "everyone", "peer:carol"]
SERVICES = [("any", None), ("tcp", None), ("udp", None), ("icmp", None), ("tcp", (22, 22)),
            ("tcp", (5432, 5432)), ("udp", (1, 1024))]


def _case(rnd):
    spec = [(rnd.sample(GROUPS, rnd.randint(0, 2)), rnd.random() < 0.3, rnd.random() < 0.15)
            for _ in range(3)]
    rules = [Rule(rnd.choice(SOURCES), rnd.choice(DESTINATIONS), *rnd.choice(SERVICES), id=i + 1)
             for i in range(rnd.randint(0, 6))]
    return (spec, rules, rnd.choice(["alice", "bob", "carol"]), rnd.choice(DESTS),
            rnd.choice(["tcp", "udp", "icmp"]), rnd.choice([22, 80, 5432, 6000]))


def test_explain_agrees_with_the_kernel_plan():
    """3,000 seeded random registries, rule sets and packets."""
    rnd = random.Random(1)
    outcomes = collections.Counter()
    for _ in range(3000):
        outcomes[_agree(*_case(rnd))] += 1
    assert outcomes["ACCEPT"] > 150 and outcomes["DROP"] > 1000, outcomes


def _agree(spec, rules, who, dst, proto, port) -> str:
    peers = [peer(name, i, groups, full_tunnel=full, disabled=off,
                  sites=["192.168.50.0/24"] if name == "carol" else [])
             for i, (name, (groups, full, off)) in enumerate(zip(["alice", "bob", "carol"], spec))]
    p = firewall.plan(view(), peers, rules, NOW, 4)
    ip = ipaddress.ip_address(dst)
    me = next(x for x in peers if x.name == who)
    local = ip in LOCAL
    to_peer = any(ip in n for x in peers for n in policy.networks_of(x))
    out = None if local else ("pt0" if to_peer else "lan0" if ip in LAN else "eth0")
    pkt = {"in": "pt0", "out": out, "src": me.address.ip, "dst": ip, "local": local,
           "proto": proto, "port": None if proto == "icmp" else port}
    kernel = _walk(p, "PYTUN-pt0-IN" if local else "PYTUN-pt0-FWD", pkt) or "DROP"
    if me.disabled:  # the engine refuses a disabled peer before the kernel sees anything
        kernel = "DROP"
    verdict = policy.explain(peers, rules, who, dst, proto if proto == "icmp" else
                             f"{proto}/{port}", NOW, is_local=lambda a: a in LOCAL,
                             via_egress=lambda a: out == "eth0")
    assert (kernel == "ACCEPT") == verdict.allowed, (verdict, pkt, [r.text() for r in rules])
    return kernel


def test_ipset_changes_are_written_as_a_difference_or_refilled_aside():
    from pytun.server import nat
    sets = {"pt-a-00000001-4": ["10.77.0.2/32", "10.77.0.4/32"], "pt-a-00000002-4": []}
    # First time, nothing in the kernel: create and fill.
    assert nat.sets_script(4, sets, None, set()).splitlines() == [
        "create pt-a-00000001-4 hash:net family inet maxelem 65536",
        "add pt-a-00000001-4 10.77.0.2/32", "add pt-a-00000001-4 10.77.0.4/32",
        "create pt-a-00000002-4 hash:net family inet maxelem 65536"]
    # After a crash the sets exist but what they hold is unknown: refilled aside, swapped in.
    lines = nat.sets_script(4, {"pt-a-00000001-4": ["10.77.0.2/32"]}, None,
                            {"pt-a-00000001-4", "pt-a-00000001-4t"})
    assert lines.splitlines() == [
        "destroy pt-a-00000001-4t", "create pt-a-00000001-4t hash:net family inet maxelem 65536",
        "add pt-a-00000001-4t 10.77.0.2/32", "swap pt-a-00000001-4t pt-a-00000001-4",
        "destroy pt-a-00000001-4t"]
    # A peer moving between groups is one del and one add.
    moved = {"pt-a-00000001-4": ["10.77.0.2/32"], "pt-a-00000002-4": ["10.77.0.4/32"]}
    assert nat.sets_script(6 - 2, moved, sets, set(sets)).splitlines() == [
        "del pt-a-00000001-4 10.77.0.4/32 -exist", "add pt-a-00000002-4 10.77.0.4/32 -exist"]
    assert nat.sets_script(4, sets, sets, set(sets)) == ""
    assert "family inet6" in nat.sets_script(6, {"pt-a-00000003-6": ["fd77::2/128"]}, None, set())
    assert nat.only_sets_differ({"family": 4, "sets": {"x": ["1"]}, "chains": {}},
                                {"family": 4, "sets": {"x": []}, "chains": {}})
    assert not nat.only_sets_differ({"family": 4, "sets": {}, "chains": {"c": []}},
                                    {"family": 4, "sets": {}, "chains": {}})
    assert not nat.only_sets_differ({"family": 4, "sets": {}}, None)
