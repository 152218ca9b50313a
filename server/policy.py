"""The hub's forwarding policy: groups, access rules, and what they compile to.

Pure: hub settings, registry rows and `now` in; an explanation (`explain`) or a netfilter plan
(`plan`) out. `nat.py` carries a plan out in the kernel; `pytun-admin access explain` answers
from the same `effective` rules, so what it says is what the kernel does.

The model, default deny:
- A peer belongs to groups; every peer is in `everyone`, and a full-tunnel peer also in
  `full-tunnel`. A peer's networks are its address and its sites.
- A rule lets a source (a group, or `peer:NAME`) reach a destination: a CIDR, `hub` (any of the
  hub host's own addresses), `internet` (whatever the hub routes out of its egress interface),
  or a group or `peer:NAME` (laptop to laptop), optionally one protocol (tcp, udp, icmp) and a
  port range, optionally until an expiry time.
- What no rule allows is dropped, for traffic from laptops to anywhere, the hub included.
  Replies to allowed traffic pass (conntrack). Nothing from outside the tunnel starts a
  connection to a laptop.
- Link-local, loopback and multicast destinations are reached only through a rule whose CIDR
  lies inside them: `0.0.0.0/0` or `internet` never opens 169.254.169.254.

Kernel layout for a hub whose TUN is T, per address family (`plan`):

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
import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

IPNetwork = IPv4Network | IPv6Network

EVERYONE = "everyone"
FULL_TUNNEL = "full-tunnel"
IMPLICIT_GROUPS = (EVERYONE, FULL_TUNNEL)
HUB = "hub"
INTERNET = "internet"
RESERVED = {HUB, INTERNET, "any", "all", "peer", "group"}
PROTOCOLS = ("any", "tcp", "udp", "icmp")
GROUP_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")

# Never forwarded unless a rule's CIDR lies inside one of them.
SPECIAL = {
    4: [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4")],
    6: [ipaddress.ip_network(n) for n in ("::1/128", "fe80::/10", "ff00::/8")],
}
ICMP = {4: "icmp", 6: "ipv6-icmp"}
CHAINS = {"RAW": "raw", "FWD": "filter", "IN": "filter", "POL": "filter", "SPC": "filter",
          "NAT": "nat", "MSS": "mangle"}
ISOLATE = "PYTUN-ISOLATE"  # shared: forwarding was off before any hub switched it on
TCP_HEADERS = {4: 40, 6: 60}


class PolicyError(ValueError):
    """A rule or group that cannot be; the message says why in one line."""


# ------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    source: str  # a group name, or "peer:NAME"
    destination: str  # "hub", "internet", a CIDR, a group name, or "peer:NAME"
    protocol: str = "any"
    ports: tuple[int, int] | None = None
    expires: int | None = None  # unix seconds; gone from the kernel from then on
    comment: str = ""
    id: int | None = field(default=None, compare=False)

    def service(self) -> str:
        if self.protocol == "any":
            return "any"
        if self.ports is None:
            return self.protocol
        lo, hi = self.ports
        return f"{self.protocol}/{lo}" if lo == hi else f"{self.protocol}/{lo}-{hi}"

    def text(self) -> str:
        """'dev -> 10.20.3.0/24 tcp/5432', as the rule is typed and listed."""
        return f"{self.source} -> {self.destination} {self.service()}"

    def active(self, now: float) -> bool:
        return self.expires is None or now < self.expires


def check_group_name(name: str) -> str:
    if not isinstance(name, str) or not GROUP_RE.fullmatch(name) or name in RESERVED:
        raise PolicyError(f"bad group name {name!r}: 1-32 of a-z 0-9 . _ - (not "
                          f"{', '.join(sorted(RESERVED))})")
    return name


def parse_service(text: str | None) -> tuple[str, tuple[int, int] | None]:
    """'tcp/5432', 'udp/8000-8100', 'icmp', 'tcp', 'any' or None -> (protocol, ports)."""
    if text is None or text == "" or text == "any":
        return "any", None
    proto, _, ports = text.partition("/")
    proto = proto.lower()
    if proto not in PROTOCOLS or proto == "any":
        raise PolicyError(f"bad service {text!r}: use tcp, udp or icmp, with /PORT or "
                          "/FIRST-LAST for tcp and udp")
    if not ports:
        return proto, None
    if proto == "icmp":
        raise PolicyError(f"bad service {text!r}: icmp has no ports")
    lo, _, hi = ports.partition("-")
    try:
        first, last = int(lo), int(hi or lo)
    except ValueError:
        raise PolicyError(f"bad port range {ports!r}: use PORT or FIRST-LAST") from None
    if not 1 <= first <= last <= 65535:
        raise PolicyError(f"bad port range {ports!r}: ports are 1 to 65535, first <= last")
    return proto, (first, last)


def _cidr(text: str) -> IPNetwork | None:
    """A stored destination's network, or None for the words and group names."""
    return ipaddress.ip_network(text) if "/" in text else None


