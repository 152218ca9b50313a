"""pytun-admin doctor: check the host and the hub, one PASS/WARN/FAIL line each, every WARN
and FAIL with the fix. Read-only: it changes nothing, on the host or in the state directory.

Each check is a function of what it reads (files under /proc, `iptables-legacy-save` output,
the settings) returning a Check, so the decisions are tested without root; the namespace tests
break each thing for real and watch its check fail.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess

from pytun.common import control
from pytun.common.endpoint import Endpoint

from . import nat, policy, state
from .registry import RegistryError, mask, open_registry

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
TUNNEL_OVERHEAD = {4: 60, 6: 80}  # outer IP + UDP + WireGuard header and tag
CONNTRACK_WARN, CONNTRACK_FAIL = 0.8, 0.95


@dataclasses.dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def lines(self) -> str:
        out = f"{self.status}  {self.name}: {self.detail}"
        if self.fix and self.status != PASS:
            out += f"\n      fix: {self.fix}"
        return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ---------------------------------------------------------------------------------- checks


def check_forwarding(settings, running: bool, read=_read) -> Check:
    families = [4] + ([6] if settings.subnet6 else [])
    off = [f for f in families if read(nat.FORWARDING[f]) != "1"]
    keys = {4: "net.ipv4.ip_forward", 6: "net.ipv6.conf.all.forwarding"}
    if not off:
        return Check("forwarding", PASS, ", ".join(f"{keys[f]} = 1" for f in families))
    names = ", ".join(f"{keys[f]} = 0" for f in off)
    fix = ("install deploy/sysctl/99-pytun.conf into /etc/sysctl.d and run sysctl --system,"
           " or restart the hub (it switches forwarding on)")
    if not running:
        return Check("forwarding", WARN, f"{names} (the hub switches it on when it starts)", fix)
    return Check("forwarding", FAIL, f"{names} while the hub runs: laptops reach nothing"
                 " beyond the hub", fix)


def check_firewall_backend(warnings: list[str]) -> list[Check]:
    if not warnings:
        return [Check("firewall backend", PASS, "iptables legacy tables; no nftables forward"
                      " chain drops by default")]
    out = []
    for w in warnings:
        if "policy drop" in w:
            where = w.split(" hooks ")[0].removeprefix("nftables chain ")
            out.append(Check("nftables forward", FAIL, w, f"let the VPN through there, e.g. nft"
                             f" insert rule {where} iifname <tunnel> accept; and oifname <tunnel>"
                             " ct state established,related accept (ufw: ufw route allow in on"
                             " <tunnel>; Docker: the DOCKER-USER chain)"))
        else:
            out.append(Check("firewall backend", WARN, w, "use iptables-legacy-save to see the"
                             " hub's rules; `update-alternatives --set iptables"
                             " /usr/sbin/iptables-legacy` makes `iptables` show them"))
    return out


def check_egress(settings, links: set[str], default_dev: str | None) -> Check:
    egress = settings.egress or default_dev
    if settings.egress and settings.egress not in links:
        return Check("egress", FAIL, f"egress interface {settings.egress} does not exist",
                     "pytun-admin init chose it; fix \"egress\" in hub.json, or remove it to use"
                     " the interface of the default route")
    if default_dev is None:
        return Check("egress", FAIL, "no default route: full-tunnel laptops reach nothing",
                     "add a default route (ip route add default via GATEWAY dev IFACE)")
    if egress != default_dev:
        return Check("egress", WARN, f"egress {egress} does not carry the default route"
                     f" ({default_dev} does): NAT applies to {egress} only",
                     f"set \"egress\" in hub.json to {default_dev}, or route through {egress}")
    return Check("egress", PASS, f"{egress} carries the default route")


def check_udp_port(port: int, owner: tuple[int, str] | None, hub_pid: int | None) -> Check:
    if owner is None:
        return Check("udp port", FAIL, f"nothing listens on UDP port {port}: the hub is not"
                     " running", "systemctl start pytun-server (journalctl -u pytun-server"
                     " says why it stopped)")
    pid, cmd = owner
    if hub_pid is not None and pid != hub_pid or "pytun" not in cmd:
        return Check("udp port", FAIL, f"UDP port {port} is held by PID {pid} ({cmd}), not"
                     " the hub", "stop that process, or choose another --listen-port")
    return Check("udp port", PASS, f"UDP port {port} bound by the hub (PID {pid})")


def check_mtu(settings, egress_mtu: int | None, egress: str | None) -> Check:
    if egress_mtu is None:
        return Check("mtu", WARN, "the egress MTU is unknown (no egress interface)",
                     "see the egress check")
    family = 6 if settings.subnet6 else 4
    need = settings.mtu + TUNNEL_OVERHEAD[family]
    detail = (f"tunnel {settings.mtu} + {TUNNEL_OVERHEAD[family]} (IPv{family} overhead) ="
              f" {need}, egress {egress} {egress_mtu}")
    if need > egress_mtu:
        return Check("mtu", FAIL, detail + ": full-size packets are fragmented or lost",
                     f"set \"mtu\": {egress_mtu - TUNNEL_OVERHEAD[family]} in hub.json, restart"
                     " the hub, and give laptops the same MTU")
    return Check("mtu", PASS, detail)


def _builtin_reaches(lines: list[str], builtin: str, target: str) -> str | None:
    """None when `-A builtin ... -j target` comes before any unconditional DROP/REJECT in
    `builtin`, else what is wrong."""
    for line in lines:
        if not line.startswith(f"-A {builtin} "):
            continue
        words = line.split()
        if words[-2:] == ["-j", target] or f"-j {target} " in line + " ":
            return None
        if re.fullmatch(rf"-A {builtin} -j (DROP|REJECT)( .*)?", line) and "-m" not in line:
            return f"an unconditional {words[3]} in {builtin} comes before the jump"
    return f"no jump from {builtin}"


def check_rules(settings, saved: dict[str, str], plan_jumps: list[dict]) -> Check:
    """`saved`: table -> iptables-legacy-save -t TABLE output (IPv4)."""
    missing = []
    for jump in plan_jumps:
        table, builtin, target = jump["table"], jump["chain"], jump["target"]
        lines = saved.get(table, "").splitlines()
        if f":{target} " not in "\n".join(lines) + " ":
            missing.append(f"{table} chain {target} is missing")
            continue
        wrong = _builtin_reaches(lines, builtin, target)
        if wrong:
            missing.append(f"{table} {target}: {wrong}")
    if missing:
        return Check("hub rules", FAIL, "; ".join(missing),
                     "systemctl restart pytun-server (it puts them back), and find what removed"
                     " them (another firewall manager flushing the tables?)")
    return Check("hub rules", PASS, f"{len(plan_jumps)} chains present and jumped to from the"
                 " built-in chains")


def check_conntrack(count: int | None, maximum: int | None) -> Check:
    if count is None or not maximum:
        return Check("conntrack", WARN, "the conntrack table is not loaded or not readable",
                     "it loads with the hub's NAT rules; start the hub")
    use = count / maximum
    detail = f"{count} of {maximum} entries ({use:.0%})"
    fix = (f"sysctl -w net.netfilter.nf_conntrack_max={maximum * 2} (and in /etc/sysctl.d);"
           " new connections are dropped when it is full")
    if use >= CONNTRACK_FAIL:
        return Check("conntrack", FAIL, detail, fix)
    if use >= CONNTRACK_WARN:
        return Check("conntrack", WARN, detail, fix)
    return Check("conntrack", PASS, detail)


def check_rp_filter(values: dict[str, str | None]) -> Check:
    """`values`: interface ('all', the tunnel, the egress) -> rp_filter. The kernel uses the
    larger of 'all' and the interface's own."""
    strict = [i for i, v in values.items() if v == "1"]
    if strict:
        keys = ", ".join(f"net.ipv4.conf.{i}.rp_filter" for i in strict)
        return Check("rp_filter", WARN, f"strict reverse-path filtering ({keys} = 1): packets"
                     " from networks behind laptops or arriving on another uplink are dropped",
                     " ; ".join(f"sysctl -w net.ipv4.conf.{i}.rp_filter=2" for i in strict))
    shown = ", ".join(f"{i}={v}" for i, v in values.items() if v is not None)
    return Check("rp_filter", PASS, f"loose or off ({shown})")


