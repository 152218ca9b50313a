"""The peer registry: who may connect to the hub, with which key, at which inner address.

`Registry` is the interface the hub and pytun-admin use; `SqliteRegistry` is the embedded
default (one file, WAL, fsync on every commit). Every method either does all of its work or
raises `RegistryError` and leaves the database as it was.

A running hub notices changes made by pytun-admin (another connection, usually another process)
by polling `change_token()`, which is cheap: it reads SQLite's data_version counter.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

from ..common.errors import PytunError
from ..common import files, keys

from . import policy
from .policy import PolicyError, Rule

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network

SCHEMA_VERSION = 2
NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,32}$")


class RegistryError(PytunError):
    """A refused registry operation; the message says why, in one line."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):  # match() let "alice\n" in
        raise RegistryError(f"bad peer name {name!r}: use 1-32 characters of A-Z a-z 0-9 . _ @ -")
    return name


def check_reason(text: str) -> str:
    if not isinstance(text, str) or len(text) > 200 or any(ord(c) < 32 for c in text):
        raise RegistryError("a reason is one line of at most 200 printable characters")
    return text


def host_address(value) -> IPInterface:
    """10.77.0.2, 10.77.0.2/32 -> IPv4Interface('10.77.0.2/32'). Wider prefixes are refused."""
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise RegistryError(f"{value!s} is not an IP address") from None
    if iface.network.prefixlen != iface.max_prefixlen:
        raise RegistryError(f"{value} must be a single address (/{iface.max_prefixlen})")
    return iface


@dataclass
class Peer:
    name: str
    public_key: str
    address: IPInterface
    sites: list[IPNetwork] = field(default_factory=list)
    full_tunnel: bool = False
    keepalive: int = 0  # PersistentKeepalive in seconds; 0 = off
    disabled: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    preshared_key: str | None = field(default=None, repr=False)
    endpoint: str | None = None
    last_handshake: int | None = None
    groups: list[str] = field(default_factory=list)  # beside the implicit ones
    address6: IPv6Interface | None = None  # on a dual-stack hub, the IPv6 address
    expires: int | None = None  # unix seconds; the hub refuses the peer from then on
    disabled_reason: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        try:
            self.groups = sorted({policy.check_group_name(g) for g in self.groups}
                                 - set(policy.IMPLICIT_GROUPS))
        except PolicyError as exc:
            raise RegistryError(str(exc)) from None
        try:
            self.public_key = keys.encode_key(keys.parse_public(self.public_key))
            if self.preshared_key is not None:
                self.preshared_key = keys.encode_key(keys.parse_psk(self.preshared_key))
        except keys.BadKey as exc:
            raise RegistryError(str(exc)) from None
        self.address = host_address(self.address)
        if self.address6 is not None:
            self.address6 = host_address(self.address6)
            if self.address6.version != 6 or self.address.version != 4:
                raise RegistryError("a second address is the IPv6 one, beside an IPv4 address")
        sites = []
        for site in self.sites:
            try:
                sites.append(ipaddress.ip_network(site))
            except ValueError as exc:
                raise RegistryError(f"bad site {site!s}: {exc}") from None
        self.sites = sites
        if not isinstance(self.keepalive, int) or not 0 <= self.keepalive <= 65535:
            raise RegistryError("keepalive must be 0 (off) to 65535 seconds, not"
                                f" {self.keepalive!r}")
        self.full_tunnel, self.disabled = bool(self.full_tunnel), bool(self.disabled)
        if self.expires is not None and not isinstance(self.expires, int):
            raise RegistryError(f"expiry must be unix seconds, not {self.expires!r}")
        self.disabled_reason = check_reason(self.disabled_reason or "")

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def refused(self, now: float) -> bool:
        """Disabled or expired: the hub does not load it."""
        return self.disabled or self.expired(now)

    @property
    def addresses(self) -> list[IPInterface]:
        return [self.address, *([self.address6] if self.address6 else [])]


