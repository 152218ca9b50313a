"""pytun-admin: set up the hub and manage the people who may connect to it.

    pytun-admin init --subnet 10.77.0.0/24 --endpoint vpn.example.com
    pytun-admin add-peer alice -o alice.conf
    pytun-admin list-peers
    pytun-admin show

Changes go to the registry first; a running hub is then told to apply them (`sync=1` on its
control socket). Every failure is one line on stderr and exit status 1, with nothing stored.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import io
import os
import stat
import sys
import time

from pytun.common import __version__, cli, config, keys

from . import control, state
from .registry import Peer, RegistryError, SqliteRegistry

PROG = "pytun-admin"
DEFAULT_KEEPALIVE = 25


class AdminError(Exception):
    """A one-line failure shown as `pytun-admin: error: ...`."""


def _csv(value: list[str] | None) -> list[str]:
    return [item.strip() for v in value or [] for item in v.split(",") if item.strip()]


def _networks(values: list[str] | None, what: str) -> list:
    out = []
    for item in _csv(values):
        try:
            out.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise AdminError(f"bad {what} {item!r}: {exc}") from None
    return out


def _open(args) -> tuple[state.HubSettings, SqliteRegistry]:
    settings = state.load_settings(args.state_dir)
    return settings, SqliteRegistry(state.registry_path(args.state_dir), create=False)


def _sync(args) -> None:
    """Tell a running hub to apply the registry; the change is already stored either way."""
    try:
        control.request(state.socket_path(args.state_dir), [("sync", "1")])
    except control.HubNotRunning:
        print("hub not running; the change applies when it starts", file=sys.stderr)
    except control.ControlError as exc:
        print(f"{PROG}: warning: the change is stored, but the hub did not apply it yet: {exc}",
              file=sys.stderr)


# ---------------------------------------------------------------------------------- commands


def cmd_init(args) -> int:
    settings = state.HubSettings(
        under_load_threshold=args.under_load,
        subnet=args.subnet, endpoint=args.endpoint, listen_port=args.listen_port,
        interface=args.interface, mtu=args.mtu, egress=args.egress, dns=_csv(args.dns),
        routes=_csv(args.route), allow_peer_to_peer=args.allow_peer_to_peer)
    public = state.init_state(args.state_dir, settings)
    print(f"initialised {args.state_dir}: subnet {settings.subnet}, hub address "
          f"{settings.address}, endpoint {settings.endpoint}; hub public key:", file=sys.stderr)
    print(public)
    return 0


def _peer_config(settings, hub_public: bytes, peer: Peer, private: bytes | None,
                 psk: bytes | None) -> config.WgConfig:
    if peer.full_tunnel:
        allowed = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    else:
        allowed = [settings.subnet, *settings.routes]
    return config.WgConfig(
        interface=config.InterfaceConfig(private_key=private, addresses=[peer.address],
                                         dns=list(settings.dns)),
        peers=[config.PeerConfig(public_key=hub_public, preshared_key=psk,
                                 endpoint=config.parse_endpoint(settings.endpoint),
                                 allowed_ips=allowed, persistent_keepalive=peer.keepalive)])


def _qr_text(text: str) -> str:
    try:
        import io

        import qrcode
    except ImportError:
        raise AdminError("--qr needs the qrcode package (pip install qrcode)") from None
    qr = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L, border=2)
    qr.add_data(text)
    qr.make(fit=True)
    out = io.StringIO()
    qr.print_ascii(out=out, tty=False, invert=True)
    return out.getvalue()


def _attached_networks() -> list:
    """The networks of every address configured on this host's interfaces (the admin runs on
    the hub's host, in its namespace)."""
    try:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = []
            for msg in ipr.get_addr():
                for attr in ("IFA_LOCAL", "IFA_ADDRESS"):
                    if addr := msg.get_attr(attr):
                        found.append(ipaddress.ip_network(f"{addr.split('%')[0]}/{msg['prefixlen']}",
                                                          strict=False))
            return found
    except (ImportError, OSError, ValueError) as exc:
        raise AdminError(f"cannot read this host's addresses to check --site: {exc}") from None


def _check_sites(settings, sites: list) -> None:
    """A site must not capture what the hub itself routes or is attached to."""
    from .registry import check_site

    if not sites:
        return
    for site in sites:
        check_site(site)
    taken = [(net, "a --route network of the hub") for net in settings.routes]
    taken += [(net, "a network this host is attached to") for net in _attached_networks()]
    for site in sites:
        for net, what in taken:
            if net.version == site.version and net.overlaps(site):
                raise AdminError(f"site {site} overlaps {net}, {what}")


