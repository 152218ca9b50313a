"""Every firewall and sysctl change the hub makes, through this one module.

Like sshuttle, pytun keeps its rules in chains of its own and setup is "remove leftovers, then
create", so a restart after a crash never duplicates anything:

    filter  FORWARD     -m comment --comment pytun -j PYTUN-FORWARD        (inserted first)
            PYTUN-FORWARD  -i TUN -o EGRESS -j ACCEPT
                           -i EGRESS -o TUN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    nat     POSTROUTING -m comment --comment pytun -j PYTUN-POSTROUTING
            PYTUN-POSTROUTING  -s SUBNET -o EGRESS -j MASQUERADE           (one per subnet)
    mangle  FORWARD     -m comment --comment pytun -j PYTUN-MSS
            PYTUN-MSS   -o TUN -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --clamp-mss-to-pmtu
                        -i TUN -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss MTU-40

Peer-to-peer traffic (TUN to TUN) is not accepted here: the hub engine decides it. Foreign rules
and their order are never touched. Forwarding is switched on with its old value kept in
STATE_DIR/ip_forward.saved (written once, so a crash and restart still remember the original)
and restored by teardown or `cleanup(state_dir)`.

python-iptables drives libiptc, i.e. the legacy tables (`iptables-legacy-save` shows them), in
the network namespace of this process. Each table is changed in one commit. IPv4 only: libxtables
keeps one address family per process (python-iptables' own advice), and loading an IPv6
extension first makes later IPv4 targets such as MASQUERADE unfindable; IPv6 subnets are left
out with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import shutil
import subprocess
import warnings
from typing import Iterator

from pytun.common import linux

log = logging.getLogger(__name__)

COMMENT = "pytun"
PREFIX = "PYTUN-"
FORWARD_CHAIN = "PYTUN-FORWARD"
NAT_CHAIN = "PYTUN-POSTROUTING"
MSS_CHAIN = "PYTUN-MSS"
# (table, built-in chain that jumps, our chain)
JUMPS = (("filter", "FORWARD", FORWARD_CHAIN), ("nat", "POSTROUTING", NAT_CHAIN),
         ("mangle", "FORWARD", MSS_CHAIN))
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
SAVED = "ip_forward.saved"
TCP_IP_HEADERS = 40


class NatError(Exception):
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


def _table(name: str):
    """A fresh view of one table, with changes held until commit()."""
    iptc = _iptc()
    with _firewall(f"cannot open the iptables {name} table"):
        table = iptc.Table(name, autocommit=False)
        table.refresh()  # tables are per-process singletons: drop any stale view
    return table


def _is_ours(rule) -> bool:
    if rule.target is not None and (rule.target.name or "").startswith(PREFIX):
        return True
    return any(m.name == "comment" and m.get_all_parameters().get("comment") == [COMMENT]
               for m in rule.matches)


def _remove_rules() -> None:
    """Remove every jump carrying our comment (or aimed at our chains), then our chains."""
    iptc = _iptc()
    for name in ("filter", "nat", "mangle"):
        table = _table(name)
        with _firewall(f"cannot remove pytun's rules from the {name} table"):
            for chain in table.chains:
                if table.builtin_chain(chain.name):
                    for rule in chain.rules:
                        if _is_ours(rule):
                            chain.delete_rule(rule)
            for chain in table.chains:
                if chain.name.startswith(PREFIX):
                    chain.flush()
                    try:
                        chain.delete()
                    except iptc.IPTCError as exc:  # EBUSY: still referenced
                        raise NatError(f"cannot delete chain {chain.name} of the {name} table:"
                                       f" {exc} (does a rule pytun did not create jump to it?)"
                                       ) from None
            table.commit()
            table.refresh()


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


def _enable_forwarding(state_dir: str) -> None:
    saved = os.path.join(state_dir, SAVED)
    try:
        old = _read(IP_FORWARD)
        if not os.path.exists(saved):  # after a crash the file holds the true original
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            _write(saved + ".tmp", old)
            os.replace(saved + ".tmp", saved)
    except OSError as exc:
        raise NatError(f"cannot save {IP_FORWARD} in {state_dir}: {exc.strerror}") from None
    if old != "1":
        _write(IP_FORWARD, "1")


def _restore_forwarding(state_dir: str) -> None:
    saved = os.path.join(state_dir, SAVED)
    try:
        value = _read(saved)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NatError(f"cannot read {saved}: {exc.strerror}") from None
    if value in ("0", "1"):
        try:
            current = _read(IP_FORWARD)
        except OSError:
            current = None
        if current != value:  # unchanged: nothing to write (/proc/sys may be read-only)
            _write(IP_FORWARD, value)
    else:
        log.warning("ignoring %s: unexpected content %r", saved, value)
    os.unlink(saved)


def cleanup(state_dir: str) -> None:
    """Undo whatever a previous pytun left in this namespace, knowing nothing about it.

    For `pytun-server --cleanup` after a crash; idempotent.
    """
    _remove_rules()
    _restore_forwarding(state_dir)


class Nat:
    """The hub's forwarding, masquerading and MSS clamping for one TUN interface."""

    def __init__(self, interface: str, subnets: list, egress: str | None = None,
                 mtu: int = 1420, state_dir: str = "/var/lib/pytun"):
        try:
            self.interface = linux.check_ifname(interface)
            if egress is not None:
                linux.check_ifname(egress)
        except linux.LinuxError as exc:
            raise NatError(str(exc)) from None
        networks = [ipaddress.ip_network(s) for s in subnets]
        if not 68 <= mtu <= 65535:
            raise NatError(f"bad MTU {mtu}: must be 68 to 65535")
        self.subnets = [s for s in networks if s.version == 4]
        self.ignored = [s for s in networks if s.version == 6]
        self.egress = egress
        self.mtu = mtu
        self.state_dir = state_dir
        self.warnings: list[str] = []

    def __repr__(self) -> str:
        return (f"Nat(interface={self.interface!r}, subnets={[str(s) for s in self.subnets]}, "
                f"egress={self.egress!r})")

    def _egress(self) -> str | None:
        if self.egress is not None:
            return self.egress
        try:
            return linux.default_route_interface(4)
        except linux.LinuxError as exc:
            raise NatError(str(exc)) from None

    def setup(self) -> list[str]:
        """Remove leftovers, enable forwarding, create chains and jumps; return warnings."""
        self.warnings = []
        if self.ignored:
            self.warnings.append(
                "IPv6 subnets get no forwarding or masquerading from pytun: "
                + ", ".join(map(str, self.ignored)))
        _remove_rules()
        try:
            _enable_forwarding(self.state_dir)
            self._create()
        except BaseException:
            with contextlib.suppress(NatError):
                self.teardown()
            raise
        for warning in self.warnings:
            log.warning("%s", warning)
        return self.warnings

    def teardown(self) -> None:
        """Remove our jumps and chains and put forwarding back as it was."""
        _remove_rules()
        _restore_forwarding(self.state_dir)

    def _create(self) -> None:
        tun, egress = self.interface, self._egress()
        if egress is None:
            self.warnings.append("no default route and no egress interface given: VPN clients"
                                 " get no masquerading to the outside")

        forward = []
        rule = self._rule(in_=tun, out=egress or "!" + tun)
        forward.append((rule, "ACCEPT", {}))
        rule = self._rule(in_=egress or "!" + tun, out=tun)
        rule.create_match("conntrack").ctstate = "RELATED,ESTABLISHED"
        forward.append((rule, "ACCEPT", {}))
        self._chain("filter", forward)

        if egress is not None and self.subnets:
            masquerade = []
            for subnet in self.subnets:
                rule = self._rule(out=egress)
                rule.src = str(subnet)
                masquerade.append((rule, "MASQUERADE", {}))
            self._chain("nat", masquerade)

        mss = []
        for direction, option in (("out", {"clamp_mss_to_pmtu": ""}),
                                  ("in_", {"set_mss": str(self.mtu - TCP_IP_HEADERS)})):
            rule = self._rule(**{direction: tun})
            rule.protocol = "tcp"
            rule.create_match("tcp").tcp_flags = ["SYN,RST", "SYN"]
            mss.append((rule, "TCPMSS", option))
        self._chain("mangle", mss)

    @staticmethod
    def _rule(in_: str | None = None, out: str | None = None):
        rule = _iptc().Rule()
        if in_ is not None:
            rule.in_interface = in_
        if out is not None:
            rule.out_interface = out
        return rule

    @staticmethod
    def _chain(table_name: str, rules: list) -> None:
        """Create our chain of `table_name` with `rules`, and the one jump to it; one commit."""
        iptc = _iptc()
        [(builtin, ours)] = [(b, o) for t, b, o in JUMPS if t == table_name]
        table = _table(table_name)
        with _firewall(f"cannot create {ours} in the {table_name} table"):
            chain = table.create_chain(ours)
            for rule, target, options in rules:
                rule.target = iptc.Target(rule, target)
                for key, value in options.items():
                    setattr(rule.target, key, value)
                chain.append_rule(rule)
            jump = iptc.Rule()
            jump.create_match("comment").comment = COMMENT
            jump.target = iptc.Target(jump, ours)
            iptc.Chain(table, builtin).insert_rule(jump, 0)
            table.commit()
            table.refresh()


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
    done = subprocess.run([nft, "list", "ruleset"], capture_output=True, text=True, timeout=10)
    found, table, chain = [], None, None
    for line in done.stdout.splitlines():
        if m := re.match(r"\s*table\s+(\S+)\s+(\S+)\s*\{", line):
            table = f"{m[1]} {m[2]}"
        elif m := re.match(r"\s*chain\s+(\S+)\s*\{", line):
            chain = m[1]
        elif "hook forward" in line and re.search(r"policy\s+drop", line):
            found.append(f"{table} {chain}")
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