class Registry(abc.ABC):
    """What the hub and pytun-admin need from a peer store (SQLite now, PostgreSQL later)."""

    @abc.abstractmethod
    def add(self, peer: Peer, *, subnet: IPNetwork | None = None,
            reserved: set = frozenset()) -> None:
        """Store a new peer. With `subnet`, its address must be a free host of that subnet."""

    @abc.abstractmethod
    def remove(self, name: str) -> Peer: ...

    @abc.abstractmethod
    def set_disabled(self, name: str, flag: bool, reason: str = "") -> None: ...

    @abc.abstractmethod
    def set_expiry(self, name: str, expires: int | None) -> None: ...

    @abc.abstractmethod
    def set_keys(self, name: str, public_key: str, preshared_key: str | None) -> None:
        """A new key (and preshared key) for a peer: its old key stops working at once."""

    @abc.abstractmethod
    def get(self, name: str) -> Peer: ...

    @abc.abstractmethod
    def list(self) -> list[Peer]:
        """All peers, ordered by address."""

    @abc.abstractmethod
    def allocate_address(self, subnet: IPNetwork, reserved: set = frozenset()) -> IPInterface:
        """The lowest host address of `subnet` that no peer uses and that is not reserved."""

    @abc.abstractmethod
    def record_endpoint(self, name_or_public_key: str, endpoint: str | None,
                        last_handshake: int | None) -> None: ...

    # -- groups and access rules (policy.py says what they mean) --

    @abc.abstractmethod
    def set_groups(self, name: str, groups: list[str]) -> None:
        """Put peer `name` in exactly these groups (besides the implicit ones); groups that do
        not exist yet are created."""

    @abc.abstractmethod
    def groups(self) -> list[tuple[str, str]]:
        """(name, comment) of every group, implicit ones first."""

    @abc.abstractmethod
    def add_group(self, name: str, comment: str = "") -> None: ...

    @abc.abstractmethod
    def remove_group(self, name: str) -> list[str]:
        """Remove a group no rule names; returns the peers that were in it."""

    @abc.abstractmethod
    def rules(self) -> list[Rule]:
        """Every access rule, with its id, in id order."""

    @abc.abstractmethod
    def add_rule(self, rule: Rule) -> Rule:
        """Store a rule whose groups and peers exist; returns it with its id."""

    @abc.abstractmethod
    def remove_rule(self, rule_id: int) -> Rule: ...

    @abc.abstractmethod
    def ensure_default_rules(self, rules: list[Rule]) -> bool:
        """Store `rules` unless default rules were stored once before (an operator may have
        removed some since); True when they were stored now."""

    @abc.abstractmethod
    def change_token(self) -> object:
        """A value that differs after another connection committed, or after this one changed
        the set of peers (add, remove, enable, disable; not record_endpoint)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- handshake replay state and batched endpoint notes (the hub writes these) -------------

    @abc.abstractmethod
    def handshake_timestamps(self) -> dict[str, bytes]:
        """The greatest TAI64N timestamp (12 bytes) accepted from each public key (base64).
        Kept per key, not per peer: it outlives remove/re-add, disable/enable and restarts."""

    @abc.abstractmethod
    def raise_handshake_timestamps(self, items) -> None:
        """Store each (public key, timestamp) unless a greater one is stored; one transaction.
        Does not move change_token()."""

    @abc.abstractmethod
    def record_endpoints(self, items) -> int:
        """record_endpoint for many (name, endpoint, last_handshake) in one transaction;
        names no longer registered are skipped. Returns how many rows were updated."""

    @abc.abstractmethod
    def hold_allocation_lock(self, timeout: float = 10.0) -> None:
        """Until close(), be the only writer that chooses addresses: what allocate_address()
        proposes then stays free until add() stores it. A dead process lets go at once.
        (SQLite: flock on a file beside the database; PostgreSQL: an advisory lock.)"""

    # -- invites: one-time tokens a laptop enrolls with (server/invites.py) -------------------

    @abc.abstractmethod
    def add_invite(self, invite: "Invite") -> None:
        """Store a new invite. Refused when a peer has its name, or another invite for that
        name is still pending."""

    @abc.abstractmethod
    def invites(self) -> list["Invite"]:
        """Every invite, pending or not, oldest first."""

    @abc.abstractmethod
    def get_invite(self, invite_id: str) -> "Invite | None": ...

    @abc.abstractmethod
    def revoke_invite(self, name_or_id: str, now: float) -> list["Invite"]:
        """Revoke the pending invites with this id or for this name; returns them. Refused
        (with the reason) when none is pending."""

    @abc.abstractmethod
    def enroll(self, invite_id: str, peer: Peer, *, subnet=None, reserved=frozenset(),
               subnet6=None, now: float) -> None:
        """add(peer) and mark the invite used by the peer's key, in one transaction; refused
        unless the invite is pending at `now` (a replayed enrollment changes nothing)."""

    @abc.abstractmethod
    def allocation_lock(self, timeout: float = 10.0):
        """hold_allocation_lock() for a `with` block only: for a long-lived connection (the
        hub's), which must not keep other writers from choosing addresses."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_in_subnet(address: IPInterface, subnet: IPNetwork, reserved=frozenset()) -> None:
    ip = address.ip
    if ip.version != subnet.version or ip not in subnet:
        raise RegistryError(f"address {ip} is outside the subnet {subnet}")
    if ip == subnet.network_address or (subnet.version == 4 and ip == subnet.broadcast_address):
        raise RegistryError(f"address {ip} is not a host address of {subnet}")
    if ip == subnet.network_address + 1 or ip in {ipaddress.ip_interface(r).ip for r in reserved}:
        raise RegistryError(f"address {ip} is reserved for the hub")


# Networks no site may overlap: routed to a laptop they would capture the hub's own loopback,
# link-local or multicast traffic (and a /0 overlaps them all: everything would go to one laptop).
_NOT_A_SITE = [(ipaddress.ip_network(n), what) for n, what in (
    ("0.0.0.0/8", "the unspecified range"), ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"), ("::/128", "the unspecified address"),
    ("::1/128", "loopback"), ("fe80::/10", "link-local"), ("ff00::/8", "multicast"))]


def check_site(site: IPNetwork) -> None:
    """Refuse a site that would route the hub's own or everyone's traffic to one peer."""
    if site.prefixlen == 0:
        raise RegistryError(f"site {site} is a default route: it would send everything to one "
                            f"peer (a laptop that wants all its traffic via the hub is "
                            f"--full-tunnel)")
    for special, what in _NOT_A_SITE:
        if special.version == site.version and special.overlaps(site):
            raise RegistryError(f"site {site} overlaps {what} ({special}); it cannot be a "
                                f"network behind a peer")


_SCHEMA = """
CREATE TABLE peers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    address TEXT NOT NULL UNIQUE,
    sites TEXT NOT NULL DEFAULT '[]',
    full_tunnel INTEGER NOT NULL DEFAULT 0,
    keepalive INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    preshared_key TEXT,
    endpoint TEXT,
    last_handshake INTEGER
);
"""
# What each schema version adds to the one before; a registry is brought up to date when opened.
_MIGRATIONS = {
    2: [
        "ALTER TABLE peers ADD COLUMN groups TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE groups (
            name TEXT PRIMARY KEY,
            comment TEXT NOT NULL DEFAULT '',
            created INTEGER NOT NULL)""",
        """CREATE TABLE rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            source TEXT NOT NULL,
            destination TEXT NOT NULL,
            protocol TEXT NOT NULL DEFAULT 'any',
            port_first INTEGER,
            port_last INTEGER,
            expires INTEGER,
            comment TEXT NOT NULL DEFAULT '',
            created INTEGER NOT NULL)""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "ALTER TABLE peers ADD COLUMN address6 TEXT",
        "CREATE UNIQUE INDEX peers_address6 ON peers (address6)",
        "ALTER TABLE peers ADD COLUMN expires INTEGER",
        "ALTER TABLE peers ADD COLUMN disabled_reason TEXT NOT NULL DEFAULT ''",
    ],
}
_COLUMNS = ("name", "public_key", "address", "sites", "full_tunnel", "keepalive", "disabled",
            "created", "preshared_key", "endpoint", "last_handshake", "groups", "address6",
            "expires", "disabled_reason")
