"""Moving a hub: backup and restore, export to wg-quick, and import from a WireGuard server.

- `backup` copies the registry with SQLite's online backup API (consistent while the hub runs
  and writes) into one file, 0600, and adds the hub's private key and settings to it, in a
  table of its own (`pytun_backup`). `restore` makes a state directory from that file on a
  fresh host: same key, same settings, same peers, so laptops reconnect without a change.
- `export_wg_quick` writes the registry as a wg-quick server config (never locked in).
- `plan_import` reads a wg-quick server config (wg0.conf, as kept by hand, wg-easy or
  wg-portal) and says what it maps to: settings, peers with names taken from the comment above
  each [Peer] (`# Name = alice`, `# friendly_name = alice`, `# Client: alice`, `# alice`), and
  what cannot be mapped. `apply_import` creates the state directory from such a plan.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field

from ..common.errors import PytunError
from ..common import config, files, keys

from . import policy, state
from .registry import Peer, RegistryError, SqliteRegistry, check_name

BACKUP_FORMAT = 1
NAME_PATTERNS = [re.compile(p, re.I) for p in (
    r"#\s*(?:friendly_?name|name)\s*[=:]\s*(\S.*?)\s*$",  # "# Name = alice", wg-portal
    r"#\s*(?:client|peer|user)\s*[=:]\s*(\S+)",  # "# Client: alice (id)", wg-easy style
    r"#\s*([A-Za-z0-9._@-]{1,32})\s*$",  # "# alice"
)]


class MigrateError(PytunError):
    """A backup, restore, export or import that cannot be done; one line says why."""


# ------------------------------------------------------------------------------ backup


def backup(state_dir: str, path: str) -> int:
    """Write a consistent copy of the hub (registry, key, settings) to `path`, mode 0600.
    Returns the number of peers in it."""
    if os.path.exists(path):
        raise MigrateError(f"{path} exists; give a new file name")
    settings_text = _read(state.settings_path(state_dir))
    if state.HubSettings.from_json(settings_text).registry:
        raise MigrateError("the registry is in PostgreSQL: back it up with pg_dump (the hub's"
                           " key and hub.json are in the state directory)")
    private = state.load_private_key(state_dir)
    try:
        files.create_private(path)
    except OSError as exc:
        raise MigrateError(f"cannot create {path}: {exc.strerror}") from None
    try:
        src = sqlite3.connect(f"file:{state.registry_path(state_dir)}?mode=ro", uri=True,
                              timeout=10)
        dst = sqlite3.connect(path)
        try:
            src.backup(dst)  # online: pages copied while the hub may write
            dst.execute("CREATE TABLE pytun_backup (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            dst.executemany("INSERT INTO pytun_backup VALUES (?, ?)", [
                ("format", str(BACKUP_FORMAT)), ("created", str(int(time.time()))),
                ("settings", settings_text), ("private_key", keys.encode_key(private))])
            dst.commit()
            (count,) = dst.execute("SELECT count(*) FROM peers").fetchone()
        finally:
            src.close()
            dst.close()
    except (sqlite3.Error, OSError) as exc:
        os.unlink(path)
        raise MigrateError(f"backup failed: {exc}") from None
    return count


def restore(path: str, state_dir: str) -> int:
    """A state directory made from a backup; refuses one that holds a hub already."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if db.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise MigrateError(f"{path} is damaged (integrity_check failed)")
            meta = dict(db.execute("SELECT key, value FROM pytun_backup"))
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise MigrateError(f"{path} is not a pytun backup: {exc}") from None
    if meta.get("format") != str(BACKUP_FORMAT):
        raise MigrateError(f"{path} has backup format {meta.get('format')!r}; this pytun reads"
                           f" {BACKUP_FORMAT}")
    settings = state.HubSettings.from_json(meta["settings"], f"{path} (settings)")
    try:
        private = keys.parse_private(meta["private_key"], "the backup's hub key")
    except keys.BadKey as exc:
        raise MigrateError(str(exc)) from None
    state.init_state(state_dir, settings, private_key=private)
    registry_path = state.registry_path(state_dir)
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        dst = sqlite3.connect(registry_path)
        try:
            src.backup(dst)
            dst.execute("DROP TABLE pytun_backup")
            dst.commit()
        finally:
            src.close()
            dst.close()
        os.chmod(registry_path, 0o600)
        with SqliteRegistry(registry_path, create=False) as registry:  # migrates an older one
            return len(registry.list())
    except (sqlite3.Error, RegistryError) as exc:
        raise MigrateError(f"restore failed: {exc}") from None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise MigrateError(f"cannot read {path}: {exc.strerror}") from None


