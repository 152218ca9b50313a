"""Every firewall and sysctl change the hub makes, through this one module.

`firewall.plan()` says what one hub wants in one address family's netfilter (its chains, their
rules, the jumps to them, its ipsets); this module makes the kernel hold exactly that, and
nothing of anyone else's is touched:

- Chains are named `PYTUN-TAG-SUFFIX` (TAG is the hub's TUN interface, unique in a network
  namespace), ipsets `pt-TAG-HASH-FAMILY`; jumps from the built-in chains carry the comment
  `pytun:TAG`. Names are compared exactly, so hub `pt` never takes hub `pt-a`'s sets, and an
  operator's rule that merely mentions pytun is never removed.
- `apply` is "make it so": it creates what is missing, refills every chain of ours in one commit
  per table (libiptc replaces a table atomically), swaps each ipset's content in at once, then
  removes what the plan no longer has. So set-up after a crash, and every live change, are the
  same call. Each commit holds the xtables lock (/run/xtables.lock), as `iptables -w` does.
- Forwarding: a hub that finds `ip_forward` (or IPv6 `forwarding`) off switches it on and
  creates the shared chain PYTUN-ISOLATE, jumped from FORWARD after every hub's own jump, which
  drops all forwarding that no hub's chain decided: the host does not start routing between
  its other interfaces. The last hub to stop in a namespace removes it and switches forwarding
  off again; the chain is the record that pytun switched it on, so this also works after a crash
  (`cleanup`). A host that forwarded before keeps forwarding as it did.

python-iptables drives libiptc, i.e. the legacy tables (`iptables-legacy-save` shows them), in
the network namespace of this process, and libxtables keeps one address family per process: so
each family's plan is carried out in a process of its own (`linux.run_apart` at start and stop,
`python -m pytun.server.nat apply` for live changes). ipsets are written with `ipset restore`,
one process for a whole batch; a change of group members alone needs no iptables at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from typing import Iterator

from ..common import linux
from ..common.errors import PytunError
from . import firewall

log = logging.getLogger(__name__)

TABLES = ("raw", "mangle", "nat", "filter")
BUILTINS = {"raw": ("PREROUTING", "OUTPUT"),
            "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
            "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
            "filter": ("INPUT", "FORWARD", "OUTPUT")}
FORWARDING = {4: "/proc/sys/net/ipv4/ip_forward", 6: "/proc/sys/net/ipv6/conf/all/forwarding"}
ISOLATE_COMMENT = "pytun:isolate"
LEGACY_CHAINS = {"filter": "PYTUN-FORWARD", "nat": "PYTUN-POSTROUTING", "mangle": "PYTUN-MSS"}
LEGACY_SAVED = "ip_forward.saved"
XTABLES_LOCK = "/run/xtables.lock"


class NatError(PytunError):
    """A firewall or sysctl change failed; the message says which and why."""


def _iptc():
    try:
        with warnings.catch_warnings():  # its distutils import wakes pkg_resources' warnings
            warnings.simplefilter("ignore", UserWarning)
            import iptc
    except Exception as exc:  # libiptc missing or unloadable
        raise NatError(f"python-iptables cannot load libiptc: {exc}") from None
    return iptc


@contextlib.contextmanager
def _firewall(what: str) -> Iterator[None]:
    iptc = _iptc()
    try:
        yield
    except iptc.XTablesError as exc:  # "can't find target TCPMSS"
        raise NatError(f"{what}: {exc} (is its kernel module available?)") from None
    except (iptc.IPTCError, ValueError, AttributeError) as exc:
        raise NatError(f"{what}: {exc}") from None


@contextlib.contextmanager
def _xtables_lock() -> Iterator[None]:
    """The lock `iptables -w` takes, so a table is never read and written back around
    another program's change. Without /run (a sandbox), go on without it."""
    try:
        fd = os.open(XTABLES_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _table(family: int, name: str):
    """A fresh view of one table, with changes held until commit()."""
    iptc = _iptc()
    with _firewall(f"cannot open the ip{'6' if family == 6 else ''}tables {name} table"):
        table = (iptc.Table6 if family == 6 else iptc.Table)(name, autocommit=False)
        table.refresh()  # tables are per-process singletons: drop any stale view
    return table


def _new_rule(family: int):
    iptc = _iptc()
    return iptc.Rule6() if family == 6 else iptc.Rule()


def _build(family: int, spec: dict):
    """A python-iptables rule from a policy rule dict, matches in `policy.render`'s order."""
    iptc = _iptc()
    rule = _new_rule(family)
    for key, attr in (("src", "src"), ("dst", "dst"), ("in", "in_interface"),
                      ("out", "out_interface"), ("proto", "protocol")):
        if spec.get(key):
            # ip6tables-save spells ICMPv6 ipv6-icmp; python-iptables takes only icmpv6.
            value = "icmpv6" if spec[key] == "ipv6-icmp" else spec[key]
            setattr(rule, attr, value)
    if spec.get("comment"):
        rule.create_match("comment").comment = spec["comment"]
    if spec.get("ctstate"):
        match = rule.create_match("conntrack")
        match.ctstate = spec["ctstate"]
        if spec.get("ctdir"):
            match.ctdir = spec["ctdir"]
    if spec.get("addrtype"):
        rule.create_match("addrtype").dst_type = spec["addrtype"]
    for key, direction in (("set_src", "src"), ("set_dst", "dst")):
        if spec.get(key):
            rule.create_match("set").match_set = [spec[key], direction]
    if spec.get("sport") or spec.get("dport") or spec.get("tcp_flags"):
        match = rule.create_match(spec["proto"])
        if spec.get("sport"):
            match.sport = spec["sport"]
        if spec.get("dport"):
            match.dport = spec["dport"]
        if spec.get("tcp_flags"):
            match.tcp_flags = list(spec["tcp_flags"])
    rule.target = iptc.Target(rule, spec["target"])
    if spec.get("to_ports"):
        rule.target.to_ports = spec["to_ports"]
    if spec.get("set_mss"):
        rule.target.set_mss = spec["set_mss"]
    if spec.get("clamp_mss_to_pmtu"):
        rule.target.clamp_mss_to_pmtu = ""
    return rule


def _our_chains(tag: str, table: str) -> set[str]:
    return {firewall.chain(tag, s) for s, t in firewall.CHAINS.items() if t == table}


def _hub_tags(table) -> set[str]:
    """The tags of every hub with a forward chain in this filter table."""
    return {m[1] for c in table.chains if (m := re.fullmatch(r"PYTUN-(.+)-FWD", c.name))}


# ------------------------------------------------------------------------------ ipsets


def _ipset(*argv: str, script: str | None = None) -> str:
    """Run ipset(8): one process for a whole batch of changes (`ipset restore`), where a
    netlink round trip per entry would take a second per 2,000 entries."""
    binary = shutil.which("ipset") or "/usr/sbin/ipset"
    try:
        done = subprocess.run([binary, *argv], input=script, capture_output=True, text=True,
                              timeout=60)
    except FileNotFoundError:
        raise NatError("the ipset command is missing (Debian package ipset)") from None
    except subprocess.TimeoutExpired:
        raise NatError(f"ipset {' '.join(argv)} did not finish in 60 s") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise NatError(f"ipset {' '.join(argv)}: {lines[-1]} (is the ip_set module available?)")
    return done.stdout


def _set_names() -> set[str]:
    return set(_ipset("list", "-n").split())


def _is_our_set(name: str, tag: str, family: int) -> bool:
    return name.startswith(f"pt-{tag}-") and bool(
        re.fullmatch(r"[0-9a-f]{8}-" + str(family) + "t?", name[len(f"pt-{tag}-"):]))


def sets_script(family: int, sets: dict[str, list[str]], previous: dict | None,
                existing: set[str]) -> str:
    """ipset restore commands that make each set hold exactly its entries. With the sets the
    kernel holds (`previous`, from the last apply), only the difference is written: a peer
    changing groups is an add and a del. Otherwise a set in use is refilled aside and
    swapped in, so no packet ever sees it half full."""
    kind = "inet6" if family == 6 else "inet"
    lines = []
    for name, entries in sets.items():
        header = f"hash:net family {kind} maxelem {max(65536, 2 * len(entries))}"
        if previous is not None and name in previous and name in existing:
            old, new = set(previous[name]), set(entries)
            lines += [f"del {name} {e} -exist" for e in sorted(old - new)]
            lines += [f"add {name} {e} -exist" for e in sorted(new - old)]
        elif name not in existing:
            lines.append(f"create {name} {header}")
            lines += [f"add {name} {e}" for e in entries]
        else:
            aside = name + "t"
            if aside in existing:  # a refill a crash cut short
                lines.append(f"destroy {aside}")
            lines.append(f"create {aside} {header}")
            lines += [f"add {aside} {e}" for e in entries]
            lines += [f"swap {aside} {name}", f"destroy {aside}"]
    return "".join(line + "\n" for line in lines)


def apply_sets(family: int, sets: dict[str, list[str]], previous: dict | None = None) -> None:
    script = sets_script(family, sets, previous, _set_names())
    if script:
        _ipset("restore", script=script)


def _usable(family: int) -> bool:
    """Can this process open the family's legacy tables? A host without IPv6 (or without
    ip6_tables) cannot, and then holds no IPv6 rules of ours either."""
    try:
        _table(family, "filter")
    except NatError:
        if family == 4:
            raise  # an IPv4 hub needs its tables: say why they cannot be opened
        return False
    return True


def _drop_sets(tag: str, family: int, keep=()) -> None:
    if not keep and shutil.which("ipset") is None:
        return  # nothing to remove: no set of ours was ever made without the ipset command
    stale = [n for n in _set_names() if _is_our_set(n, tag, family) and n not in keep]
    if stale:
        _ipset("restore", script="".join(f"destroy {n}\n" for n in sorted(stale)))


# ------------------------------------------------------------------------------ tables


def _remove_jumps(table, builtin_rules, targets: set[str]) -> None:
    for chain_name, rules in builtin_rules:
        chain = _iptc().Chain(table, chain_name)
        for rule in rules:
            if rule.target is not None and rule.target.name in targets:
                chain.delete_rule(rule)


def _builtin_rules(table, name: str):
    out = []
    for chain_name in BUILTINS[name]:
        if table.is_chain(chain_name):
            out.append((chain_name, list(_iptc().Chain(table, chain_name).rules)))
    return out


def _delete_chains(table, names) -> None:
    """Flush them all first: our chains jump to each other."""
    iptc = _iptc()
    names = [n for n in names if table.is_chain(n)]
    for name in names:
        iptc.Chain(table, name).flush()
    for name in names:
        try:
            iptc.Chain(table, name).delete()
        except iptc.IPTCError as exc:  # EBUSY: still referenced
            raise NatError(f"cannot delete chain {name}: {exc} (does a rule pytun did not"
                           " create jump to it?)") from None


def _apply_table(p: firewall.Plan, name: str, isolate: bool) -> None:
    iptc = _iptc()
    family = p.family
    wanted = {c: rules for c, rules in p.chains.items() if p.table_of(c) == name}
    ours = _our_chains(p.tag, name)
    with _xtables_lock():
        table = _table(family, name)
        with _firewall(f"cannot write pytun's rules to the {name} table"):
            builtin = _builtin_rules(table, name)
            # Jumps to chains of ours that the plan no longer has go first, then the chains.
            stale = {c for c in ours if c not in wanted and table.is_chain(c)}
            _remove_jumps(table, builtin, stale)
            for chain_name in wanted:
                if not table.is_chain(chain_name):
                    table.create_chain(chain_name)
            for chain_name, rules in wanted.items():
                chain = iptc.Chain(table, chain_name)
                chain.flush()
                for spec in rules:
                    chain.append_rule(_build(family, spec))
            if isolate and name == "filter" and not table.is_chain(firewall.ISOLATE):
                table.create_chain(firewall.ISOLATE)
                iptc.Chain(table, firewall.ISOLATE).append_rule(_build(family, {"target": "DROP"}))
                jump = {"comment": ISOLATE_COMMENT, "target": firewall.ISOLATE}
                iptc.Chain(table, "FORWARD").insert_rule(_build(family, jump), 0)
            present = {(c, r.target.name) for c, rules in builtin for r in rules
                       if r.target is not None}
            for jump in p.jumps:
                if jump["table"] == name and (jump["chain"], jump["target"]) not in present:
                    spec = {k: v for k, v in jump.items() if k not in ("table", "chain")}
                    iptc.Chain(table, jump["chain"]).insert_rule(_build(family, spec), 0)
            _delete_chains(table, stale)
            table.commit()
            table.refresh()


def apply(plan_dict: dict, *, isolate: bool = False, previous: dict | None = None) -> None:
    """Make this family's netfilter hold exactly the plan; see the module docstring. With
    `previous`, the plan the kernel held until now, only what changed is written."""
    p = firewall.Plan.from_dict(plan_dict)
    apply_sets(p.family, p.sets, previous and previous.get("sets"))
    old = firewall.Plan.from_dict(previous) if previous else None
    for name in TABLES:
        if old is None or isolate or _table_part(old, name) != _table_part(p, name):
            _apply_table(p, name, isolate)
    _drop_sets(p.tag, p.family, keep=set(p.sets))


def _table_part(p: firewall.Plan, name: str) -> tuple:
    return ([(c, r) for c, r in p.chains.items() if p.table_of(c) == name],
            [j for j in p.jumps if j["table"] == name])


def only_sets_differ(plan: dict, previous: dict | None) -> bool:
    return previous is not None and {k: v for k, v in plan.items() if k != "sets"} == \
        {k: v for k, v in previous.items() if k != "sets"}


def _remove(tag: str, family: int) -> None:
    """Every jump, chain and ipset of hub `tag` in this family, and nothing else."""
    for name in TABLES:
        with _xtables_lock():
            table = _table(family, name)
            with _firewall(f"cannot remove pytun's rules from the {name} table"):
                ours = {c for c in _our_chains(tag, name) if table.is_chain(c)}
                if not ours:
                    continue
                _remove_jumps(table, _builtin_rules(table, name), ours)
                _delete_chains(table, ours)
                table.commit()
                table.refresh()
    _drop_sets(tag, family)


def _remove_legacy(family: int) -> None:
    """Chains an earlier pytun made (PYTUN-FORWARD etc., jumps commented `pytun`)."""
    for name, chain_name in LEGACY_CHAINS.items():
        with _xtables_lock():
            table = _table(family, name)
            with _firewall(f"cannot remove {chain_name} from the {name} table"):
                if not table.is_chain(chain_name):
                    continue
                _remove_jumps(table, _builtin_rules(table, name), {chain_name})
                _delete_chains(table, [chain_name])
                table.commit()
                table.refresh()


# ------------------------------------------------------------------------------ forwarding


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
    except OSError as exc:
        hint = " (run as root)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        raise NatError(f"cannot write {path}: {exc.strerror}{hint}") from None


def _forwarding_on(family: int) -> bool:
    try:
        return _read(FORWARDING[family]) == "1"
    except OSError as exc:
        raise NatError(f"cannot read {FORWARDING[family]}: {exc.strerror}") from None


def setup(plan_dict: dict) -> list[str]:
    """Start-up for one family: forwarding on (isolated if it was off), then `apply`."""
    family = plan_dict["family"]
    isolate = not _forwarding_on(family)
    try:
        apply(plan_dict, isolate=isolate)
        if isolate:
            _write(FORWARDING[family], "1")
    except BaseException:
        with contextlib.suppress(NatError):
            teardown(plan_dict["tag"], family)
        raise
    warnings_ = []
    if plan_dict.get("egress") is None:
        warnings_.append(f"no IPv{family} default route and no egress interface given: laptops"
                         f" get no masquerading to the internet over IPv{family}")
    if isolate and family == 6:
        warnings_.append("IPv6 forwarding is now on: interfaces with accept_ra=1 stop taking"
                         " router advertisements (use accept_ra=2 on an uplink that needs them)")
    return warnings_


def teardown(tag: str, family: int) -> None:
    """Remove hub `tag`'s rules and sets; the last hub out puts forwarding back."""
    _remove(tag, family)
    with _xtables_lock():
        table = _table(family, "filter")
        if _hub_tags(table) or not table.is_chain(firewall.ISOLATE):
            return
        with _firewall("cannot remove PYTUN-ISOLATE"):
            _remove_jumps(table, _builtin_rules(table, "filter"), {firewall.ISOLATE})
            _delete_chains(table, [firewall.ISOLATE])
            table.commit()
            table.refresh()
    if _forwarding_on(family):
        _write(FORWARDING[family], "0")


def cleanup(tag: str, state_dir: str) -> None:
    """Undo whatever a crashed hub `tag` left in this namespace, both families; idempotent.
    Each family runs in a process of its own (libxtables holds one family per process)."""
    for family in (4, 6):
        linux.run_apart(_cleanup_family, tag, family, state_dir)


def _cleanup_family(tag: str, family: int, state_dir: str) -> None:
    if not _usable(family):
        return  # nothing of ours can be in tables this host cannot even open
    _remove_legacy(family)
    teardown(tag, family)
    saved = os.path.join(state_dir, LEGACY_SAVED)
    if family == 4 and os.path.exists(saved):  # an earlier pytun's record of ip_forward
        with contextlib.suppress(OSError):
            if _read(saved) == "0" and not _hub_tags(_table(4, "filter")):
                _write(FORWARDING[4], "0")
            os.unlink(saved)


def apply_apart(plan_dict: dict, previous: dict | None = None) -> None:
    """`apply` for a running hub, whose process has threads: a change of group members only
    is an `ipset restore` from here; anything else runs in a fresh interpreter."""
    if only_sets_differ(plan_dict, previous):
        apply_sets(plan_dict["family"], plan_dict["sets"], previous["sets"])
        return
    done = subprocess.run([sys.executable, "-m", "pytun.server.nat", "apply"],
                          input=json.dumps({"plan": plan_dict, "previous": previous,
                                            "parent": os.getpid()}),
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise NatError(lines[-1] if lines else f"exit status {done.returncode}")


def _main(argv: list[str]) -> int:
    if argv != ["apply"]:
        print("usage: python -m pytun.server.nat apply < {plan, previous}.json", file=sys.stderr)
        return 2
    try:
        request = json.load(sys.stdin)
        if "parent" in request:  # a killed hub's change must not race its restart's rules
            linux.die_with(int(request["parent"]))
        apply(request["plan"], previous=request.get("previous"))
    except (NatError, ValueError, KeyError, TypeError) as exc:
        print(f"firewall: {exc}", file=sys.stderr)
        return 1
    return 0


def _iptables_is_nft() -> bool:
    path = shutil.which("iptables")
    if path is None:
        return False
    if os.path.realpath(path).endswith("xtables-nft-multi"):
        return True
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
    return "nf_tables" in done.stdout


def _nft_forward_drop_chains() -> list[str]:
    """'family table chain' of every nftables chain hooked on forward with policy drop."""
    nft = shutil.which("nft")
    if nft is None:
        return []
    done = subprocess.run([nft, "-j", "list", "ruleset"], capture_output=True, text=True,
                          timeout=10)
    found = []
    for item in json.loads(done.stdout or "{}").get("nftables", []):
        chain = item.get("chain")
        if chain and chain.get("hook") == "forward" and chain.get("policy") == "drop":
            found.append(f"{chain['family']} {chain['table']} {chain['name']}")
    return found


def backend_warnings() -> list[str]:
    """One-line warnings about firewalls that may hide or defeat pytun's rules. Never raises."""
    warnings = []
    try:
        if _iptables_is_nft():
            warnings.append("this host's iptables command is the nf_tables variant; pytun's rules"
                            " live in the legacy tables: see them with `iptables-legacy-save`")
    except Exception:
        pass
    try:
        for where in _nft_forward_drop_chains():
            warnings.append(f"nftables chain {where} hooks forward with policy drop (Docker,"
                            " ufw?): forwarded VPN traffic may be dropped by it")
    except Exception:
        pass
    return warnings


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
