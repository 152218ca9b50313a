"""Routes and policy rules for the tunnel: a pure plan, then apply and undo.

What wg-quick does, as data first:

    split tunnel   ip route add NET dev IFACE                  for each AllowedIPs network
                   (skipped when the interface's own address prefix already covers it)
    full tunnel    ip route add default dev IFACE table T      for each family with a /0
                   ip route add unreachable default table T metric 4294967295
                   ip rule add not fwmark T table T
                   ip rule add table main suppress_prefixlength 0
                   the UDP socket carries fwmark T, so the tunnel's own packets to the hub
                   still follow the main table; T is FwMark, else the first free table from 51820
                   (IPv4) nft: conntrack restores the mark on the hub's replies and
                   src_valid_mark=1, so strict reverse-path filtering lets them in; packets for
                   the tunnel addresses (IPv4 and IPv6) that arrive on another interface are
                   dropped
    fail closed    The unreachable default is not wg-quick's: it outlives the TUN device, so
                   after a kill -9 (the device and its routes go with the process) traffic for
                   the internet is refused, not sent in clear on the underlay, until `down`
                   removes rules and routes. The LAN stays reachable (suppress_prefixlength 0).
                   A full tunnel for IPv4 only, on a host with IPv6, gets the same rules and
                   only the unreachable route for IPv6: IPv6 to the internet is refused rather
                   than sent around the tunnel.
    Table = off    no routes;  Table = N or main: every AllowedIPs route in table N, no rules

`plan_routes` is pure (the current tables and rule priorities are arguments), so the plan is
tested without root. `apply` and `undo` carry a plan out through common/linux; `undo` is
idempotent and runs from the state file after a crash, so it only ever removes what carries
this interface's name, table or explicit rule priority.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass, field

from ..common.errors import PytunError
from ..common import linux

DEFAULT_TABLE = 51820  # wg-quick's first choice for the full-tunnel table and fwmark
MAIN_TABLE = 254
SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PlanError(PytunError):
    """The configuration asks for routing pytun-client cannot set up."""


FAIL_CLOSED_METRIC = 0xFFFFFFFF  # the unreachable default: behind every other route of table T


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    table: int | None = None  # None: the main table
    unreachable: bool = False  # `unreachable DST table T metric FAIL_CLOSED_METRIC`, no device

    def __str__(self) -> str:
        return (("unreachable " if self.unreachable else "") + f"{self.dst}"
                + (f" table {self.table}" if self.table is not None else "")
                + (f" metric {FAIL_CLOSED_METRIC}" if self.unreachable else ""))


@dataclass(frozen=True)
class Rule:
    family: int
    table: int
    priority: int
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None

    def __str__(self) -> str:
        words = [f"-{self.family} pref {self.priority}"]
        if self.fwmark is not None:
            words.append(("not " if self.invert else "") + f"fwmark {self.fwmark}")
        words.append("table main" if self.table == MAIN_TABLE else f"table {self.table}")
        if self.suppress_prefixlength is not None:
            words.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        return " ".join(words)


@dataclass
class Plan:
    routes: list[Route] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    fwmark: int = 0  # SO_MARK of the UDP socket; 0: none
    full_tunnel: tuple[int, ...] = ()  # families whose default route goes through the tunnel
    guard: tuple[str, ...] = ()  # tunnel addresses protected by the nft raw rule
    src_valid_mark: bool = False  # set net.ipv4.conf.all.src_valid_mark=1 (it was 0)
    skipped: tuple[str, ...] = ()  # IPv6 networks left out because IPv6 is off (not stored)
    blocked: tuple[int, ...] = ()  # families refused rather than tunnelled (not stored)

    def to_json(self) -> dict:
        return {
            "routes": [{"dst": str(r.dst), "table": r.table, "unreachable": r.unreachable}
                       for r in self.routes],
            "rules": [{"family": r.family, "table": r.table, "priority": r.priority,
                       "fwmark": r.fwmark, "invert": r.invert,
                       "suppress_prefixlength": r.suppress_prefixlength} for r in self.rules],
            "fwmark": self.fwmark,
            "full_tunnel": list(self.full_tunnel),
            "guard": list(self.guard),
            "src_valid_mark": self.src_valid_mark,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        return cls(
            routes=[Route(ipaddress.ip_network(r["dst"]), r.get("table"),
                          bool(r.get("unreachable")))
                    for r in d.get("routes", [])],
            rules=[Rule(**r) for r in d.get("rules", [])],
            fwmark=int(d.get("fwmark") or 0),
            full_tunnel=tuple(d.get("full_tunnel", ())),
            guard=tuple(d.get("guard", ())),
            src_valid_mark=bool(d.get("src_valid_mark")),
        )


def parse_table(value: str | None) -> int | str:
    """Config `Table`: 'auto' (default), 'off', 'main' or a number."""
    if value is None or value.lower() == "auto":
        return "auto"
    if value.lower() == "off":
        return "off"
    if value.lower() == "main":
        return MAIN_TABLE
    if value.isdigit() and 0 < int(value) < 2**32:
        return int(value)
    raise PlanError(f"Table = {value}: pytun-client accepts auto, off, main or a table number")


def plan_routes(allowed_ips, addresses=(), *, table: str | None = None,
                fwmark: int | None = None, used_tables=frozenset(),
                lowest_priority: dict[int, int] | None = None,
                src_valid_mark: str = "0", ipv6: bool = True) -> Plan:
    """The routes, rules and marks for a tunnel whose one peer has `allowed_ips`.

    `used_tables` are routing tables that already hold routes (a new full-tunnel table must be
    empty); `lowest_priority` maps a family to its lowest non-zero rule priority (new rules go
    just in front of it, as `ip rule add` would put them); `src_valid_mark` is the sysctl's
    current value. With `ipv6` False (the host has IPv6 off) IPv6 networks are left out and
    listed in `skipped`.
    """
    mode = parse_table(table)
    lowest_priority = lowest_priority or {}
    networks: list[IPNetwork] = []
    skipped: list[str] = []
    for n in allowed_ips:
        n = ipaddress.ip_network(n, strict=False)
        if n.version == 6 and not ipv6:
            skipped.append(str(n))
        elif n not in networks:
            networks.append(n)
    networks.sort(key=lambda n: (-n.prefixlen, n.version))  # most specific first, as wg-quick
    plan = Plan(fwmark=fwmark or 0, skipped=tuple(skipped))
    if mode == "off":
        return plan
    if mode != "auto":
        plan.routes = [Route(n, mode) for n in networks]
        return plan
    connected = [ipaddress.ip_interface(a).network for a in addresses]
    defaults = [n for n in networks if n.prefixlen == 0]
    for n in networks:
        if n.prefixlen == 0:
            continue
        if any(n.version == c.version and c.prefixlen < c.max_prefixlen and n.subnet_of(c)
               for c in connected):
            continue  # the kernel's own prefix route for the address covers it
        plan.routes.append(Route(n))
    if not defaults:
        return plan
    if fwmark:
        full_table = fwmark
    else:
        full_table = DEFAULT_TABLE
        while full_table in used_tables:
            full_table += 1
        plan.fwmark = full_table
    plan.full_tunnel = tuple(n.version for n in defaults)
    if plan.full_tunnel == (4,) and ipv6:
        plan.blocked = (6,)
    for fam in plan.full_tunnel + plan.blocked:
        # The kernel puts a rule without a priority just in front of the first non-zero one;
        # naming that priority ourselves lets `undo` delete exactly our rule.
        below = lowest_priority.get(fam, 32766)
        plan.rules.append(Rule(fam, full_table, below - 1, fwmark=full_table, invert=True))
        plan.rules.append(Rule(fam, MAIN_TABLE, below - 2, suppress_prefixlength=0))
        default = ipaddress.ip_network("0.0.0.0/0" if fam == 4 else "::/0")
        if fam in plan.full_tunnel:
            plan.routes.append(Route(default, full_table))
        plan.routes.append(Route(default, full_table, unreachable=True))
    plan.guard = tuple(str(ipaddress.ip_interface(a).ip) for a in addresses
                       if ipaddress.ip_interface(a).version in plan.full_tunnel)
    if 4 in plan.full_tunnel:
        plan.src_valid_mark = src_valid_mark.strip() != "1"
    return plan


def dns_warning(plan: Plan, dns_servers) -> str | None:
    """A full tunnel whose config names no DNS server leaves lookups with the local resolver."""
    if plan.full_tunnel and not list(dns_servers):
        return ("full tunnel without DNS in the config: name lookups go to this machine's "
                "resolver as before (often the LAN's, outside the tunnel); add DNS = to "
                "[Interface]")
    return None


# ---------------------------------------------------------------------------------- reading


def read_src_valid_mark() -> str:
    try:
        with open(SRC_VALID_MARK) as f:
            return f.read().strip()
    except OSError:
        return "0"


def ipv6_enabled() -> bool:
    """False when the kernel has no IPv6 or new interfaces get it disabled."""
    try:
        for which in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{which}/disable_ipv6") as f:
                if f.read().strip() != "0":
                    return False
    except OSError:
        return False
    return True


def plan_for(allowed_ips, addresses, *, table=None, fwmark=None) -> Plan:
    """plan_routes with the kernel's current tables, rule priorities and sysctls."""
    tables, lowest, _ = linux.routing_facts()
    return plan_routes(allowed_ips, addresses, table=table, fwmark=fwmark, used_tables=tables,
                       lowest_priority=lowest, src_valid_mark=read_src_valid_mark(),
                       ipv6=ipv6_enabled())