def _typed_network(text: str) -> IPNetwork | None:
    """What an operator typed, as a network: '10.20.0.0/16', '10.20.3.4', 'fd00::/64'; None
    for a word. Group names hold no '/' or ':' and are not addresses."""
    if "/" in text or ":" in text:
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise PolicyError(f"bad network {text!r}: {exc}") from None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ipaddress.ip_network(ip)


def parse_rule(source: str, destination: str, service: str | None = None, *,
               expires: int | None = None, comment: str = "") -> Rule:
    """A checked Rule from what an operator typed; names are checked, not looked up."""
    if source.startswith("peer:"):
        if not source[5:]:
            raise PolicyError("peer: needs a peer name")
    elif _typed_network(source) is not None:
        raise PolicyError(f"bad source {source!r}: a source is a group or peer:NAME; "
                          "rules allow laptops to reach things, not networks to reach laptops")
    else:
        check_group_name(source)
    if destination.startswith("group:"):
        destination = check_group_name(destination[6:])
    elif destination in (HUB, INTERNET) or destination.startswith("peer:"):
        if destination == "peer:":
            raise PolicyError("peer: needs a peer name")
    elif (net := _typed_network(destination)) is not None:
        destination = str(net)
    else:
        check_group_name(destination)
    protocol, ports = parse_service(service)
    if "\n" in comment or len(comment) > 200:
        raise PolicyError("a rule's comment is one line of at most 200 characters")
    return Rule(source, destination, protocol, ports, expires, comment)


# ------------------------------------------------------------------------------ who is what


def groups_of(peer) -> list[str]:
    """Every group a registry peer is in, the implicit ones included."""
    found = [EVERYONE, *([FULL_TUNNEL] if peer.full_tunnel else []), *peer.groups]
    return list(dict.fromkeys(found))


def networks_of(peer) -> list[IPNetwork]:
    addresses = [peer.address, *([peer.address6] if getattr(peer, "address6", None) else [])]
    return [*(ipaddress.ip_network(a, strict=False) for a in addresses), *peer.sites]


def members(peers, who: str) -> list:
    """The enabled peers that a source or destination word names."""
    if who.startswith("peer:"):
        name = who[5:].lower()
        return [p for p in peers if not p.disabled and p.name.lower() == name]
    return [p for p in peers if not p.disabled and who in groups_of(p)]


@dataclass(frozen=True)
class HubView:
    """What the policy needs to know of the hub."""

    interface: str
    subnets: tuple[IPNetwork, ...]
    hub_addresses: tuple  # the hub's tunnel addresses (ipaddress objects)
    listen_port: int
    mtu: int
    egress: str | None = None  # interface out to the internet (IPv4)
    egress6: str | None = None

    @classmethod
    def from_settings(cls, settings, egress=None, egress6=None) -> "HubView":
        subnets = tuple(getattr(settings, "subnets", None) or [settings.subnet])
        addresses = tuple(n.network_address + 1 for n in subnets)
        return cls(settings.interface, subnets, addresses, settings.listen_port, settings.mtu,
                   egress, egress6)


def default_rules(settings) -> list[Rule]:
    """What `init` writes: the behaviour of a hub without access rules, each a visible rule."""
    view = HubView.from_settings(settings)
    rules = [Rule(EVERYONE, HUB, "icmp", comment="laptops ping the hub")]
    if any(ip in view.hub_addresses for ip in settings.dns):
        rules += [Rule(EVERYONE, HUB, proto, (53, 53), comment="DNS on the hub")
                  for proto in ("udp", "tcp")]
    rules += [Rule(EVERYONE, str(net), comment="a network behind the hub (--route)")
              for net in settings.routes]
    rules.append(Rule(FULL_TUNNEL, INTERNET, comment="full-tunnel laptops reach the internet"))
    if settings.allow_peer_to_peer:
        rules.append(Rule(EVERYONE, EVERYONE, comment="laptops reach each other"))
    return rules


