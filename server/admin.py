"""pytun-admin: set up the hub and manage the people who may connect to it.

    pytun-admin init --subnet 10.77.0.0/24 --endpoint vpn.example.com
    pytun-admin add-peer alice -o alice.conf
    pytun-admin invite bob          (a one-time token; bob's laptop makes its own key pair)
    pytun-admin list-peers
    pytun-admin show

Changes go to the registry first; a running hub is then told to apply them (`sync=1` on its
control socket). Every failure is one line on stderr and exit status 1, with nothing stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import io
import os
import stat
import sys
import time

from ..common.errors import PytunError
from pytun.common import __version__, cli, config, control, keys
from pytun.common.cli import human_ago, human_bytes

from . import migrate, policy, state
from .registry import Peer, Registry, mask

PROG = "pytun-admin"
DEFAULT_KEEPALIVE = 25


class AdminError(PytunError):
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


def _open(args) -> tuple[state.HubSettings, Registry]:
    settings = state.load_settings(args.state_dir)
    registry = state.open_hub_registry(args.state_dir, settings)
    try:  # a registry from before access rules gets the rules that keep its behaviour
        registry.ensure_default_rules(policy.default_rules(settings))
    except BaseException:
        registry.close()
        raise
    return settings, registry


def _shared_registry(args) -> bool:
    try:
        return bool(state.load_settings(args.state_dir).registry)
    except state.StateError:
        return False


def _sync(args) -> None:
    """Tell a running hub to apply the registry; the change is already stored either way."""
    try:
        control.request(state.socket_path(args.state_dir), [("sync", "1")])
    except control.HubNotRunning:
        if _shared_registry(args):
            print("no hub runs here; the hubs that share the registry apply the change within"
                  " a second", file=sys.stderr)
        else:
            print("hub not running; the change applies when it starts", file=sys.stderr)
    except control.ControlError as exc:
        print(f"{PROG}: warning: the change is stored, but the hub did not apply it yet: {exc}",
              file=sys.stderr)


# ---------------------------------------------------------------------------------- commands


def _check_interfaces(settings) -> None:
    """The hub's TUN name must be free or a TUN device already; the egress must exist."""
    from pytun.common import linux
    try:
        kind = linux.link_kind(settings.interface)
        if kind is not None and kind != "tun":
            raise AdminError(f"interface {settings.interface} exists and is not a TUN device"
                             f" ({kind or 'physical'}); choose another --interface")
        if settings.egress is not None and linux.link_kind(settings.egress) is None:
            raise AdminError(f"--egress {settings.egress}: no such interface on this host")
    except linux.LinuxError as exc:
        raise AdminError(str(exc)) from None


def cmd_init(args) -> int:
    settings = state.HubSettings(
        under_load_threshold=args.under_load,
        subnet=args.subnet, endpoint=args.endpoint, listen_port=args.listen_port,
        interface=args.interface, mtu=args.mtu, egress=args.egress, dns=_csv(args.dns),
        routes=_csv(args.route), allow_peer_to_peer=args.allow_peer_to_peer,
        metrics=args.metrics, metrics_token_file=args.metrics_token_file,
        private_key_file=os.path.abspath(args.key_file) if args.key_file else None,
        ha={"service_address": args.service_address,
            "start_as": args.start_as} if args.service_address else None,
        registry=args.registry)
    _check_interfaces(settings)
    public = state.init_state(args.state_dir, settings)
    where = f", registry {mask(settings.registry)}" if settings.registry else ""
    print(f"initialised {args.state_dir}: subnet {', '.join(map(str, settings.subnets))}, hub"
          f" address {', '.join(map(str, settings.addresses))}, endpoint {settings.endpoint}"
          f"{where}; hub public key:", file=sys.stderr)
    print(public)
    return 0