# ---------------------------------------------------------------------------------- acting


def nft_table(ifname: str) -> str:
    return f"pytun-{ifname}"


def nft_script(plan: Plan, ifname: str) -> str:
    """wg-quick's nft rules for a full tunnel (IPv4 and IPv6 alike)."""
    lines = []
    for fam in plan.full_tunnel:
        pf = "ip" if fam == 4 else "ip6"
        t = f"{pf} {nft_table(ifname)}"
        lines += [
            f"add table {t}",
            f"add chain {t} preraw {{ type filter hook prerouting priority -300; }}",
            f"add chain {t} premangle {{ type filter hook prerouting priority -150; }}",
            f"add chain {t} postmangle {{ type filter hook postrouting priority -150; }}",
        ]
        lines += [f'add rule {t} preraw iifname != "{ifname}" {pf} daddr {a} '
                  f"fib saddr type != local drop" for a in plan.guard
                  if ipaddress.ip_address(a).version == fam]
        lines += [
            f"add rule {t} postmangle meta l4proto udp mark {plan.fwmark} ct mark set mark",
            f"add rule {t} premangle meta l4proto udp meta mark set ct mark",
        ]
    return "\n".join(lines) + "\n" if lines else ""


def _nft(script: str) -> str | None:
    """Run an nft script; the first line of its complaint, or None when it worked."""
    if shutil.which("nft") is None:
        return "the nft command is not installed"
    done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
    return None