_RULE_COLUMNS = ("id", "source", "destination", "protocol", "port_first", "port_last",
                 "expires", "comment")


def _to_peer(row) -> Peer:
    d = dict(zip(_COLUMNS, row))
    d["sites"] = json.loads(d["sites"])
    d["groups"] = json.loads(d["groups"])
    return Peer(**d)


def _to_rule(row) -> Rule:
    rule_id, source, destination, protocol, first, last, expires, comment = row
    return Rule(source, destination, protocol, None if first is None else (first, last),
                expires, comment, id=rule_id)


def _sqlite_error(path: str, exc: sqlite3.Error) -> str:
    """SQLite's words for `exc`, plus the likely cause where they hide it: a change that needs a
    new journal file on a full file system fails as "disk I/O error"."""
    text = str(exc)
    if "disk I/O error" in text:
        try:
            if os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0:
                return f"{text} (the file system holding it is full)"
        except OSError:
            pass
    return text


class SqlRegistry(Registry):
    """The registry's logic in SQL, shared by the backends. A subclass supplies `_write(fn)`
    (fn(db) inside one transaction that serialises writers), `_read(sql, args)`, the change
    token, the allocation lock and close(); `db.execute` takes SQLite's `?` placeholders."""

    _GREATEST = "max"  # the SQL function of two values that returns the greater one

    def add(self, peer: Peer, *, subnet=None, reserved=frozenset(), subnet6=None,
            also=None) -> None:
        """`also(db)`, when given, runs in the same transaction after the insert (enroll)."""
        if subnet6 is not None and peer.address6 is not None:
            check_in_subnet(peer.address6, subnet6, reserved)
            for site in peer.sites:
                if site.version == 6 and site.overlaps(subnet6):
                    raise RegistryError(f"site {site} overlaps the hub subnet {subnet6}")
        if subnet is not None:
            check_in_subnet(peer.address, subnet, reserved)
            for site in peer.sites:
                if site.version == subnet.version and site.overlaps(subnet):
                    raise RegistryError(f"site {site} overlaps the hub subnet {subnet}")

        def insert(db):
            def owner(column, value):
                row = db.execute(f"SELECT name FROM peers WHERE {column} = ?", (value,)).fetchone()
                return row and row[0]

            for site in peer.sites:
                check_site(site)
            # Unique regardless of case (NOCASE folds ASCII, all a name may hold), checked here
            # rather than by an index that a registry already holding both would fail to build.
            row = db.execute("SELECT name FROM peers WHERE name = ? COLLATE NOCASE",
                             (peer.name,)).fetchone()
            if row:
                same = "" if row[0] == peer.name else " (names are case-insensitive)"
                raise RegistryError(f"a peer named {row[0]!r} already exists{same}")
            if other := owner("public_key", peer.public_key):
                raise RegistryError(f"that public key already belongs to peer {other!r}")
            for column, address in (("address", peer.address), ("address6", peer.address6)):
                if address is not None and (other := owner(column, str(address))):
                    raise RegistryError(f"address {address.ip} is already used by peer {other!r}")
            for other, sites in db.execute("SELECT name, sites FROM peers"):
                for site in map(ipaddress.ip_network, json.loads(sites)):
                    for mine in peer.sites:
                        if mine.version == site.version and mine.overlaps(site):
                            raise RegistryError(f"site {mine} overlaps site {site} of peer"
                                                f" {other!r}")
            values = (peer.name, peer.public_key, str(peer.address),
                      json.dumps([str(s) for s in peer.sites]), int(peer.full_tunnel),
                      peer.keepalive, int(peer.disabled), int(peer.created), peer.preshared_key,
                      peer.endpoint, peer.last_handshake, json.dumps(peer.groups),
                      str(peer.address6) if peer.address6 else None, peer.expires,
                      peer.disabled_reason)
            self._create_groups(db, peer.groups)
            db.execute(f"INSERT INTO peers ({', '.join(_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_COLUMNS))})", values)
            if also is not None:
                also(db)

        self._write(insert)

    def _must_exist(self, db, name: str) -> str:
        """The stored spelling of a peer's name: names are one person whatever the case."""
        row = db.execute("SELECT name FROM peers WHERE name = ? COLLATE NOCASE ORDER BY"
                         " name = ? DESC", (name, name)).fetchone()
        if row is None:
            raise RegistryError(f"no peer named {name!r}")
        return row[0]

    def remove(self, name: str) -> Peer:
        def delete(db):
            nonlocal name
            name = self._must_exist(db, name)
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM peers WHERE name = ?",
                             (name,)).fetchone()
            db.execute("DELETE FROM peers WHERE name = ?", (name,))
            return _to_peer(row)

        return self._write(delete)

    def set_disabled(self, name: str, flag: bool, reason: str = "") -> None:
        reason = check_reason(reason) if flag else ""

        def update(db):
            nonlocal name
            name = self._must_exist(db, name)
            db.execute("UPDATE peers SET disabled = ?, disabled_reason = ? WHERE name = ?",
                       (int(bool(flag)), reason, name))

        self._write(update)

    def set_expiry(self, name: str, expires: int | None) -> None:
        def update(db):
            nonlocal name
            name = self._must_exist(db, name)
            db.execute("UPDATE peers SET expires = ? WHERE name = ?", (expires, name))

        self._write(update)

    def set_keys(self, name: str, public_key: str, preshared_key: str | None) -> None:
        try:
            public_key = keys.encode_key(keys.parse_public(public_key))
            if preshared_key is not None:
                preshared_key = keys.encode_key(keys.parse_psk(preshared_key))
        except keys.BadKey as exc:
            raise RegistryError(str(exc)) from None

        def update(db):
            nonlocal name
            name = self._must_exist(db, name)
            row = db.execute("SELECT name FROM peers WHERE public_key = ?",
                             (public_key,)).fetchone()
            if row is not None:
                raise RegistryError(f"that public key already belongs to peer {row[0]!r}")
            db.execute("UPDATE peers SET public_key = ?, preshared_key = ?, endpoint = NULL"
                       " WHERE name = ?", (public_key, preshared_key, name))

        self._write(update)

    def get(self, name: str) -> Peer:
        rows = self._read(f"SELECT {', '.join(_COLUMNS)} FROM peers WHERE name = ? COLLATE NOCASE"
                          " ORDER BY name = ? DESC", (name, name))
        if not rows:
            raise RegistryError(f"no peer named {name!r}")
        return _to_peer(rows[0])

    def list(self) -> list[Peer]:
        peers = [_to_peer(r) for r in self._read(f"SELECT {', '.join(_COLUMNS)} FROM peers")]
        return sorted(peers, key=lambda p: (p.address.version, int(p.address.ip)))

    def allocate_address(self, subnet, reserved=frozenset()) -> IPInterface:
        subnet = ipaddress.ip_network(subnet)
        column = "address6" if subnet.version == 6 else "address"
        taken = {ipaddress.ip_interface(a).ip
                 for (a,) in self._read(f"SELECT {column} FROM peers WHERE {column} IS NOT NULL")}
        if subnet.version == 6:  # an IPv6-only hub keeps its peers' addresses in `address`
            taken |= {ipaddress.ip_interface(a).ip for (a,) in self._read(
                "SELECT address FROM peers")}
        taken |= {ipaddress.ip_interface(r).ip for r in reserved}
        taken.add(subnet.network_address + 1)  # the hub's own address
        last = subnet.broadcast_address - (1 if subnet.version == 4 else 0)
        ip = subnet.network_address + 1
        while ip <= last:  # ends after at most len(taken) + 1 steps
            if ip not in taken:
                return ipaddress.ip_interface(f"{ip}/{ip.max_prefixlen}")
            ip += 1
        raise RegistryError(f"subnet {subnet} is full")

    def record_endpoint(self, name_or_public_key: str, endpoint, last_handshake) -> None:
        def update(db):
            cur = db.execute("UPDATE peers SET endpoint = ?, last_handshake = ? "
                             "WHERE name = ? OR public_key = ?",
                             (endpoint, last_handshake, name_or_public_key, name_or_public_key))
            if cur.rowcount == 0:
                raise RegistryError(f"no peer named or keyed {name_or_public_key!r}")

        # The hub writes this itself; it must not make its own change_token() move.
        self._write(update, peer_set_changed=False)

    # -- groups and access rules ----------------------------------------------------------------

    @staticmethod
    def _create_groups(db, groups) -> None:
        for group in groups:
            db.execute("INSERT INTO groups (name, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       (group, int(time.time())))

    def set_groups(self, name: str, groups: list[str]) -> None:
        try:
            wanted = sorted({policy.check_group_name(g) for g in groups}
                            - set(policy.IMPLICIT_GROUPS))
        except PolicyError as exc:
            raise RegistryError(str(exc)) from None

        def update(db):
            nonlocal name
            name = self._must_exist(db, name)
            self._create_groups(db, wanted)
            db.execute("UPDATE peers SET groups = ? WHERE name = ?", (json.dumps(wanted), name))

        self._write(update)

    def groups(self) -> list[tuple[str, str]]:
        stored = self._read("SELECT name, comment FROM groups ORDER BY name")
        implicit = [(policy.EVERYONE, "every peer"),
                    (policy.FULL_TUNNEL, "every peer added with --full-tunnel")]
        return implicit + [(n, c) for n, c in stored if n not in policy.IMPLICIT_GROUPS]

    def add_group(self, name: str, comment: str = "") -> None:
        try:
            policy.check_group_name(name)
        except PolicyError as exc:
            raise RegistryError(str(exc)) from None
        if name in policy.IMPLICIT_GROUPS:
            raise RegistryError(f"{name} is a built-in group")

        def insert(db):
            if db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"a group named {name!r} already exists")
            db.execute("INSERT INTO groups (name, comment, created) VALUES (?, ?, ?)",
                       (name, comment, int(time.time())))

        self._write(insert)

    def remove_group(self, name: str) -> list[str]:
        if name in policy.IMPLICIT_GROUPS:
            raise RegistryError(f"{name} is a built-in group and cannot be removed")

        def delete(db):
            if not db.execute("SELECT 1 FROM groups WHERE name = ?", (name,)).fetchone():
                raise RegistryError(f"no group named {name!r}")
            users = [rid for rid, src, dst in db.execute(
                "SELECT id, source, destination FROM rules") if name in (src, dst)]
            if users:
                raise RegistryError(f"group {name} is named by rule {', '.join(map(str, users))};"
                                    " remove the rule first")
            members = []
            for peer, groups in db.execute("SELECT name, groups FROM peers").fetchall():
                groups = json.loads(groups)
                if name in groups:
                    members.append(peer)
                    groups.remove(name)
                    db.execute("UPDATE peers SET groups = ? WHERE name = ?",
                               (json.dumps(groups), peer))
            db.execute("DELETE FROM groups WHERE name = ?", (name,))
            return members

        return self._write(delete)

    def rules(self) -> list[Rule]:
        rows = self._read(f"SELECT {', '.join(_RULE_COLUMNS)} FROM rules ORDER BY id")
        return [_to_rule(r) for r in rows]

    def add_rule(self, rule: Rule) -> Rule:
        def insert(db):
            for who in (rule.source, rule.destination):
                if who.startswith("peer:"):
                    if not db.execute("SELECT 1 FROM peers WHERE name = ? COLLATE NOCASE",
                                      (who[5:],)).fetchone():
                        raise RegistryError(f"no peer named {who[5:]!r}")
                elif who in (policy.HUB, policy.INTERNET) or "/" in who:
                    continue
                elif who not in policy.IMPLICIT_GROUPS and not db.execute(
                        "SELECT 1 FROM groups WHERE name = ?", (who,)).fetchone():
                    raise RegistryError(f"no group named {who!r} (pytun-admin group add {who})")
            first, last = rule.ports if rule.ports else (None, None)
            (rule_id,) = db.execute(
                "INSERT INTO rules (source, destination, protocol, port_first, port_last,"
                " expires, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (rule.source, rule.destination, rule.protocol, first, last, rule.expires,
                 rule.comment, int(time.time()))).fetchone()
            return dataclasses.replace(rule, id=rule_id)

        return self._write(insert)

    def remove_rule(self, rule_id: int) -> Rule:
        def delete(db):
            row = db.execute(f"SELECT {', '.join(_RULE_COLUMNS)} FROM rules WHERE id = ?",
                             (rule_id,)).fetchone()
            if row is None:
                raise RegistryError(f"no rule {rule_id}")
            db.execute("DELETE FROM rules WHERE id = ?", (rule_id,))
            return _to_rule(row)

        return self._write(delete)

    def ensure_default_rules(self, rules: list[Rule]) -> bool:
        if self._read("SELECT 1 FROM meta WHERE key = 'default_rules'"):
            return False

        def insert(db):
            if db.execute("SELECT 1 FROM meta WHERE key = 'default_rules'").fetchone():
                return False
            for rule in rules:
                first, last = rule.ports if rule.ports else (None, None)
                db.execute(
                    "INSERT INTO rules (source, destination, protocol, port_first, port_last,"
                    " expires, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (rule.source, rule.destination, rule.protocol, first, last, rule.expires,
                     rule.comment, int(time.time())))
            db.execute("INSERT INTO meta (key, value) VALUES ('default_rules', ?)",
                       (str(int(time.time())),))
            return True

        return self._write(insert)

    def handshake_timestamps(self) -> dict[str, bytes]:
        rows = self._read("SELECT public_key, tai64n FROM handshake_timestamps")
        return {k: bytes(t) for k, t in rows}

    def raise_handshake_timestamps(self, items) -> None:
        rows = [(public_key, bytes(t)) for public_key, t in items]
        for _, t in rows:
            if len(t) != 12:
                raise RegistryError("a TAI64N timestamp is 12 bytes")
        if not rows:
            return

        def upsert(db):
            # max() of two BLOBs compares bytes: TAI64N is big-endian, so that is time order.
            db.executemany("INSERT INTO handshake_timestamps (public_key, tai64n) VALUES (?, ?) "
                           "ON CONFLICT(public_key) DO UPDATE SET tai64n ="
                           f" {self._GREATEST}(handshake_timestamps.tai64n, excluded.tai64n)",
                           rows)

        self._write(upsert, peer_set_changed=False)

    def record_endpoints(self, items) -> int:
        rows = list(items)
        if not rows:
            return 0

        def update(db):
            n = 0
            for name, endpoint, last_handshake in rows:
                n += db.execute("UPDATE peers SET endpoint = ?, last_handshake = ? WHERE name = ?",
                                (endpoint, last_handshake, name)).rowcount
            return n

        return self._write(update, peer_set_changed=False)

    def add_invite(self, invite: "Invite") -> None:
        now = time.time()

        def insert(db):
            row = db.execute("SELECT name FROM peers WHERE name = ? COLLATE NOCASE",
                             (invite.name,)).fetchone()
            if row:
                raise RegistryError(f"a peer named {row[0]!r} already exists")
            for other in map(_to_invite, db.execute(
                    f"SELECT {', '.join(_INVITE_COLUMNS)} FROM invites WHERE name = ? COLLATE"
                    " NOCASE", (invite.name,)).fetchall()):
                if other.state(now) == "pending":
                    raise RegistryError(f"invite {other.id} for {other.name} is still pending"
                                        f" (until {_utc(other.expires)}); revoke it first")
            db.execute(f"INSERT INTO invites ({', '.join(_INVITE_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_INVITE_COLUMNS))})", _invite_row(invite))

        self._write(insert, peer_set_changed=False)

    def invites(self) -> list["Invite"]:
        return [_to_invite(r) for r in self._read(
            f"SELECT {', '.join(_INVITE_COLUMNS)} FROM invites ORDER BY created, id")]

    def get_invite(self, invite_id: str) -> "Invite | None":
        rows = self._read(f"SELECT {', '.join(_INVITE_COLUMNS)} FROM invites WHERE id = ?",
                          (invite_id,))
        return _to_invite(rows[0]) if rows else None

    def revoke_invite(self, name_or_id: str, now: float) -> list["Invite"]:
        def revoke(db):
            found = [_to_invite(r) for r in db.execute(
                f"SELECT {', '.join(_INVITE_COLUMNS)} FROM invites WHERE id = ? OR name = ?"
                " COLLATE NOCASE ORDER BY created", (name_or_id.lower(), name_or_id)).fetchall()]
            if not found:
                raise RegistryError(f"no invite named or numbered {name_or_id!r}")
            pending = [i for i in found if i.state(now) == "pending"]
            if not pending:
                raise RegistryError("; ".join(i.refusal() for i in found))
            for invite in pending:
                db.execute("UPDATE invites SET revoked = ? WHERE id = ?", (int(now), invite.id))
            return [dataclasses.replace(i, revoked=int(now)) for i in pending]

        return self._write(revoke, peer_set_changed=False)

    def enroll(self, invite_id: str, peer: Peer, *, subnet=None, reserved=frozenset(),
               subnet6=None, now: float) -> None:
        def claim(db):
            row = db.execute(f"SELECT {', '.join(_INVITE_COLUMNS)} FROM invites WHERE id = ?",
                             (invite_id,)).fetchone()
            if row is None:
                raise RegistryError("no such invite")
            invite = _to_invite(row)
            if invite.state(now) != "pending":
                raise InviteRefused(invite.refusal())
            db.execute("UPDATE invites SET used = ?, used_by = ? WHERE id = ? AND used IS NULL",
                       (int(now), peer.public_key, invite_id))

        invite = self.get_invite(invite_id)  # first, so a used invite says so (checked again)
        if invite is not None and invite.state(now) != "pending":
            raise InviteRefused(invite.refusal())
        self.add(peer, subnet=subnet, reserved=reserved, subnet6=subnet6, also=claim)


