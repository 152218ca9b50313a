"""The kernel plan of the access policy: chains, rules and ipsets, for one hub and one family.

Pure: a `policy.HubView`, registry peers, access rules and `now` in; a `Plan` out, which
`nat.py` makes the kernel hold. Per address family, for a hub whose TUN is T:

    raw     PREROUTING  -j PYTUN-T-RAW      anti-spoofing before routing and conntrack
    filter  FORWARD     -j PYTUN-T-FWD      replies, no new connections into the tunnel, policy
            INPUT       -i T -j PYTUN-T-IN  laptops to the hub itself go through the same policy
            PYTUN-T-POL                     one ACCEPT per rule, on ipset address sets
            PYTUN-T-SPC                     rules that name a link-local/loopback/multicast CIDR
    nat     POSTROUTING -j PYTUN-T-NAT      masquerade out of egress, never onto the listen port
    mangle  FORWARD     -j PYTUN-T-MSS      MSS clamping

Each jump carries the comment `pytun:T`. Group membership lives in ipsets
(`pt-T-HASH-4`, hash:net), so the rule count grows with rules, not with peers times rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from .policy import HUB, INTERNET, SPECIAL, HubView, cidr, effective, members, networks_of

ICMP = {4: "icmp", 6: "ipv6-icmp"}
CHAINS = {"RAW": "raw", "FWD": "filter", "IN": "filter", "POL": "filter", "SPC": "filter",
          "NAT": "nat", "MSS": "mangle"}
ISOLATE = "PYTUN-ISOLATE"  # shared: forwarding was off before any hub switched it on
TCP_HEADERS = {4: 40, 6: 60}


def chain(tag: str, suffix: str) -> str:
    return f"PYTUN-{tag}-{suffix}"


def set_name(tag: str, key: str, family: int) -> str:
    """An ipset name of at most 31 characters: 'pt-' TAG '-' 8 hex '-' family."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return f"pt-{tag}-{digest}-{family}"


def comment(tag: str) -> str:
    return f"pytun:{tag}"


def _set_entries(networks) -> list[str]:
    """hash:net sets refuse /0; split it in halves."""
    out = []
    for net in networks:
        if net.prefixlen == 0:
            out += [str(n) for n in net.subnets(1)]
        else:
            out.append(str(net))
    return sorted(set(out))


def _port_ranges(listen_port: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo, hi in ((1, listen_port - 1), (listen_port + 1, 65535)) if lo <= hi]


@dataclass
class Plan:
    """Everything pytun puts in one address family's netfilter for one hub."""

    family: int
    tag: str
    sets: dict[str, list[str]] = field(default_factory=dict)  # ipset name -> CIDRs
    chains: dict[str, list[dict]] = field(default_factory=dict)  # chain -> rules, in order
    jumps: list[dict] = field(default_factory=list)  # {table, chain, target, in}
    egress: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        return cls(**d)

    def table_of(self, chain_name: str) -> str:
        return CHAINS[chain_name.rsplit("-", 1)[1]]

    def lines(self) -> list[str]:
        """The plan as iptables-save lines, table by table (for tests and the README)."""
        out = []
        for table in ("raw", "mangle", "nat", "filter"):
            names = [c for c in self.chains if self.table_of(c) == table]
            if not names:
                continue
            out.append(f"*{table}")
            for j in self.jumps:
                if j["table"] == table:
                    out.append(f"-A {j['chain']} {render(j)}")
            for name in names:
                for rule in self.chains[name]:
                    out.append(f"-A {name} {render(rule)}")
        return out


def render(rule: dict) -> str:
    """One rule dict in iptables-save's order and spelling."""
    words = []
    for key, flag in (("src", "-s"), ("dst", "-d"), ("in", "-i"), ("out", "-o")):
        value = rule.get(key)
        if value:
            words += ["!", flag, value[1:]] if value.startswith("!") else [flag, value]
    if rule.get("proto"):
        words += ["-p", rule["proto"]]
    if rule.get("comment"):
        words += ["-m", "comment", "--comment", f'"{rule["comment"]}"']
    if rule.get("ctstate"):
        words += ["-m", "conntrack", "--ctstate", rule["ctstate"]]
        if rule.get("ctdir"):
            words += ["--ctdir", rule["ctdir"]]
    if rule.get("addrtype"):
        words += ["-m", "addrtype", "--dst-type", rule["addrtype"]]
    for key, direction in (("set_src", "src"), ("set_dst", "dst")):
        if rule.get(key):
            words += ["-m", "set", "--match-set", rule[key], direction]
    if rule.get("sport") or rule.get("dport") or rule.get("tcp_flags"):
        words += ["-m", rule["proto"]]
        if rule.get("sport"):
            words += ["--sport", rule["sport"]]
        if rule.get("dport"):
            words += ["--dport", rule["dport"]]
        if rule.get("tcp_flags"):
            words += ["--tcp-flags", *rule["tcp_flags"]]
    words += ["-j", rule["target"]]
    for key, flag in (("to_ports", "--to-ports"), ("set_mss", "--set-mss")):
        if rule.get(key):
            words += [flag, rule[key]]
    if rule.get("clamp_mss_to_pmtu"):
        words.append("--clamp-mss-to-pmtu")
    return " ".join(words)