def _remove_nft(plan: Plan, ifname: str) -> None:
    if shutil.which("nft") is None:
        return
    for fam in plan.full_tunnel:
        pf = "ip" if fam == 4 else "ip6"
        subprocess.run(["nft", "delete", "table", pf, nft_table(ifname)],
                       capture_output=True, text=True)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def apply(plan: Plan, ifname: str) -> list[str]:
    """Add the plan's routes and rules (LinuxError on failure); returns warnings.

    The caller records the plan first and calls `undo` if this raises.
    """
    warnings = []
    for route in plan.routes:
        if route.unreachable:
            linux.add_route(route.dst, None, route.table, kind="unreachable",
                            metric=FAIL_CLOSED_METRIC)
        else:
            linux.add_route(route.dst, ifname, route.table)
    for rule in plan.rules:
        linux.add_rule(rule.table, family=rule.family, fwmark=rule.fwmark, invert=rule.invert,
                       suppress_prefixlength=rule.suppress_prefixlength, priority=rule.priority)
    if plan.full_tunnel:
        _remove_nft(plan, ifname)  # leftovers of a run that was killed
        problem = _nft(nft_script(plan, ifname))
        if problem:
            warnings.append(f"full tunnel without its nft rules ({problem}): with strict "
                            "reverse-path filtering (rp_filter=1) the hub's replies may be dropped")
    if plan.src_valid_mark:
        try:
            _write_sysctl(SRC_VALID_MARK, "1")
        except OSError as exc:
            warnings.append(f"cannot set net.ipv4.conf.all.src_valid_mark=1: {exc.strerror}")
    return warnings


def undo(plan: Plan, ifname: str) -> list[str]:
    """Remove what `apply` added; safe to repeat and after a partial apply. Returns problems."""
    problems = []
    for rule in reversed(plan.rules):
        try:
            linux.del_rule(rule.table, family=rule.family, fwmark=rule.fwmark, invert=rule.invert,
                           suppress_prefixlength=rule.suppress_prefixlength,
                           priority=rule.priority)
        except linux.LinuxError as exc:
            problems.append(str(exc))
    for route in reversed(plan.routes):
        try:
            if route.unreachable:
                linux.del_route(route.dst, None, route.table, kind="unreachable",
                                metric=FAIL_CLOSED_METRIC)
            else:
                linux.del_route(route.dst, ifname, route.table)
        except linux.LinuxError as exc:
            problems.append(str(exc))
    if plan.full_tunnel:
        _remove_nft(plan, ifname)
    if plan.src_valid_mark and read_src_valid_mark() == "1":
        # Put it back unless another full tunnel (a `not fwmark` rule) still relies on it.
        try:
            others = linux.routing_facts()[2]
        except linux.LinuxError:
            others = True
        if not others:
            try:
                _write_sysctl(SRC_VALID_MARK, "0")
            except OSError as exc:
                problems.append(f"cannot restore src_valid_mark: {exc.strerror}")
    return problems


def covering(networks, address) -> IPNetwork | None:
    """The first of `networks` that holds `address` (a hub endpoint inside a split route loops)."""
    address = ipaddress.ip_address(address)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for n in networks:
        if n.version == address.version and address in n:
            return n
    return None