def _peer_config(settings, hub_public: bytes, peer: Peer, private: bytes | None,
                 psk: bytes | None) -> config.WgConfig:
    if peer.full_tunnel:
        allowed = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    else:
        allowed = [*settings.subnets, *settings.routes]
    return config.WgConfig(
        interface=config.InterfaceConfig(private_key=private, addresses=peer.addresses,
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


def allocate_addresses(registry, settings, given: dict | None = None) -> tuple:
    """(address, address6, reserved) for a new peer: the address given for each IP version
    (popped from `given`), else the lowest free one of each of the hub's subnets. `reserved`,
    the hub's own addresses, goes to registry.add() too. Hold the registry's allocation lock
    from here until add() stores them (add-peer, and the hub's enrollment of an invite)."""
    given = {} if given is None else given
    reserved = {a.ip for a in settings.addresses}
    subnet, subnet6 = settings.subnet, settings.subnet6
    address = given.pop(subnet.version, None) or registry.allocate_address(subnet, reserved)
    address6 = None
    if subnet6 is not None:
        address6 = given.pop(6, None) or registry.allocate_address(subnet6, reserved)
    return address, address6, reserved


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
        given = {}
        for item in _csv(args.ip):
            try:
                address = ipaddress.ip_interface(item)
            except ValueError:
                raise AdminError(f"--ip {item!r} is not an IP address") from None
            if address.network.prefixlen != address.max_prefixlen:
                raise AdminError(f"--ip {item} must be a single address, without a prefix")
            if address.version in given:
                raise AdminError(f"--ip gives two IPv{address.version} addresses")
            given[address.version] = address
        address, address6, reserved = allocate_addresses(registry, settings, given)
        for version, extra in given.items():
            raise AdminError(f"--ip {extra.ip}: the hub has no IPv{version} subnet")
        peer = Peer(name=args.name, public_key=keys.encode_key(public), address=address,
                    sites=_networks(args.site, "site"), full_tunnel=args.full_tunnel,
                    keepalive=keepalive, preshared_key=psk and keys.encode_key(psk),
                    groups=_csv(args.group), address6=address6, expires=_expiry(args))
        text = config.render(_peer_config(settings, hub_public, peer, private, psk),
                             placeholder_public_key=None if private else public)
        qr = _qr_text(text) if args.qr else None
        registry.add(peer, subnet=settings.subnet, reserved=reserved, subnet6=settings.subnet6)
        if args.output:
            try:
                keys.write_secret_file(args.output, text)
            except OSError as exc:
                registry.remove(peer.name)  # the private key would be lost: undo
                raise AdminError(f"cannot write {args.output}: {exc.strerror}") from None
            print(f"peer {peer.name} added at {peer.address.ip}; config written to {args.output}")
        elif not qr:
            sys.stdout.write(text)
            print(f"peer {peer.name} added at {peer.address.ip}; its config is on stdout",
                  file=sys.stderr)
        if qr:
            sys.stdout.write(qr)
            print(f"peer {peer.name} added at {peer.address.ip}; scan the QR code with the"
                  f" WireGuard app (pytun-admin rotate-key {peer.name} if the scan fails)",
                  file=sys.stderr)
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
        registry.set_disabled(args.name, flag, getattr(args, "reason", None) or "")
        peer = registry.get(args.name)
    note = ""
    if not flag and peer.expired(time.time()):
        note = f"; it expired at {_when(peer.expires)}: renew it to let it in"
    print(f"{'disabled' if flag else 'enabled'} peer {peer.name}{note}")
    _sync(args)
    return 0


def cmd_renew(args) -> int:
    expires = None if args.never else _expiry(args)
    if expires is None and not args.never:
        raise AdminError("give --ttl, --expires or --never")
    _, registry = _open(args)
    with registry:
        registry.set_expiry(args.name, expires)
        peer = registry.get(args.name)
    print(f"peer {peer.name} " + (f"expires at {_when(expires)}" if expires else "never expires"))
    _sync(args)
    return 0


def cmd_rotate_key(args) -> int:
    """A new key pair for a peer (or the laptop's new public key); the old one stops at once."""
    if args.output and os.path.isdir(args.output):
        raise AdminError(f"{args.output} is a directory; give a file name")
    settings, registry = _open(args)
    with registry:
        peer = registry.get(args.name)
        hub_public = keys.public_from_private(state.load_private_key(args.state_dir))
        if args.public_key is not None:
            public, private = keys.parse_public(args.public_key), None
            if public == hub_public:
                raise AdminError("--public-key is the hub's own public key")
        else:
            if not args.output:
                _secret_stdout()
            private = keys.generate_private()
            public = keys.public_from_private(private)
        psk = keys.generate_psk() if peer.preshared_key else None
        new = dataclasses.replace(peer, public_key=keys.encode_key(public),
                                  preshared_key=psk and keys.encode_key(psk))
        text = config.render(_peer_config(settings, hub_public, new, private, psk),
                             placeholder_public_key=None if private else public)
        if args.output:  # written before the registry changes: a failure loses nothing
            try:
                keys.write_secret_file(args.output, text)
            except OSError as exc:
                raise AdminError(f"cannot write {args.output}: {exc.strerror}") from None
        registry.set_keys(peer.name, new.public_key, new.preshared_key)
    print(f"peer {peer.name} has a new key; the old one no longer connects", file=sys.stderr)
    if args.output:
        print(f"config written to {args.output}", file=sys.stderr)
    elif private is not None or psk is not None:
        sys.stdout.write(text)
    _sync(args)
    return 0


def cmd_disable_peer(args) -> int:
    return _set_disabled(args, True)


def cmd_enable_peer(args) -> int:
    return _set_disabled(args, False)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines) + "\n"


def _state(peer, now: float) -> str:
    return "disabled" if peer.disabled else "expired" if peer.expired(now) else "enabled"


def cmd_list_peers(args) -> int:
    _, registry = _open(args)
    now = time.time()
    with registry:
        peers = registry.list()
    if args.json:
        print(json.dumps([{
            "name": p.name, "address": str(p.address), "public_key": p.public_key,
            "disabled": p.disabled, "sites": [str(s) for s in p.sites],
            "full_tunnel": p.full_tunnel, "keepalive": p.keepalive, "created": p.created,
            "groups": policy.groups_of(p), "address6": str(p.address6) if p.address6 else None,
            "expires": p.expires, "state": _state(p, now), "disabled_reason": p.disabled_reason,
        } for p in peers], indent=2))
    elif peers:
        sys.stdout.write(_table(
            ["NAME", "ADDRESS", "PUBLIC KEY", "STATE", "EXPIRES", "GROUPS", "SITES"], [
                [p.name, ",".join(str(a.ip) for a in p.addresses), p.public_key,
                 _state(p, now) + (f" ({p.disabled_reason})" if p.disabled_reason else ""),
                 _when(p.expires), ",".join(p.groups) or "-",
                 ", ".join(str(s) for s in p.sites) or "-"] for p in peers]))
    else:
        print("no peers; add one with pytun-admin add-peer NAME", file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    sock = state.socket_path(args.state_dir)
    settings, registry = _open(args)
    with registry:
        records = registry.list()
    now = time.time()
    try:
        live = {p["name"]: p for p in control.peers_from_get(control.request(sock, [("get", "1")]))}
    except control.HubNotRunning:
        live = None
        print("hub not running; showing the registry without live statistics", file=sys.stderr)
    peers = []
    for r in records:  # every registered peer; those the hub refuses are marked
        row = (live or {}).get(r.name) or {
            "name": r.name, "public_key": r.public_key,
            "address": ",".join(str(a) for a in r.addresses), "endpoint": None,
            "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0}
        peers.append({**row, "state": _state(r, now), "expires": r.expires})
    if args.json:
        print(json.dumps(peers, indent=2))
        return 0
    if settings.ha and live is not None:
        try:
            role = dict(control.request(sock, [("ha", "status")])).get("role")
        except control.ControlError:
            role = None
        print(f"role: {role or 'unknown'} (hot standby, service address"
              f" {settings.ha['service_address']})")
    if peers:
        sys.stdout.write(_table(
            ["NAME", "PUBLIC KEY", "ADDRESS", "ENDPOINT", "LATEST HANDSHAKE", "RECEIVED", "SENT"],
            [[p["name"] + ("" if p["state"] == "enabled" else f" ({p['state']})"),
              p["public_key"], p["address"], p["endpoint"] or "-",
              human_ago(p["latest_handshake"]), human_bytes(p["rx_bytes"]),
              human_bytes(p["tx_bytes"])] for p in peers]))
    else:
        print("no peers", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- access

DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'90s', '30m', '12h', '30d', '2w' -> seconds."""
    unit = text[-1:].lower()
    try:
        n = int(text[:-1]) if unit in DURATION else None
    except ValueError:
        n = None
    if n is None or n <= 0:
        raise AdminError(f"bad duration {text!r}: a number and s, m, h, d or w, e.g. 30d")
    return n * DURATION[unit]


def parse_time(text: str) -> int:
    """ISO 8601 to the second with a UTC offset or Z -> unix seconds."""
    import datetime
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise AdminError(f"bad time {text!r}: use e.g. 2026-12-31T18:00:00Z or "
                         "2026-12-31T19:00:00+01:00")
    return int(when.timestamp())


def _expiry(args) -> int | None:
    if args.expires and args.ttl:
        raise AdminError("give --expires or --ttl, not both")
    if args.ttl:
        return int(time.time()) + parse_duration(args.ttl)
    if args.expires:
        when = parse_time(args.expires)
        if when <= time.time():
            raise AdminError(f"--expires {args.expires} is in the past")
        return when
    return None


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def cmd_access_list(args) -> int:
    _, registry = _open(args)
    with registry:
        rules = registry.rules()
    now = time.time()
    if args.json:
        print(json.dumps([{
            "id": r.id, "source": r.source, "destination": r.destination,
            "protocol": r.protocol, "ports": list(r.ports) if r.ports else None,
            "expires": r.expires, "active": r.active(now), "comment": r.comment,
        } for r in rules], indent=2))
    elif rules:
        sys.stdout.write(_table(["ID", "SOURCE", "DESTINATION", "SERVICE", "EXPIRES", "COMMENT"], [
            [str(r.id), r.source, r.destination, r.service(),
             _when(r.expires) + ("" if r.active(now) else " (expired)"), r.comment or "-"]
            for r in rules]))
        print("anything else from laptops is dropped; replies to allowed traffic pass",
              file=sys.stderr)
    else:
        print("no access rules: laptops reach nothing through the hub (default deny)",
              file=sys.stderr)
    return 0


def cmd_access_add(args) -> int:
    rule = policy.parse_rule(args.source, args.destination, args.service,
                             expires=_expiry(args), comment=args.comment or "")
    _, registry = _open(args)
    with registry:
        rule = registry.add_rule(rule)
    print(f"rule {rule.id} added: {rule.text()}"
          + (f" until {_when(rule.expires)}" if rule.expires else ""))
    _sync(args)
    return 0


def cmd_access_remove(args) -> int:
    _, registry = _open(args)
    with registry:
        rule = registry.remove_rule(args.id)
    print(f"rule {rule.id} removed: {rule.text()}")
    _sync(args)
    return 0


def _local_addresses() -> set:
    """Every address of this host's network namespace (the hub's own)."""
    import subprocess
    done = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                          timeout=10)
    found = set()
    for link in json.loads(done.stdout or "[]"):
        for a in link.get("addr_info", []):
            found.add(ipaddress.ip_address(a["local"]))
    return found


def _route_dev(ip) -> str | None:
    import subprocess
    done = subprocess.run(["ip", "-j", "route", "get", str(ip)], capture_output=True,
                          text=True, timeout=10)
    try:
        return json.loads(done.stdout)[0].get("dev") if done.returncode == 0 else None
    except (ValueError, IndexError):
        return None


def cmd_access_explain(args) -> int:
    settings, registry = _open(args)
    with registry:
        peers, rules = registry.list(), registry.rules()
    view = policy.HubView.from_settings(settings)
    local = _local_addresses() | set(view.hub_addresses)
    egress = settings.egress
    if egress is None:
        from pytun.common import linux
        egress = linux.default_route_interface(4)

    def via_egress(ip) -> bool:
        return egress is not None and _route_dev(ip) == egress

    verdict = policy.explain(peers, rules, args.peer, args.destination, args.service,
                             time.time(), is_local=lambda ip: ip in local, via_egress=via_egress)
    if args.json:
        print(json.dumps({"allowed": verdict.allowed, "reason": verdict.reason,
                          "rule": verdict.rule.id if verdict.rule else None}))
    else:
        print(verdict.text())
    return 0 if verdict.allowed else 3


def cmd_group_list(args) -> int:
    _, registry = _open(args)
    with registry:
        groups, peers = registry.groups(), registry.list()
    rows = [(name, comment, [p.name for p in policy.members(peers, name)]) for name, comment
            in groups]
    if args.json:
        print(json.dumps([{"name": n, "comment": c, "members": m} for n, c, m in rows], indent=2))
    else:
        sys.stdout.write(_table(["GROUP", "MEMBERS", "COMMENT"], [
            [n, ",".join(m) or "-", c or "-"] for n, c, m in rows]))
    return 0


def cmd_group_add(args) -> int:
    _, registry = _open(args)
    with registry:
        registry.add_group(args.name, args.comment or "")
    print(f"group {args.name} added")
    return 0


def cmd_group_remove(args) -> int:
    _, registry = _open(args)
    with registry:
        members = registry.remove_group(args.name)
    print(f"group {args.name} removed" + (f"; it held {', '.join(members)}" if members else ""))
    _sync(args)
    return 0


def cmd_set_groups(args) -> int:
    groups = _csv([args.groups])
    _, registry = _open(args)
    with registry:
        registry.set_groups(args.name, groups)
        peer = registry.get(args.name)
    print(f"peer {peer.name} is in {', '.join(policy.groups_of(peer))}")
    _sync(args)
    return 0


# ---------------------------------------------------------------------------------- moving

def cmd_backup(args) -> int:
    count = migrate.backup(args.state_dir, args.file)
    print(f"backup of {count} peers, the hub key and settings written to {args.file} (0600);"
          " keep it as safe as the hub's key")
    return 0


def cmd_restore(args) -> int:
    count = migrate.restore(args.file, args.state_dir)
    print(f"restored {args.state_dir} from {args.file}: {count} peers; start the hub")
    return 0


def cmd_export(args) -> int:
    settings, registry = _open(args)
    with registry:
        peers = registry.list()
    text = migrate.export_wg_quick(settings, state.load_private_key(args.state_dir), peers,
                                   time.time())
    if args.output:
        try:
            keys.write_secret_file(args.output, text)
        except OSError as exc:
            raise AdminError(f"cannot write {args.output}: {exc.strerror}") from None
        print(f"wg-quick config written to {args.output} (0600)", file=sys.stderr)
    else:
        _secret_stdout()
        sys.stdout.write(text)
    return 0


def cmd_import_wg(args) -> int:
    text = config.read_text(args.file)
    live = None
    if args.live:
        import subprocess
        done = subprocess.run(["wg", "show", args.live, "dump"], capture_output=True, text=True,
                              timeout=10)
        if done.returncode != 0:
            raise AdminError(f"wg show {args.live} dump: {done.stderr.strip() or 'failed'}")
        live = migrate.live_peers(done.stdout)
    plan = migrate.plan_import(text, args.file, endpoint=args.endpoint,
                               interface=args.interface, live=live)
    sys.stdout.write(migrate.describe(plan))
    if args.dry_run:
        print("dry run: nothing written", file=sys.stderr)
        return 0
    _check_interfaces(plan.settings)
    migrate.apply_import(plan, args.state_dir)
    print(f"imported {len(plan.peers)} peers into {args.state_dir}; stop the WireGuard server,"
          " then start pytun-server", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------- invites
# A one-time token instead of a config: the laptop makes its own key pair (pytun-client enroll),
# so its private key never exists anywhere else. common/enroll.py has the token and protocol,
# server/invites.py the hub's side; the registry stores only a hash of the token's secret.

DEFAULT_INVITE_TTL = "24h"


def cmd_invite(args) -> int:
    if args.list:
        if args.name or args.revoke:
            raise AdminError("--list takes no NAME and no --revoke")
        return _invite_list(args)
    if args.revoke:
        if args.name:
            raise AdminError("give --revoke NAME_OR_ID alone")
        return _invite_revoke(args)
    if not args.name:
        raise AdminError("give the NAME to invite, --list, or --revoke NAME_OR_ID")
    if args.json:
        raise AdminError("--json goes with --list")
    from pytun.common import enroll
    from .registry import Invite

    keepalive = DEFAULT_KEEPALIVE if args.keepalive is None else args.keepalive
    if not 0 <= keepalive <= 65535:
        raise AdminError("--keepalive must be from 0 (off) to 65535 seconds")
    now = int(time.time())
    expires = now + parse_duration(args.ttl or DEFAULT_INVITE_TTL)
    if args.expires and args.peer_ttl:
        raise AdminError("give the peer --expires or --peer-ttl, not both")
    peer_expires = parse_time(args.expires) if args.expires else None
    if peer_expires is not None and peer_expires <= expires:
        raise AdminError(f"--expires {args.expires} comes before the invite's own end "
                         f"({_when(expires)}): the peer could expire before it enrolls")
    peer_ttl = parse_duration(args.peer_ttl) if args.peer_ttl else None
    settings, registry = _open(args)
    with registry:
        hub_public = keys.public_from_private(state.load_private_key(args.state_dir))
        _secret_stdout()  # the token is a secret until it is used
        token = enroll.new_token(hub_public, settings.endpoint, args.name, os.urandom)
        try:
            text = token.encode()
        except enroll.BadToken as exc:
            raise AdminError(str(exc)) from None
        invite = Invite(id=token.id_hex, name=args.name,
                        verifier=enroll.verifier(token.invite_id, token.secret), expires=expires,
                        groups=_csv(args.group), full_tunnel=args.full_tunnel,
                        keepalive=keepalive, peer_expires=peer_expires, peer_ttl=peer_ttl,
                        created=now)
        qr = _qr_text(text) if args.qr else None
        registry.add_invite(invite)
    print(f"invite {invite.id} for {invite.name}, valid once until {_when(expires)}; on the"
          f" laptop: pytun-client enroll TOKEN", file=sys.stderr)
    try:  # the running hub answers enrollments; the token is checked against the registry then
        control.request(state.socket_path(args.state_dir), [("stats", "1")])
    except control.HubNotRunning:
        print("hub not running; the token works once it runs", file=sys.stderr)
    except control.ControlError:
        pass
    if qr:
        sys.stdout.write(qr)
    print(text)
    return 0


def _invite_list(args) -> int:
    _, registry = _open(args)
    with registry:
        invites = registry.invites()
    now = time.time()
    if args.json:
        print(json.dumps([{
            "id": i.id, "name": i.name, "state": i.state(now), "expires": i.expires,
            "created": i.created, "groups": i.groups, "full_tunnel": i.full_tunnel,
            "keepalive": i.keepalive, "peer_expires": i.peer_expires, "peer_ttl": i.peer_ttl,
            "used": i.used, "used_by": i.used_by, "revoked": i.revoked,
        } for i in invites], indent=2))
    elif invites:
        def peer_expiry(i):
            if i.peer_ttl is not None:
                unit = next(u for u in "wdhms" if i.peer_ttl % DURATION[u] == 0)
                return f"{i.peer_ttl // DURATION[unit]}{unit} after enrolling"
            return _when(i.peer_expires) if i.peer_expires else "never"

        sys.stdout.write(_table(
            ["ID", "NAME", "STATE", "VALID UNTIL", "GROUPS", "PEER EXPIRES", "USED BY"],
            [[i.id, i.name, i.state(now), _when(i.expires),
              ",".join((["full-tunnel"] if i.full_tunnel else []) + i.groups) or "-",
              peer_expiry(i), i.used_by or "-"] for i in invites]))
    else:
        print("no invites; make one with pytun-admin invite NAME", file=sys.stderr)
    return 0


def _invite_revoke(args) -> int:
    _, registry = _open(args)
    with registry:
        revoked = registry.revoke_invite(args.revoke, time.time())
    for invite in revoked:
        print(f"revoked invite {invite.id} for {invite.name}")
    return 0


def _add_invite_parser(add) -> None:
    sp = add("invite", cmd_invite, "invite a laptop with a one-time token; its private key is"
             " made on the laptop (pytun-client enroll TOKEN)")
    sp.add_argument("name", metavar="NAME", nargs="?", help="the peer the token makes")
    sp.add_argument("--ttl", metavar="DURATION",
                    help=f"how long the token works (default {DEFAULT_INVITE_TTL}): 90m, 12h, 7d")
    sp.add_argument("--expires", metavar="TIME",
                    help="the peer is refused from this time on: 2026-12-31T18:00:00Z")
    sp.add_argument("--peer-ttl", metavar="DURATION",
                    help="the peer is refused this long after it enrolls: 30d")
    sp.add_argument("--group", action="append", metavar="GROUP,...",
                    help="groups the peer is in (created if new)")
    sp.add_argument("--full-tunnel", action="store_true",
                    help="send all the laptop's traffic via the hub")
    sp.add_argument("--keepalive", type=int, metavar="SECONDS",
                    help=f"PersistentKeepalive (default {DEFAULT_KEEPALIVE}; 0 = off)")
    sp.add_argument("--qr", action="store_true", help="print the token as a QR code too")
    sp.add_argument("--list", action="store_true", help="list invites and what became of them")
    sp.add_argument("--json", action="store_true", help="with --list")
    sp.add_argument("--revoke", metavar="NAME_OR_ID", help="revoke a pending invite")


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
    sp.add_argument("--subnet", required=True, metavar="CIDR[,CIDR6]",
                    help="inner subnet, e.g. 10.77.0.0/24, or one of each family for dual"
                         " stack: 10.77.0.0/24,fd77::/64")
    sp.add_argument("--endpoint", required=True, metavar="HOST[:PORT]",
                    help="address laptops dial (port defaults to --listen-port)")
    sp.add_argument("--listen-port", type=int, default=51820, metavar="PORT",
                    help="UDP port of the hub (default 51820)")
    sp.add_argument("--interface", default="pytun0", metavar="NAME",
                    help="the hub's TUN device (default pytun0)")
    sp.add_argument("--mtu", type=int, default=1420, help="tunnel MTU (default 1420)")
    sp.add_argument("--egress", metavar="IFACE",
                    help="interface to masquerade laptops out of (default: the default route's)")
    sp.add_argument("--dns", action="append", metavar="ADDR,...", help="DNS servers for laptops")
    sp.add_argument("--metrics", metavar="ADDR:PORT",
                    help="serve Prometheus metrics there, e.g. 127.0.0.1:9586 (default: off)")
    sp.add_argument("--metrics-token-file", metavar="FILE",
                    help="scrapers must send the bearer token in FILE (mode 0600)")
    sp.add_argument("--route", action="append", metavar="CIDR,...",
                    help="networks behind the hub that laptops should reach")
    sp.add_argument("--allow-peer-to-peer", action="store_true",
                    help="let peers reach each other through the hub")
    sp.add_argument("--key-file", metavar="FILE",
                    help="use the hub key in FILE (mode 0600) instead of making one: the second"
                         " hub of a hot-standby pair names the key file both hosts hold")
    sp.add_argument("--service-address", metavar="ADDR",
                    help="hot standby: the address keepalived moves between two hubs (laptops"
                         " dial it); the hub's role then follows pytun-admin ha")
    sp.add_argument("--start-as", choices=state.HA_ROLES, default="standby",
                    help="hot standby: the role until keepalived says (default standby)")
    sp.add_argument("--under-load", type=int, default=state.DEFAULT_UNDER_LOAD,
                    metavar="PER_SECOND",
                    help="handshake messages a second above which the hub answers with cookies "
                         f"and limits each source (default {state.DEFAULT_UNDER_LOAD})")
    sp.add_argument("--registry", metavar="URL",
                    help="keep the registry in PostgreSQL (postgresql://USER@HOST/DB), shared by"
                         " the hubs whose hub.json names it (default: registry.db, SQLite)")

    sp = add("add-peer", cmd_add_peer, "register a peer and print its wg-quick config")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--public-key", metavar="KEY",
                    help="the peer's own public key; its private key then never leaves the laptop")
    sp.add_argument("--ip", action="append", metavar="ADDR[,ADDR6]",
                    help="inner address, one per family (default: lowest free)")
    sp.add_argument("--site", action="append", metavar="CIDR,...",
                    help="networks behind this peer (e.g. a branch office) routed to it")
    sp.add_argument("--full-tunnel", action="store_true",
                    help="send all the laptop's traffic via the hub")
    sp.add_argument("--keepalive", type=int, metavar="SECONDS",
                    help=f"PersistentKeepalive (default {DEFAULT_KEEPALIVE}; 0 = off)")
    sp.add_argument("--preshared-key", "--psk", dest="psk", action="store_true",
                    help="add a preshared key (extra post-quantum margin)")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the config to FILE (mode 0600)")
    sp.add_argument("--qr", action="store_true", help="print the config as a terminal QR code")
    sp.add_argument("--group", action="append", metavar="GROUP,...",
                    help="groups the peer is in (created if new); access rules name groups")
    sp.add_argument("--expires", metavar="TIME",
                    help="refused from this time on: 2026-12-31T18:00:00Z (ISO 8601, an offset"
                         " or Z)")
    sp.add_argument("--ttl", metavar="DURATION", help="refused after this long: 12h, 30d, 2w")

    _add_invite_parser(add)

    sp = add("set-groups", cmd_set_groups, "put a peer in exactly these groups")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("groups", metavar="GROUP,...", help="comma-separated; '' for none")

    sp = add("backup", cmd_backup, "copy the registry, hub key and settings to one file (0600)")
    sp.add_argument("file", metavar="FILE")
    sp = add("restore", cmd_restore, "make a new state directory from a backup")
    sp.add_argument("file", metavar="FILE")
    sp = add("export", cmd_export, "print the registry as a wg-quick server config")
    sp.add_argument("--format", choices=["wg-quick"], default="wg-quick")
    sp.add_argument("-o", "--output", metavar="FILE", help="write it to FILE (0600)")
    sp = add("import-wg", cmd_import_wg,
             "take over a WireGuard server: its key, port, subnet and peers")
    sp.add_argument("file", metavar="WG0.CONF")
    sp.add_argument("--endpoint", required=True, metavar="HOST[:PORT]",
                    help="what laptops dial (the server's config does not say)")
    sp.add_argument("--interface", default="pytun0", metavar="NAME")
    sp.add_argument("--live", metavar="IFACE",
                    help="also take each peer's endpoint from the running server (wg show"
                         " IFACE dump), so the hub calls the laptops back when it starts")
    sp.add_argument("--dry-run", action="store_true", help="print what would be created")

    access = sub.add_parser("access", help="access rules: what laptops may reach through the hub",
                            description="Access rules: the hub drops everything from laptops that"
                            " no rule allows (replies to allowed traffic pass).")
    access_sub = access.add_subparsers(dest="access_command", required=True, metavar="COMMAND")

    def add_access(name: str, fn, help: str) -> argparse.ArgumentParser:
        sp = access_sub.add_parser(name, parents=[common], help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    sp = add_access("list", cmd_access_list, "list the access rules")
    sp.add_argument("--json", action="store_true")
    sp = add_access("add", cmd_access_add, "allow a group or peer to reach a destination")
    sp.add_argument("source", metavar="SOURCE", help="a group, or peer:NAME")
    sp.add_argument("destination", metavar="DESTINATION",
                    help="a CIDR or address, hub, internet, a group, or peer:NAME")
    sp.add_argument("service", metavar="SERVICE", nargs="?",
                    help="tcp/PORT, udp/FIRST-LAST, icmp, tcp, udp (default: any)")
    sp.add_argument("--expires", metavar="TIME", help="until this time (2026-12-31T18:00:00Z)")
    sp.add_argument("--ttl", metavar="DURATION", help="for this long (90m, 12h, 30d)")
    sp.add_argument("--comment", metavar="TEXT")
    sp = add_access("remove", cmd_access_remove, "remove an access rule")
    sp.add_argument("id", metavar="ID", type=int)
    sp = add_access("explain", cmd_access_explain,
                    "would the hub let a peer reach an address? (exit 0 allow, 3 deny)")
    sp.add_argument("peer", metavar="PEER")
    sp.add_argument("destination", metavar="ADDRESS")
    sp.add_argument("service", metavar="SERVICE", nargs="?", help="tcp/5432, udp/53, icmp")
    sp.add_argument("--json", action="store_true")

    group = sub.add_parser("group", help="peer groups", description="Peer groups.")
    group_sub = group.add_subparsers(dest="group_command", required=True, metavar="COMMAND")
    for name, fn, what in (("list", cmd_group_list, "list groups and their members"),
                           ("add", cmd_group_add, "create a group"),
                           ("remove", cmd_group_remove, "remove a group no rule names")):
        sp = group_sub.add_parser(name, parents=[common], help=what, description=what)
        sp.set_defaults(fn=fn)
        if name == "list":
            sp.add_argument("--json", action="store_true")
        else:
            sp.add_argument("name", metavar="NAME")
        if name == "add":
            sp.add_argument("--comment", metavar="TEXT")

    for name, fn, what in (("remove-peer", cmd_remove_peer, "remove a peer for good"),
                           ("disable-peer", cmd_disable_peer, "keep a peer but refuse it"),
                           ("enable-peer", cmd_enable_peer, "accept a disabled peer again")):
        sp = add(name, fn, what)
        sp.add_argument("name", metavar="NAME")
        if name == "disable-peer":
            sp.add_argument("--reason", metavar="TEXT", help="shown in list-peers")

    sp = add("renew", cmd_renew, "move a peer's expiry (or lift it)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--ttl", metavar="DURATION", help="from now: 90m, 12h, 30d, 2w")
    sp.add_argument("--expires", metavar="TIME", help="at this time: 2026-12-31T18:00:00Z")
    sp.add_argument("--never", action="store_true", help="no expiry")

    sp = add("rotate-key", cmd_rotate_key,
             "give a peer a new key pair (its old key stops working at once)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--public-key", metavar="KEY", help="the laptop's own new public key")
    sp.add_argument("-o", "--output", metavar="FILE", help="write the new config to FILE (0600)")

    sp = add("list-peers", cmd_list_peers, "list the registered peers")
    sp.add_argument("--json", action="store_true")
    sp = add("show", cmd_show, "live view of the running hub: endpoints, handshakes, traffic")
    sp.add_argument("--json", action="store_true")
    from . import admin_ops
    admin_ops.add_commands(add)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    args.state_dir = state.resolve_state_dir(args.state_dir)
    from . import admin_ops
    args.fn = admin_ops.audited(args, sys.argv[1:] if argv is None else argv)
    return cli.run(PROG, args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