def check_state_modes(state_dir: str, registry_file: bool = True) -> list[Check]:
    """`registry_file`: False when the registry is in PostgreSQL (no file to check)."""
    out = []
    paths = [(state_dir, 0o700, "state directory"),
             (state.key_path(state_dir), 0o600, "private key")]
    if registry_file:
        paths.append((state.registry_path(state_dir), 0o600, "registry"))
    for path, want, what in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            out.append(Check(f"{what} mode", FAIL, f"{path}: {exc.strerror}",
                             "pytun-admin init creates it"))
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            out.append(Check(f"{what} mode", FAIL, f"{path} is mode {mode:04o}: others may"
                             " read the hub's secrets", f"chmod {want:04o} {path}"))
        else:
            out.append(Check(f"{what} mode", PASS, f"{path} {mode:04o}"))
    return out


def check_registry(path: str) -> Check:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = [r[0] for r in db.execute("PRAGMA integrity_check").fetchall()]
        finally:
            db.close()
    except sqlite3.Error as exc:
        rows = [str(exc)]
    if rows == ["ok"]:
        return Check("registry", PASS, "integrity_check ok")
    return Check("registry", FAIL, f"integrity_check: {'; '.join(rows[:3])}",
                 f"stop the hub, keep a copy of {path}, then recover it: sqlite3 {path}"
                 " .recover | sqlite3 registry-recovered.db")


def check_pg_registry(url: str) -> Check:
    """A PostgreSQL registry answers, and has pytun's schema."""
    try:
        with open_registry(url) as registry:
            count = len(registry.list())
    except RegistryError as exc:
        return Check("registry", FAIL, str(exc),
                     f"start PostgreSQL or fix hub.json's registry URL ({mask(url)})")
    return Check("registry", PASS, f"{mask(url)} answers ({count} peers)")