# ------------------------------------------------------------------------------ explain


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    rule: Rule | None = None

    def text(self) -> str:
        return f"{'allow' if self.allowed else 'deny'}: {self.reason}"


def _service_matches(rule: Rule, protocol: str, port: int | None) -> bool:
    if rule.protocol == "any":
        return True
    if rule.protocol != protocol:
        return False
    if rule.ports is None:
        return True
    return port is not None and rule.ports[0] <= port <= rule.ports[1]


def special_range(ip) -> IPNetwork | None:
    return next((n for n in SPECIAL[ip.version] if ip in n), None)


def explain(peers, rules, peer_name: str, destination: str, service: str | None, now: float, *,
            is_local, via_egress) -> Verdict:
    """Allow or deny for a packet from peer `peer_name` to `destination` (an address) with
    `service` ('tcp/5432', 'icmp', None for any), and the rule that decided.

    `is_local(ip)`: is it one of the hub host's own addresses; `via_egress(ip)`: would the hub
    route it out of its egress interface. Rules are checked in the kernel's order.
    """
    try:
        ip = ipaddress.ip_address(destination)
    except ValueError:
        raise PolicyError(f"{destination!r} is not an IP address") from None
    protocol, ports = parse_service(service)
    if ports is not None and ports[0] != ports[1]:
        raise PolicyError("explain takes one port, not a range")
    port = ports[0] if ports else None
    peer = next((p for p in peers if p.name.lower() == peer_name.lower()), None)
    if peer is None:
        raise PolicyError(f"no peer named {peer_name!r}")
    if peer.disabled:
        return Verdict(False, f"peer {peer.name} is disabled: the hub refuses its handshakes")
    if not any(n.version == ip.version for n in networks_of(peer)):
        return Verdict(False, f"peer {peer.name} has no IPv{ip.version} address")
    local = is_local(ip)
    special = special_range(ip)
    for rule in effective(rules, now):
        if not (rule.source.startswith("peer:") and rule.source[5:].lower() == peer.name.lower()
                or not rule.source.startswith("peer:") and rule.source in groups_of(peer)):
            continue
        if not _service_matches(rule, protocol, port):
            continue
        dest = rule.destination
        net = _cidr(dest)
        if special is not None:
            if net is not None and net.version == ip.version and net.subnet_of(special) \
                    and ip in net:
                return Verdict(True, f"rule {_label(rule)}", rule)
            continue
        if dest == HUB:
            hit = local
        elif dest == INTERNET:
            hit = not local and via_egress(ip)
        elif net is not None:
            hit = net.version == ip.version and ip in net
        else:
            hit = any(ip in n for p in members(peers, dest) for n in networks_of(p)
                      if n.version == ip.version)
        if hit:
            return Verdict(True, f"rule {_label(rule)}", rule)
    if special is not None:
        return Verdict(False, f"{ip} is in {special}, which only a rule naming it opens")
    return Verdict(False, "no rule allows it (default deny)")


def _label(rule: Rule) -> str:
    return f"#{rule.id} {rule.text()}" if rule.id is not None else rule.text()


def effective(rules, now: float) -> list[Rule]:
    """The rules in force at `now`, in the order the kernel checks them."""
    return sorted((r for r in rules if r.active(now)),
                  key=lambda r: (r.id is None, r.id or 0, r.text()))


def next_expiry(rules, now: float) -> float | None:
    times = [r.expires for r in rules if r.expires is not None and r.expires > now]
    return min(times) if times else None


def reaches_peers(view: HubView, peers, rules, now: float) -> bool:
    """Can any rule let a laptop's packet go to another laptop (or a site behind one)? The
    engine drops such packets itself (counted as peer_to_peer) when none can."""
    inner = [*view.subnets, *(s for p in peers for s in p.sites)]
    for rule in effective(rules, now):
        dest = rule.destination
        if dest in (HUB, INTERNET):
            continue
        net = _cidr(dest)
        if net is None or any(net.version == n.version and net.overlaps(n) for n in inner):
            return True
    return False


# ------------------------------------------------------------------------------ the kernel plan


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
        elif (net := _cidr(dest)) is not None:
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
