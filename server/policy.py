"""The hub's forwarding policy: groups, access rules, and what they compile to.

Pure: hub settings, registry rows and `now` in; an explanation (`explain`) or a netfilter plan
(`firewall.plan`) out. `pytun-admin access explain` answers from the same `effective` rules as
the plan, so what it says is what the kernel does.

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

The kernel side of this policy is planned in `firewall.py` and carried out by `nat.py`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from ..common.errors import PytunError

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


class PolicyError(PytunError):
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


def cidr(text: str) -> IPNetwork | None:
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
        net = cidr(dest)
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
        net = cidr(dest)
        if net is None or any(net.version == n.version and net.overlaps(n) for n in inner):
            return True
    return False
