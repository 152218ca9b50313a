"""The only kernel glue: the TUN device, links, addresses, routes and policy rules.

Everything here is synchronous and acts on the network namespace of the calling process.
Links, addresses, routes and rules go through pyroute2's netlink socket; the dumps used by tests
run `ip`, whose text form is what an operator compares by eye. Every failure is a `LinuxError`
whose message says what was attempted and why it failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import ipaddress
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import PytunError

if TYPE_CHECKING:
    from pyroute2 import IPRoute

IFNAMSIZ = 16
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40
TUN_OFFLOAD_TCP = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
TUN_OFFLOAD_ALL = TUN_OFFLOAD_TCP | TUN_F_USO4 | TUN_F_USO6
IFA_F_NODAD = 0x02
FIB_RULE_INVERT = 0x02
SO_MARK = 36
MAIN_TABLE = 254

_IFREQ = struct.Struct("16sH")
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class LinuxError(PytunError):
    """A kernel operation failed; the message is meant for the operator."""


def check_ifname(name: str) -> str:
    """Refuse names the kernel would refuse (or silently truncate), before asking it."""
    if not isinstance(name, str) or not 1 <= len(name.encode()) < IFNAMSIZ:
        raise LinuxError(f"bad interface name {name!r}: must be 1 to {IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise LinuxError(f"bad interface name {name!r}: no '/', ':' or whitespace allowed")
    return name


def open_tun(name: str, *, vnet_hdr: bool = False, multi_queue: bool = False
             ) -> tuple[int, str]:
    """Create (or attach to) the TUN device `name`; return its non-blocking fd and actual name.

    The device lives as long as the fd: closing it removes the interface. With `vnet_hdr`,
    every packet read or written starts with a 10-byte virtio_net_hdr, which lets a write
    carry a run of TCP segments as one (see tcpgro.py); reads stay plain packets until
    `set_tun_offload` asks for large ones. With `multi_queue`, each call with the same name
    adds a queue to one device (one per data-plane worker); the device goes with the last.
    """
    check_ifname(name)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise LinuxError("cannot open /dev/net/tun: no such device (modprobe tun)") from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise LinuxError(
                "cannot open /dev/net/tun: permission denied (run as root or with CAP_NET_ADMIN)"
            ) from None
        raise LinuxError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(
            name.encode(), IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            | (IFF_MULTI_QUEUE if multi_queue else 0)))
    except OSError as exc:
        os.close(fd)
        why: str | None = {
            errno.EBUSY: "it is busy (another process has it open)",
            errno.EPERM: "permission denied (run as root or with CAP_NET_ADMIN)",
            errno.EACCES: "permission denied (run as root or with CAP_NET_ADMIN)",
            errno.EINVAL: "invalid name, or an interface of another type already has it",
        }.get(exc.errno or 0, exc.strerror)
        raise LinuxError(f"cannot create TUN device {name}: {why}") from None
    actual = _IFREQ.unpack(ifr[: _IFREQ.size])[0].rstrip(b"\0").decode()
    return fd, actual


def set_tun_offload(fd: int) -> int:
    """Let the kernel hand a TUN device opened with IFF_VNET_HDR large TCP packets (TSO), UDP
    ones too where it can (USO, Linux 6.2+), with their checksums left to us (tunoffload.py
    cuts them up). Returns the TUN_F_* flags set, 0 when the kernel takes none of them."""
    for flags in (TUN_OFFLOAD_ALL, TUN_OFFLOAD_TCP):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                continue  # no USO before Linux 6.2: try without
            return 0
        return flags
    return 0


@contextlib.contextmanager
def _netlink(what: str, ignore: tuple[int, ...] = ()) -> Iterator[IPRoute]:
    """An IPRoute socket for one operation; NetlinkError becomes LinuxError("what: reason")."""
    # Imported here: a process that only opens its TUN device never loads pyroute2 (~12 MiB).
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        if exc.code in ignore:
            return
        reason = os.strerror(exc.code) if exc.code else str(exc)
        raise LinuxError(f"{what}: {reason}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise LinuxError(f"{what}: {exc}") from None


def run_apart(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a forked child; returns its result here or raises its exception here.

    For set-up and tear-down steps that load large libraries (pyroute2, python-iptables): the
    long-running process never maps them, which keeps about 26 MiB out of the hub's memory.
    Call it while the process has no other threads.
    """
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            die_with(parent)
            os.close(r)
            try:
                result = (True, fn(*args))
            except BaseException as exc:  # sent to the parent, which raises it
                result = (False, exc)
            try:
                payload = pickle.dumps(result)
            except Exception as exc:
                payload = pickle.dumps((False, LinuxError(
                    f"a set-up step's {'result' if result[0] else 'error'} cannot be handed"
                    f" back: {type(exc).__name__}: {exc}")))
            with os.fdopen(w, "wb") as f:
                f.write(payload)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    if not data:
        raise LinuxError("a set-up step ended without a result (killed?)")
    ok, value = pickle.loads(data)
    if ok:
        return value
    raise value


PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """In a child (forked, or a helper interpreter the hub started): be killed when `parent`,
    which started it, dies. A step of a hub that was killed (kill -9, the OOM killer) must not
    outlive it: it holds the TUN device open, so the restarted hub could not create it, and its
    firewall changes would race the new ones. (The kernel's signal follows the thread that
    started the child; the hub's starting thread waits for the child, so it outlives it.)"""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux's libc: the step may outlive a killed parent, as before
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=check_ifname(ifname))
    if not found:
        raise LinuxError(f"no such interface: {ifname}")
    return int(found[0])


def _ifname(ipr: IPRoute, index: int) -> str | None:
    for link in ipr.get_links(index):
        name: str | None = link.get("IFLA_IFNAME")
        return name
    return None


def link_exists(ifname: str) -> bool:
    with _netlink(f"cannot look up {ifname}") as ipr:
        return bool(ipr.link_lookup(ifname=check_ifname(ifname)))


def has_address(address: str) -> bool:
    """True when `address` is assigned to an interface here (keepalived's service address
    on its master, say)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    wanted = ipaddress.ip_address(address)
    with _netlink("cannot list addresses") as ipr:
        for a in ipr.get_addr(family=family):
            local = a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")
            if local is not None and ipaddress.ip_address(local) == wanted:
                return True
    return False


def link_kind(ifname: str) -> str | None:
    """'tun', 'veth', 'bridge', ... for an existing interface, '' for one without a kind
    (e.g. a physical NIC), None when there is no such interface."""
    with _netlink(f"cannot look up {ifname}") as ipr:
        found = ipr.link_lookup(ifname=check_ifname(ifname))
        if not found:
            return None
        link = ipr.link("get", index=found[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


def delete_link(ifname: str) -> None:
    """Delete the interface; an absent one is not an error."""
    with _netlink(f"cannot delete {ifname}", ignore=(errno.ENODEV,)) as ipr:
        found = ipr.link_lookup(ifname=check_ifname(ifname))
        if found:
            ipr.link("del", index=found[0])


def configure_link(ifname: str, addresses: list[Interface], mtu: int) -> None:
    """Set the MTU, add each address (IPv6 without duplicate address detection), bring it up."""
    if not 68 <= mtu <= 65535:
        raise LinuxError(f"bad MTU {mtu} for {ifname}: must be 68 to 65535")
    with _netlink(f"cannot set MTU {mtu} on {ifname}") as ipr:
        index = _index(ipr, ifname)
        ipr.link("set", index=index, mtu=mtu)
    for iface in addresses:
        iface = ipaddress.ip_interface(iface)
        flags = IFA_F_NODAD if iface.version == 6 else 0
        # An address that is already there (a restart on a kept device) is fine.
        with _netlink(f"cannot add address {iface} to {ifname}", ignore=(errno.EEXIST,)) as ipr:
            ipr.addr(
                "add",
                index=index,
                family=_FAMILY[iface.version],
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                flags=flags,
            )
    with _netlink(f"cannot bring {ifname} up") as ipr:
        ipr.link("set", index=index, state="up")


def _route_spec(ipr: IPRoute, dst: Network, ifname: str | None, table: int | None,
                via: Any, kind: str | None = None, metric: int | None = None
                ) -> dict[str, Any]:
    dst = ipaddress.ip_network(dst)
    spec = {"family": _FAMILY[dst.version], "dst": str(dst.network_address),
            "dst_len": dst.prefixlen}
    if kind is not None:
        spec["type"] = kind
    if metric is not None:
        spec["priority"] = int(metric)
    if ifname is not None:
        spec["oif"] = _index(ipr, ifname)
    if table is not None:
        spec["table"] = int(table)
    if via is not None:
        spec["gateway"] = str(ipaddress.ip_address(via))
    return spec


def _route_text(dst: Network, ifname: str | None, table: int | None, via: Any,
                kind: str | None = None, metric: int | None = None) -> str:
    return " ".join(
        ([kind] if kind is not None else [])
        + [str(dst)]
        + ([f"via {via}"] if via is not None else [])
        + ([f"dev {ifname}"] if ifname is not None else [])
        + ([f"table {table}"] if table is not None else [])
        + ([f"metric {metric}"] if metric is not None else [])
    )


def add_route(dst: Network, ifname: str | None = None, table: int | None = None,
              via: Any = None, *, replace: bool = False, kind: str | None = None,
              metric: int | None = None) -> None:
    """`ip route add [KIND] DST [via VIA] [dev IFNAME] [table TABLE] [metric M]` (or `replace`).

    KIND is a route type such as "unreachable", which needs no device.
    """
    verb = "replace" if replace else "add"
    with _netlink(f"cannot {verb} route "
                  f"{_route_text(dst, ifname, table, via, kind, metric)}") as ipr:
        ipr.route(verb, **_route_spec(ipr, dst, ifname, table, via, kind, metric))


def del_route(dst: Network, ifname: str | None = None, table: int | None = None,
              via: Any = None, *, kind: str | None = None, metric: int | None = None) -> None:
    """Delete a route; a route (or interface) that is already gone is not an error."""
    if ifname is not None and not link_exists(ifname):
        return
    with _netlink(f"cannot delete route {_route_text(dst, ifname, table, via, kind, metric)}",
                  ignore=(errno.ESRCH, errno.ENOENT, errno.ENODEV)) as ipr:
        ipr.route("del", **_route_spec(ipr, dst, ifname, table, via, kind, metric))


def _rule_spec(table: int, family: int, fwmark: int | None, invert: bool,
               suppress_prefixlength: int | None, priority: int | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"family": _FAMILY[family], "table": int(table)}
    if fwmark is not None:
        spec["fwmark"] = int(fwmark)
    if invert:
        spec["flags"] = FIB_RULE_INVERT
    if suppress_prefixlength is not None:
        # FRA_SUPPRESS_PREFIXLEN; pyroute2 silently drops keys it does not know.
        spec["suppress_prefixlen"] = int(suppress_prefixlength)
    # pyroute2 0.9 fills in priority 32000 when the key is absent; an explicit None leaves the
    # choice to the kernel, like `ip rule add` does.
    spec["priority"] = None if priority is None else int(priority)
    return spec


def add_rule(table: int, *, family: int = 4, fwmark: int | None = None, invert: bool = False,
             suppress_prefixlength: int | None = None, priority: int | None = None) -> None:
    """`ip rule add [not] [fwmark M] table T [suppress_prefixlength N] [pref P]`.

    Without `priority` the kernel picks one just above the first rule, as `ip rule add` does, so
    adding wg-quick's pair in its order (`not fwmark M table T`, then `table main
    suppress_prefixlength 0`) puts the second in front of the first.
    """
    spec = _rule_spec(table, family, fwmark, invert, suppress_prefixlength, priority)
    with _netlink(f"cannot add rule {spec}") as ipr:
        ipr.rule("add", **spec)


def del_rule(table: int, *, family: int = 4, fwmark: int | None = None, invert: bool = False,
             suppress_prefixlength: int | None = None, priority: int | None = None) -> None:
    """Delete the first rule matching every given selector; no match is not an error.

    Be as specific as the rule was when added: `del_rule(254)` alone would match the system's
    own `from all lookup main`.
    """
    spec = _rule_spec(table, family, fwmark, invert, suppress_prefixlength, priority)
    with _netlink(f"cannot delete rule {spec}", ignore=(errno.ENOENT, errno.ESRCH)) as ipr:
        ipr.rule("del", **spec)


def default_route_interface(family: int = 4) -> str | None:
    """The interface of the main table's default route (lowest metric), or None."""
    best: tuple[int, int] | None = None
    with _netlink("cannot read the routing table") as ipr:
        for route in ipr.route("dump", family=_FAMILY[family], table=MAIN_TABLE):
            if route["dst_len"] != 0 or route.get("RTA_TABLE", MAIN_TABLE) != MAIN_TABLE:
                continue
            oif = route.get("RTA_OIF")
            if oif is None:  # multipath: take the first hop
                hops = route.get("RTA_MULTIPATH") or []
                oif = hops[0]["oif"] if hops else None
            if oif is None:
                continue
            metric = route.get("RTA_PRIORITY") or 0
            if best is None or metric < best[0]:
                best = (metric, oif)
        return _ifname(ipr, best[1]) if best else None


def set_socket_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK, so the tunnel's own UDP packets escape the full-tunnel rule."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise LinuxError(f"cannot set fwmark {mark} on a socket: {exc.strerror}"
                         " (needs CAP_NET_ADMIN)") from None


FIB_RULE_INVERT = 2


def routing_facts() -> tuple[set[int], dict[int, int], bool]:
    """What a route plan must not collide with, read with pyroute2: (routing tables in use,
    {4 and 6: the lowest non-zero rule priority}, whether some rule is an inverted fwmark
    rule, as another full tunnel makes)."""
    tables: set[int] = set()
    lowest: dict[int, int] = {}
    inverted = False
    with _netlink("cannot read the routing tables and rules") as ipr:
        for family, af in _FAMILY.items():
            for route in ipr.route("dump", family=af):
                tables.add(route.get("RTA_TABLE") or route["table"])
            for rule in ipr.rule("dump", family=af):
                priority = rule.get("FRA_PRIORITY") or 0
                if priority > 0:
                    lowest[family] = min(lowest.get(family, 1 << 32), priority)
                if rule.get("FRA_FWMARK") is not None and rule["flags"] & FIB_RULE_INVERT:
                    inverted = True
    return tables, lowest, inverted


def _ip_lines(*argv: str) -> list[str]:
    try:
        out = subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise LinuxError("the ip command (iproute2) is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise LinuxError(f"ip {' '.join(argv)} failed: {exc.stderr.strip()}") from None
    return [" ".join(line.split()) for line in out.splitlines() if line.strip()]


def route_dump() -> list[str]:
    """Every route of every table, both families, sorted: equal lists mean equal routing.
    As `ip` prints them (for tests and diagnostics: an oracle apart from pyroute2)."""
    return sorted(
        [f"inet {r}" for r in _ip_lines("-4", "route", "show", "table", "all")]
        + [f"inet6 {r}" for r in _ip_lines("-6", "route", "show", "table", "all")]
    )


def rule_dump() -> list[str]:
    """Every policy rule, both families, in priority order."""
    return [f"inet {r}" for r in _ip_lines("-4", "rule", "show")] + [
        f"inet6 {r}" for r in _ip_lines("-6", "rule", "show")
    ]