def _secret_stdout() -> None:
    """The config (a private key) is about to go to stdout: a regular file there (`> x.conf`)
    must be ours and is made 0600 first; a pipe or a terminal is fine."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # not a file descriptor at all
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return
    if st.st_uid != os.geteuid():
        raise AdminError("stdout is a file owned by someone else, who could read the private "
                         "key; use -o FILE")
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.fchmod(fd, 0o600)
        except OSError as exc:
            raise AdminError(f"cannot make stdout's file private (mode 0600): {exc.strerror}; "
                             f"use -o FILE") from None


def cmd_add_peer(args) -> int:
    keepalive = DEFAULT_KEEPALIVE if args.keepalive is None else args.keepalive
    if not 0 <= keepalive <= 65535:
        raise AdminError("--keepalive must be from 0 (off) to 65535 seconds")
    if args.output and os.path.isdir(args.output):
        raise AdminError(f"{args.output} is a directory; give a file name")
    settings, registry = _open(args)
    with registry:
        hub_public = keys.public_from_private(state.load_private_key(args.state_dir))
        _check_sites(settings, _networks(args.site, "site"))
        if args.qr or not args.output:
            _secret_stdout()
        # From here to add(), no other pytun-admin can take the address chosen below.
        registry.hold_allocation_lock()
        if args.public_key is not None:
            public, private = keys.parse_public(args.public_key), None
            if public == hub_public:
                raise AdminError("--public-key is the hub's own public key")
        else:
            private = keys.generate_private()
            public = keys.public_from_private(private)
        psk = keys.generate_psk() if args.psk else None
        reserved = {settings.address.ip}
        if args.ip is not None:
            try:
                address = ipaddress.ip_interface(args.ip)
            except ValueError:
                raise AdminError(f"--ip {args.ip!r} is not an IP address") from None
            if address.network.prefixlen != address.max_prefixlen:
                raise AdminError(f"--ip {args.ip} must be a single address, without a prefix")
        else:
            address = registry.allocate_address(settings.subnet, reserved)
        peer = Peer(name=args.name, public_key=keys.encode_key(public), address=address,
                    sites=_networks(args.site, "site"), full_tunnel=args.full_tunnel,
                    keepalive=keepalive, preshared_key=psk and keys.encode_key(psk))
        text = config.render(_peer_config(settings, hub_public, peer, private, psk),
                             placeholder_public_key=None if private else public)
        qr = _qr_text(text) if args.qr else None
        registry.add(peer, subnet=settings.subnet, reserved=reserved)
        if args.output:
            try:
                keys.write_secret_file(args.output, text)
            except OSError as exc:
                registry.remove(peer.name)  # the private key would be lost: undo
                raise AdminError(f"cannot write {args.output}: {exc.strerror}") from None
            print(f"peer {peer.name} added at {peer.address.ip}; config written to {args.output}")
        elif not qr:
            sys.stdout.write(text)
        if qr:
            sys.stdout.write(qr)
    _sync(args)
    return 0


def cmd_remove_peer(args) -> int:
    _, registry = _open(args)
    with registry:
        peer = registry.remove(args.name)
    print(f"removed peer {peer.name} ({peer.address.ip})")
    _sync(args)
    return 0


def _set_disabled(args, flag: bool) -> int:
    _, registry = _open(args)
    with registry:
        registry.set_disabled(args.name, flag)
    print(f"{'disabled' if flag else 'enabled'} peer {args.name}")
    _sync(args)
    return 0


def cmd_disable_peer(args) -> int:
    return _set_disabled(args, True)


def cmd_enable_peer(args) -> int:
    return _set_disabled(args, False)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines) + "\n"


def cmd_list_peers(args) -> int:
    _, registry = _open(args)
    with registry:
        peers = registry.list()
    if args.json:
        print(json.dumps([{
            "name": p.name, "address": str(p.address), "public_key": p.public_key,
            "disabled": p.disabled, "sites": [str(s) for s in p.sites],
            "full_tunnel": p.full_tunnel, "keepalive": p.keepalive, "created": p.created,
        } for p in peers], indent=2))
    elif peers:
        sys.stdout.write(_table(["NAME", "ADDRESS", "PUBLIC KEY", "STATE", "SITES"], [
            [p.name, str(p.address.ip), p.public_key, "disabled" if p.disabled else "enabled",
             ", ".join(str(s) for s in p.sites) or "-"] for p in peers]))
    else:
        print("no peers; add one with pytun-admin add-peer NAME", file=sys.stderr)
    return 0


def human_ago(then: int | None, now: float | None = None) -> str:
    """'never', 'now', '1 minute, 3 seconds ago', as wg(8) shows a handshake."""
    if not then:
        return "never"
    delta = int((time.time() if now is None else now) - then)
    if delta <= 0:
        return "now"
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        n, delta = divmod(delta, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return ", ".join(parts) + " ago"


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def cmd_show(args) -> int:
    sock = state.socket_path(args.state_dir)
    try:
        peers = control.peers_from_get(control.request(sock, [("get", "1")]))
    except control.HubNotRunning:
        _, registry = _open(args)
        with registry:
            peers = [{"name": p.name, "public_key": p.public_key, "address": str(p.address),
                      "endpoint": None, "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0}
                     for p in registry.list()]
        print("hub not running; showing the registry without live statistics", file=sys.stderr)
    if args.json:
        print(json.dumps(peers, indent=2))
    elif peers:
        sys.stdout.write(_table(
            ["NAME", "PUBLIC KEY", "ADDRESS", "ENDPOINT", "LATEST HANDSHAKE", "RECEIVED", "SENT"],
            [[p["name"], p["public_key"], p["address"], p["endpoint"] or "-",
              human_ago(p["latest_handshake"]), human_bytes(p["rx_bytes"]),
              human_bytes(p["tx_bytes"])] for p in peers]))
    else:
        print("no peers", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="hub state directory (default: $PYTUN_STATE_DIR or /var/lib/pytun)")
    p = argparse.ArgumentParser(prog=PROG, description="Manage a pytun hub and its peers.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="hub state directory (default: $PYTUN_STATE_DIR or /var/lib/pytun)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("init", cmd_init, "create the hub's state directory, key pair and empty registry")
    sp.add_argument("--subnet", required=True, help="inner subnet, e.g. 10.77.0.0/24")
    sp.add_argument("--endpoint", required=True, metavar="HOST[:PORT]",
                    help="address laptops dial (port defaults to --listen-port)")
    sp.add_argument("--listen-port", type=int, default=51820, metavar="PORT")
    sp.add_argument("--interface", default="pytun0", metavar="NAME")
    sp.add_argument("--mtu", type=int, default=1420)
    sp.add_argument("--egress", metavar="IFACE", help="interface to masquerade full-tunnel traffic out of")
    sp.add_argument("--dns", action="append", metavar="ADDR,...", help="DNS servers for laptops")
    sp.add_argument("--route", action="append", metavar="CIDR,...",
                    help="networks behind the hub that laptops should reach")
    sp.add_argument("--allow-peer-to-peer", action="store_true",
                    help="let peers reach each other through the hub")
    sp.add_argument("--under-load", type=int, default=state.DEFAULT_UNDER_LOAD,
                    metavar="PER_SECOND",
                    help="handshake messages a second above which the hub answers with cookies "
                         f"and limits each source (default {state.DEFAULT_UNDER_LOAD})")

    sp = add("add-peer", cmd_add_peer, "register a peer and print its wg-quick config")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--public-key", metavar="KEY",
                    help="the peer's own public key; its private key then never leaves the laptop")
    sp.add_argument("--ip", metavar="ADDR", help="inner address (default: lowest free)")
    sp.add_argument("--site", action="append", metavar="CIDR,...",
                    help="networks behind this peer (e.g. a branch office) routed to it")
    sp.add_argument("--full-tunnel", action="store_true", help="send all the laptop's traffic via the hub")
    sp.add_argument("--keepalive", type=int, metavar="SECONDS",
                    help=f"PersistentKeepalive (default {DEFAULT_KEEPALIVE}; 0 = off)")
    sp.add_argument("--preshared-key", "--psk", dest="psk", action="store_true",
                    help="add a preshared key (extra post-quantum margin)")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the config to FILE (mode 0600)")
    sp.add_argument("--qr", action="store_true", help="print the config as a terminal QR code")

    for name, fn, what in (("remove-peer", cmd_remove_peer, "remove a peer for good"),
                           ("disable-peer", cmd_disable_peer, "keep a peer but refuse it"),
                           ("enable-peer", cmd_enable_peer, "accept a disabled peer again")):
        add(name, fn, what).add_argument("name", metavar="NAME")

    sp = add("list-peers", cmd_list_peers, "list the registered peers")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "live view of the running hub: endpoints, handshakes, traffic")
    sp.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.state_dir = state.resolve_state_dir(args.state_dir)
    return cli.run(PROG, args.fn, args, (AdminError, RegistryError, state.StateError, keys.BadKey,
                                         config.ConfigError, control.ControlError))


if __name__ == "__main__":
    sys.exit(main())