class SqliteRegistry(SqlRegistry):
    def __init__(self, path: str, *, create: bool = True):
        self.path = path
        if not os.path.exists(path):
            if not create:
                raise RegistryError(f"registry {path} does not exist")
            try:
                files.create_private(path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise RegistryError(f"cannot create {path}: {exc.strerror}") from None
        self._lock = threading.Lock()
        self._commits = 0
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                       timeout=5.0)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open {path}: {_sqlite_error(path, exc)}") from None
        try:
            self._setup()
        except sqlite3.Error as exc:
            self._db.close()
            raise RegistryError(f"cannot use {path}: {_sqlite_error(path, exc)}") from None
        except RegistryError:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_TIMESTAMPS_TABLE)  # at any schema version: see the end of this file
            db.execute(_INVITES_TABLE)  # the same: see "invites" at the end of this file
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(f"{self.path} has schema version {version}; this pytun "
                                    f"understands up to {SCHEMA_VERSION}")
            if version == 0:
                db.execute(_SCHEMA.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
                version = 1
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _write(self, fn, *, peer_set_changed: bool = True):
        """Run fn(db) inside one IMMEDIATE transaction; all or nothing."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise RegistryError(f"registry refused the change: {exc}") from None
            except sqlite3.Error as exc:
                raise RegistryError(
                    f"registry {self.path}: {_sqlite_error(self.path, exc)}") from None
            self._commits += peer_set_changed
            return result

    def _read(self, sql: str, args=()) -> list:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise RegistryError(
                    f"registry {self.path}: {_sqlite_error(self.path, exc)}") from None

    def change_token(self) -> tuple[int, int]:
        (data_version,), = self._read("PRAGMA data_version")
        return data_version, self._commits

    # -- handshake replay state and batched endpoint notes --------------------------------------

    def hold_allocation_lock(self, timeout: float = 10.0) -> None:
        import fcntl

        if getattr(self, "_allocation_fd", None) is not None:
            return
        path = f"{self.path}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RegistryError(f"cannot open {path}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RegistryError(f"{path} stayed locked for {timeout:g} s: another "
                                        f"pytun-admin is still adding a peer") from None
                time.sleep(0.005)
        self._allocation_fd = fd

    def close(self) -> None:
        if (fd := getattr(self, "_allocation_fd", None)) is not None:
            self._allocation_fd = None
            os.close(fd)  # lets the next pytun-admin choose
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SqliteRegistry({self.path!r})"

    # -- invites ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def allocation_lock(self, timeout: float = 10.0):
        if getattr(self, "_allocation_fd", None) is not None:
            yield  # held already, until close()
            return
        path = f"{self.path}.lock"
        if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
            # Another user's (root's pytun-admin beside a hub that runs as its own user). The
            # lock only spares a concurrent add-peer an error: add() still refuses, inside its
            # transaction, an address another peer took meanwhile.
            yield
            return
        self.hold_allocation_lock(timeout)
        try:
            yield
        finally:
            fd, self._allocation_fd = self._allocation_fd, None
            os.close(fd)


# ---------------------------------------------------------------------------------- opening one

PG_SCHEMES = ("postgresql://", "postgres://")


def is_url(location: str) -> bool:
    """A PostgreSQL connection URL, as opposed to the path of a SQLite file."""
    return isinstance(location, str) and location.startswith(PG_SCHEMES)


def mask(location: str) -> str:
    """`location` fit for logs and status output: a URL's password becomes ***."""
    if not is_url(location):
        return location
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(location)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{hostinfo}"
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        if netloc == parts.netloc and all(k != "password" for k, _ in pairs):
            return location  # nothing secret in it
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*/")
        masked = urlunsplit(("", netloc, parts.path, query, parts.fragment))
        return f"{parts.scheme}://{masked.removeprefix('//')}"
    except ValueError:
        return location.partition("://")[0] + "://***"  # unparsable: show nothing of it


def open_registry(location: str, *, create: bool = False) -> Registry:
    """The registry at `location`: a SQLite file's path, or a postgresql:// (postgres://) URL.
    With create, a missing file (or schema) is made; without, its absence is an error."""
    if is_url(location):
        from .registry_pg import PostgresRegistry

        return PostgresRegistry(location, create=create)
    return SqliteRegistry(location, create=create)


# ---------------------------------------------------------------------------------- replay state
# The greatest TAI64N timestamp accepted from each public key, kept apart from `peers` and keyed
# by key, so it outlives remove/re-add, disable/enable and restarts. Created by _setup at any
# schema version (IF NOT EXISTS): it is not part of the versioned schema.

_TIMESTAMPS_TABLE = """
CREATE TABLE IF NOT EXISTS handshake_timestamps (
    public_key TEXT PRIMARY KEY,
    tai64n BLOB NOT NULL
)
"""


# ---------------------------------------------------------------------------------- invites
# One-time tokens for `pytun-admin invite` (server/invites.py, common/enroll.py). The secret is
# never stored: `verifier` is common.enroll.verifier(id, secret). Rows stay after use, revocation
# or expiry, as a record of who enrolled with which key. Created by _setup at any schema version
# (IF NOT EXISTS), like the replay state above.

_INVITES_TABLE = """
CREATE TABLE IF NOT EXISTS invites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    verifier BLOB NOT NULL,
    expires INTEGER NOT NULL,
    groups TEXT NOT NULL DEFAULT '[]',
    full_tunnel INTEGER NOT NULL DEFAULT 0,
    keepalive INTEGER NOT NULL DEFAULT 25,
    peer_expires INTEGER,
    peer_ttl INTEGER,
    created INTEGER NOT NULL,
    used INTEGER,
    used_by TEXT,
    revoked INTEGER
)
"""
_INVITE_COLUMNS = ("id", "name", "verifier", "expires", "groups", "full_tunnel", "keepalive",
                   "peer_expires", "peer_ttl", "created", "used", "used_by", "revoked")
_INVITE_ID = re.compile(r"[0-9a-f]{16}")


class InviteRefused(RegistryError):
    """The invite exists but is used, revoked or expired; the message says which."""


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass
class Invite:
    id: str  # 16 hex digits, the token's invite id
    name: str  # the peer it makes
    verifier: bytes = field(repr=False)
    expires: int  # unix seconds: the token works until then
    groups: list[str] = field(default_factory=list)
    full_tunnel: bool = False
    keepalive: int = 25
    peer_expires: int | None = None  # the peer's expiry, a time ...
    peer_ttl: int | None = None  # ... or seconds from enrollment
    created: int = field(default_factory=lambda: int(time.time()))
    used: int | None = None
    used_by: str | None = None  # the public key that enrolled
    revoked: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _INVITE_ID.fullmatch(self.id):
            raise RegistryError("an invite id is 16 lowercase hex digits")
        check_name(self.name)
        if not isinstance(self.verifier, bytes) or len(self.verifier) != 32:
            raise RegistryError("an invite's verifier is 32 bytes")
        try:
            self.groups = sorted({policy.check_group_name(g) for g in self.groups}
                                 - set(policy.IMPLICIT_GROUPS))
        except PolicyError as exc:
            raise RegistryError(str(exc)) from None
        if not isinstance(self.keepalive, int) or not 0 <= self.keepalive <= 65535:
            raise RegistryError("keepalive must be 0 (off) to 65535 seconds, not"
                                f" {self.keepalive!r}")
        if self.peer_expires is not None and self.peer_ttl is not None:
            raise RegistryError("an invite gives the peer an expiry time or a lifetime, not both")
        self.full_tunnel = bool(self.full_tunnel)

    def state(self, now: float) -> str:
        """pending (the token works), used, revoked or expired."""
        if self.used is not None:
            return "used"
        if self.revoked is not None:
            return "revoked"
        if now >= self.expires:
            return "expired"
        return "pending"

    def refusal(self) -> str:
        """Why the token no longer works, for a state other than pending."""
        if self.used is not None:
            return f"invite {self.id} for {self.name} was already used at {_utc(self.used)}"
        if self.revoked is not None:
            return f"invite {self.id} for {self.name} was revoked at {_utc(self.revoked)}"
        return f"invite {self.id} for {self.name} expired at {_utc(self.expires)}"

    def peer_expiry(self, now: float) -> int | None:
        """The enrolled peer's expiry when it enrolls at `now`."""
        if self.peer_ttl is not None:
            return int(now) + self.peer_ttl
        return self.peer_expires


def _invite_row(invite: Invite) -> tuple:
    return (invite.id, invite.name, invite.verifier, invite.expires, json.dumps(invite.groups),
            int(invite.full_tunnel), invite.keepalive, invite.peer_expires, invite.peer_ttl,
            invite.created, invite.used, invite.used_by, invite.revoked)


def _to_invite(row) -> Invite:
    d = dict(zip(_INVITE_COLUMNS, row))
    d["groups"] = json.loads(d["groups"])
    d["verifier"] = bytes(d["verifier"])
    return Invite(**d)