def check_endpoint(settings, local: set, resolve) -> Check:
    host = Endpoint.parse(settings.endpoint).host
    try:
        addresses = resolve(host)
    except OSError as exc:
        return Check("endpoint", FAIL, f"{host} does not resolve ({exc.strerror or exc})",
                     "publish its DNS record, or pytun-admin init --endpoint with this host's"
                     " public address (laptop configs carry it)")
    mine = [a for a in addresses if a in local]
    if mine:
        return Check("endpoint", PASS, f"{host} is {', '.join(map(str, mine))}, an address of"
                     " this host")
    shown = ", ".join(map(str, addresses))
    return Check("endpoint", WARN, f"{host} resolves to {shown}, not an address of this host:"
                 f" fine behind a NAT that forwards UDP port {settings.endpoint.rpartition(':')[2]}"
                 " here", "check the NAT's port forward, or correct the endpoint")


# ---------------------------------------------------------------------------------- readers


def _links() -> dict[str, int]:
    out = {}
    for name in os.listdir("/sys/class/net"):
        mtu = _read(f"/sys/class/net/{name}/mtu")
        out[name] = int(mtu) if mtu and mtu.isdigit() else 0
    return out


def _default_route_dev() -> str | None:
    for line in (_read("/proc/net/route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            return fields[0]
    return None


def _local_addresses() -> set:
    out = set()
    done = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                          timeout=10)
    for line in done.stdout.splitlines():
        m = re.search(r"\sinet6?\s+([0-9a-f.:]+)/", line)
        if m:
            out.add(ipaddress.ip_address(m[1]))
    return out


def _resolve(host: str) -> list:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    return sorted({ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}, key=str)


def _udp_owner(port: int) -> tuple[int, str] | None:
    inodes = set()
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        for line in (_read(path) or "").splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(fields[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    cmd = (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
                    return int(pid), cmd[:120]
        except OSError:
            continue
    return -1, "unknown process"


def _saved_tables() -> dict[str, str]:
    tool = shutil.which("iptables-legacy-save")
    out = {}
    if tool is None:
        return out
    for table in ("raw", "mangle", "nat", "filter"):
        done = subprocess.run([tool, "-t", table], capture_output=True, text=True, timeout=10)
        out[table] = done.stdout
    return out


def _plan_jumps(view) -> list[dict]:
    """The jumps from the built-in chains that the hub's IPv4 plan has."""
    try:
        from .firewall import plan  # the kernel plan's own module, where there is one
    except ImportError:
        from .policy import plan
    return plan(view, [], [], 0, 4).jumps


def _hub_running(state_dir: str) -> bool:
    try:
        control.request(state.socket_path(state_dir), [("stats", "1")], timeout=3)
    except control.ControlError:
        return False
    return True


def _hub_pid(state_dir: str) -> int | None:
    """The PID holding the hub's control socket open (its listening socket)."""
    path = state.socket_path(state_dir)
    for line in (_read("/proc/net/unix") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[7] == path:
            inode = f"socket:[{fields[6]}]"
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if any(os.readlink(f"/proc/{pid}/fd/{fd}") == inode
                           for fd in os.listdir(f"/proc/{pid}/fd")):
                        return int(pid)
                except OSError:
                    continue
    return None


# ---------------------------------------------------------------------------------- run


def run(state_dir: str) -> list[Check]:
    checks: list[Check] = []
    try:
        settings = state.load_settings(state_dir)
    except state.StateError as exc:
        return [Check("settings", FAIL, str(exc), "pytun-admin init")]
    running = _hub_running(state_dir)
    links = _links()
    default_dev = _default_route_dev()
    egress = settings.egress or default_dev
    checks.append(check_forwarding(settings, running))
    checks += check_firewall_backend(nat.backend_warnings())
    checks.append(check_egress(settings, set(links), default_dev))
    checks.append(check_udp_port(settings.listen_port, _udp_owner(settings.listen_port),
                                 _hub_pid(state_dir) if running else None))
    checks.append(check_mtu(settings, links.get(egress) if egress else None, egress))
    if running:
        view = policy.HubView.from_settings(settings, egress, egress)
        jumps = _plan_jumps(view)
        checks.append(check_rules(settings, _saved_tables(), jumps))
    else:
        checks.append(Check("hub rules", WARN, "the hub is not running, so it has no rules",
                            "systemctl start pytun-server"))
    checks.append(check_conntrack(
        *(int(v) if v and v.isdigit() else None for v in (
            _read("/proc/sys/net/netfilter/nf_conntrack_count"),
            _read("/proc/sys/net/netfilter/nf_conntrack_max")))))
    checks.append(check_rp_filter({i: _read(f"/proc/sys/net/ipv4/conf/{i}/rp_filter")
                                   for i in ("all", settings.interface, egress) if i}))
    checks += check_state_modes(state_dir, registry_file=not settings.registry)
    if settings.registry:
        checks.append(check_pg_registry(settings.registry))
    else:
        checks.append(check_registry(state.registry_path(state_dir)))
    checks.append(check_endpoint(settings, _local_addresses(), _resolve))
    return checks