def _ports(ports: tuple[int, int]) -> str:
    lo, hi = ports
    return str(lo) if lo == hi else f"{lo}:{hi}"


def plan(view: HubView, peers, rules, now: float, family: int) -> Plan | None:
    """The netfilter plan for one address family, or None when the hub has no subnet of it."""
    subnets = [n for n in view.subnets if n.version == family]
    if not subnets:
        return None
    tag, tun = view.interface, view.interface
    egress = view.egress if family == 4 else view.egress6
    out = Plan(family, tag, egress=egress)
    enabled = [p for p in peers if not p.disabled]
    name = lambda suffix: chain(tag, suffix)  # noqa: E731

    def add_set(key: str, networks) -> str:
        set_ = set_name(tag, key, family)
        out.sets[set_] = _set_entries(n for n in networks if n.version == family)
        return set_

    sources = add_set("@sources", [*subnets, *(s for p in enabled for s in p.sites)])

    def members_set(who: str) -> str:
        return add_set(who, [n for p in members(enabled, who) for n in networks_of(p)])

    # Anti-spoofing, before routing: the tunnel's addresses come only from the tunnel.
    out.chains[name("RAW")] = [
        {"in": tun, "target": "RETURN"},
        {"in": "lo", "target": "RETURN"},
        {"set_src": sources, "target": "DROP"},
        *({"dst": f"{ip}/{ip.max_prefixlen}", "target": "DROP"}
          for ip in view.hub_addresses if ip.version == family),
    ]
    out.chains[name("FWD")] = [
        {"in": "!" + tun, "out": "!" + tun, "target": "RETURN"},
        {"ctstate": "INVALID", "target": "DROP"},
        {"ctstate": "RELATED", "target": "ACCEPT"},
        {"ctstate": "ESTABLISHED", "ctdir": "REPLY", "target": "ACCEPT"},
        {"in": "!" + tun, "target": "DROP"},
        {"target": name("POL")},
        {"target": "DROP"},
    ]
    out.chains[name("IN")] = [
        {"ctstate": "INVALID", "target": "DROP"},
        {"ctstate": "RELATED", "target": "ACCEPT"},
        {"ctstate": "ESTABLISHED", "ctdir": "REPLY", "target": "ACCEPT"},
        {"target": name("POL")},
        {"target": "DROP"},
    ]
    policy = [{"dst": str(n), "target": name("SPC")} for n in SPECIAL[family]]
    special = []
    for rule in effective(rules, now):
        match: dict = {"set_src": members_set(rule.source)}
        if rule.id is not None:  # iptables -L -v then counts each rule's packets
            match["comment"] = f"rule {rule.id}"
        if rule.protocol != "any":
            match["proto"] = ICMP[family] if rule.protocol == "icmp" else rule.protocol
            if rule.ports is not None:
                match["dport"] = _ports(rule.ports)
        dest = rule.destination
        if dest == HUB:
            match["addrtype"] = "LOCAL"
        elif dest == INTERNET:
            if egress is None:
                continue
            match["out"] = egress
        elif (net := cidr(dest)) is not None:
            if net.version != family:
                continue
            match["dst"] = str(net)
            if any(net.subnet_of(s) for s in SPECIAL[family]):
                special.append({**match, "target": "ACCEPT"})
                continue
        else:
            match["set_dst"] = members_set(dest)
        policy.append({**match, "target": "ACCEPT"})
    out.chains[name("POL")] = policy
    out.chains[name("SPC")] = [*special, {"target": "DROP"}]

    if egress is not None:
        nat = []
        for lo, hi in _port_ranges(view.listen_port):
            nat.append({"out": egress, "proto": "udp", "set_src": sources,
                        "sport": f"{lo}:{hi}" if lo != hi else str(lo),
                        "target": "MASQUERADE", "to_ports": f"{lo}-{hi}"})
        widest = max(_port_ranges(view.listen_port), key=lambda r: r[1] - r[0])
        nat.append({"out": egress, "proto": "udp", "set_src": sources,
                    "sport": str(view.listen_port), "target": "MASQUERADE",
                    "to_ports": f"{widest[0]}-{widest[1]}"})
        nat.append({"out": egress, "set_src": sources, "target": "MASQUERADE"})
        out.chains[name("NAT")] = nat
    out.chains[name("MSS")] = [
        {"out": tun, "proto": "tcp", "tcp_flags": ["SYN,RST", "SYN"], "target": "TCPMSS",
         "clamp_mss_to_pmtu": True},
        {"in": tun, "proto": "tcp", "tcp_flags": ["SYN,RST", "SYN"], "target": "TCPMSS",
         "set_mss": str(view.mtu - TCP_HEADERS[family])},
    ]
    jump = lambda table, builtin, suffix, **kw: {  # noqa: E731
        "table": table, "chain": builtin, "comment": comment(tag), "target": name(suffix), **kw}
    out.jumps = [jump("raw", "PREROUTING", "RAW"), jump("mangle", "FORWARD", "MSS"),
                 jump("filter", "FORWARD", "FWD"), jump("filter", "INPUT", "IN", **{"in": tun})]
    if egress is not None:
        out.jumps.insert(2, jump("nat", "POSTROUTING", "NAT"))
    return out