# ------------------------------------------------------------------------------ export


def export_wg_quick(settings, private_key: bytes, peers, now: float) -> str:
    """The registry as a wg-quick server config: the hub's interface and one [Peer] per peer
    the hub accepts; refused ones are listed in comments."""
    lines = ["# A pytun hub exported as a wg-quick server config.",
             "# pytun's access rules and NAT are not in it: add your own PostUp firewall rules.",
             "[Interface]",
             f"PrivateKey = {keys.encode_key(private_key)}",
             f"Address = {', '.join(str(a) for a in settings.addresses)}",
             f"ListenPort = {settings.listen_port}",
             f"MTU = {settings.mtu}"]
    for peer in peers:
        if peer.refused(now):
            lines += ["", f"# {peer.name} is {'disabled' if peer.disabled else 'expired'}:"
                          " not exported"]
            continue
        allowed = [*(ipaddress.ip_network(a, strict=False) for a in peer.addresses),
                   *peer.sites]
        lines += ["", f"# Name = {peer.name}", "[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.preshared_key:
            lines.append(f"PresharedKey = {peer.preshared_key}")
        lines.append(f"AllowedIPs = {', '.join(map(str, allowed))}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ import


@dataclass
class ImportPlan:
    settings: state.HubSettings
    private_key: bytes = field(repr=False)
    peers: list[Peer]
    rules: list[policy.Rule]
    unmapped: list[str]  # what the import leaves out, one line each


def peer_names(text: str) -> list[str | None]:
    """The name in the comment lines right above each [Peer], in order (None: none)."""
    names: list[str | None] = []
    comments: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comments.append(line)
            continue
        if line.lower() == "[peer]":
            found = None
            for comment in reversed(comments):
                for pattern in NAME_PATTERNS:
                    if m := pattern.match(comment):
                        found = m.group(1)
                        break
                if found:
                    break
            names.append(found)
        comments = [] if line else comments
    return names


def _name(candidate: str | None, index: int, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._@-]+", "-", candidate or "").strip("-")[:32] or \
        f"peer-{index + 1}"
    name, n = base, 2
    while name.lower() in taken:
        suffix = f"-{n}"
        name, n = base[:32 - len(suffix)] + suffix, n + 1
    try:
        check_name(name)
    except RegistryError:
        name = f"peer-{index + 1}"
    taken.add(name.lower())
    return name


def plan_import(text: str, path: str, *, endpoint: str, interface: str = "pytun0",
                live: dict | None = None) -> ImportPlan:
    """What importing this wg-quick server config would create. `live` maps public keys to
    (endpoint, latest handshake) from `wg show IFACE dump` of the running server."""
    try:
        parsed = config.parse(text, path)
    except config.ConfigError as exc:
        raise MigrateError(str(exc)) from None
    iface = parsed.interface
    unmapped = []
    by_family = {}
    for address in iface.addresses:
        if address.version in by_family:
            unmapped.append(f"Address {address}: pytun takes one address per family")
            continue
        by_family[address.version] = address
    if not by_family:
        raise MigrateError(f"{path}: the [Interface] has no Address; pytun needs the subnet")
    for address in by_family.values():
        if address.ip != address.network.network_address + 1:
            raise MigrateError(f"{path}: the hub's address {address} is not the first of its"
                               f" subnet {address.network}; pytun's hub always is (renumbering"
                               " the laptops is not something an import does)")
    subnets = [str(a.network) for a in sorted(by_family.values(), key=lambda a: a.version)]
    try:
        settings = state.HubSettings(subnet=",".join(subnets), endpoint=endpoint,
                                     listen_port=iface.listen_port or 51820,
                                     interface=interface, mtu=iface.mtu or 1420)
    except state.StateError as exc:
        raise MigrateError(str(exc)) from None
    for hook, key in (("pre_up", "PreUp"), ("post_up", "PostUp"), ("pre_down", "PreDown"),
                      ("post_down", "PostDown")):
        for command in getattr(iface, hook):
            unmapped.append(f"{key} = {command}: pytun makes its own firewall and NAT rules"
                            " (pytun-admin access)")
    if iface.dns:
        unmapped.append("DNS in the server's [Interface]: give laptops DNS with init --dns")
    if iface.table or iface.fwmark:
        unmapped.append("Table/FwMark: pytun routes the subnet itself")
    names = peer_names(text)
    taken: set[str] = set()
    peers = []
    for i, pc in enumerate(parsed.peers):
        key = keys.encode_key(pc.public_key)
        hosts = {n.version: n for n in pc.allowed_ips
                 if n.prefixlen == n.max_prefixlen and any(
                     n.subnet_of(s) for s in settings.subnets if s.version == n.version)}
        address = hosts.get(settings.subnet.version)
        if address is None:
            unmapped.append(f"[Peer] {key}: no single address of {settings.subnet} in its"
                            " AllowedIPs; not imported")
            continue
        address6 = hosts.get(6) if settings.subnet6 is not None else None
        sites = [n for n in pc.allowed_ips if n not in (address, address6)
                 and not any(n.version == s.version and n.overlaps(s) for s in settings.subnets)]
        endpoint_seen, handshake = (live or {}).get(key, (None, None))
        try:
            peers.append(Peer(
                name=_name(names[i] if i < len(names) else None, i, taken), public_key=key,
                address=ipaddress.ip_interface(address), sites=sites,
                keepalive=pc.persistent_keepalive,
                preshared_key=keys.encode_key(pc.preshared_key) if pc.preshared_key else None,
                address6=ipaddress.ip_interface(address6) if address6 else None,
                endpoint=endpoint_seen, last_handshake=handshake))
        except RegistryError as exc:
            unmapped.append(f"[Peer] {key}: {exc}; not imported")
    rules = [*policy.default_rules(settings),
             policy.Rule(policy.EVERYONE, policy.INTERNET,
                         comment="imported: the WireGuard server let every peer out")]
    return ImportPlan(settings, iface.private_key, peers, rules, unmapped)


def live_peers(dump: str) -> dict[str, tuple[str | None, int | None]]:
    """public key -> (endpoint, latest handshake) from `wg show IFACE dump`."""
    found = {}
    for line in dump.splitlines()[1:]:  # the first line is the interface
        fields = line.split("\t")
        if len(fields) < 5:
            continue
        endpoint = None if fields[2] == "(none)" else fields[2]
        handshake = int(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
        found[fields[0]] = (endpoint, handshake)
    return found


def apply_import(plan: ImportPlan, state_dir: str) -> None:
    """Create the state directory: key, settings, peers and rules, or nothing at all."""
    state.init_state(state_dir, plan.settings, private_key=plan.private_key,
                     default_rules=False)
    try:
        with state.open_hub_registry(state_dir, plan.settings) as registry:
            for peer in plan.peers:
                registry.add(peer, subnet=plan.settings.subnet,
                             reserved={a.ip for a in plan.settings.addresses},
                             subnet6=plan.settings.subnet6)
            registry.ensure_default_rules(plan.rules)
    except RegistryError as exc:
        for name in (state.SETTINGS_FILE, state.PRIVATE_KEY_FILE, state.REGISTRY_FILE,
                     state.REGISTRY_FILE + "-wal", state.REGISTRY_FILE + "-shm"):
            try:
                os.unlink(os.path.join(state_dir, name))
            except FileNotFoundError:
                pass
        raise MigrateError(f"import failed, nothing kept: {exc}") from None


def describe(plan: ImportPlan) -> str:
    s = plan.settings
    lines = [f"hub: subnet {', '.join(map(str, s.subnets))}, port {s.listen_port}, interface"
             f" {s.interface}, MTU {s.mtu}, endpoint {s.endpoint}, the server's private key"]
    for p in plan.peers:
        extra = f", sites {', '.join(map(str, p.sites))}" if p.sites else ""
        seen = f", last seen at {p.endpoint}" if p.endpoint else ""
        lines.append(f"peer {p.name}: {', '.join(str(a.ip) for a in p.addresses)}{extra}{seen}")
    lines += [f"rule: {r.text()}  ({r.comment})" for r in plan.rules]
    lines += [f"not mapped: {u}" for u in plan.unmapped]
    return "\n".join(lines) + "\n"
