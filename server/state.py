"""The hub's state directory (mode 0700):

    hub.json      settings (HubSettings), written by `pytun-admin init`
    private.key   the hub's X25519 private key, base64, mode 0600 (unless hub.json names a
                  `private_key_file` elsewhere: a hot-standby pair shares one key file)
    registry.db   the peer registry (SQLite), mode 0600; absent when hub.json names a
                  PostgreSQL registry (`registry`) that several hubs share
    control.sock  the running hub's control socket, mode 0600

`hub.json` is written last, so a directory that has it is complete.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from ipaddress import (IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface,
                       IPv6Network)

from ..common.errors import PytunError
from ..common import files, keys
from ..common.endpoint import Endpoint

from . import policy
from .registry import Registry, RegistryError, is_url, open_registry

DEFAULT_STATE_DIR = "/var/lib/pytun"
SETTINGS_FILE = "hub.json"
PRIVATE_KEY_FILE = "private.key"
REGISTRY_FILE = "registry.db"
CONTROL_SOCKET = "control.sock"
SETTINGS_VERSION = 1
DEFAULT_EXPIRY_WARNING = 3 * 86400
DEFAULT_UNDER_LOAD = 1000  # handshake messages a second
HA_ROLES = ("standby", "active")

_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class StateError(PytunError):
    """The state directory is missing, incomplete or invalid; the message says which."""


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def resolve_state_dir(arg: str | None) -> str:
    return arg or os.environ.get("PYTUN_STATE_DIR") or DEFAULT_STATE_DIR


def settings_path(state_dir: str) -> str:
    return os.path.join(state_dir, SETTINGS_FILE)


def private_key_path(state_dir: str) -> str:
    return os.path.join(state_dir, PRIVATE_KEY_FILE)


def registry_path(state_dir: str) -> str:
    return os.path.join(state_dir, REGISTRY_FILE)


def registry_location(state_dir: str, settings: "HubSettings | None") -> str:
    """Where the hub's registry is: hub.json's `registry` URL, else registry.db here."""
    if settings is not None and settings.registry:
        return settings.registry
    return registry_path(state_dir)


def open_hub_registry(state_dir: str, settings: "HubSettings | None" = None, *,
                      create: bool = False) -> Registry:
    """The registry `settings` (by default hub.json) name for this state directory."""
    if settings is None:
        settings = load_settings(state_dir)
    return open_registry(registry_location(state_dir, settings), create=create)


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, CONTROL_SOCKET)


def normalize_endpoint(text: str, default_port: int) -> str:
    """'vpn.example.com' -> 'vpn.example.com:51820'; '[fd00::1]:4000' stays; checks the rest."""
    try:
        return str(Endpoint.parse(text, default_port))
    except ValueError as exc:
        raise StateError(str(exc)) from None


def _check_metrics(settings) -> None:
    if settings.metrics is not None:
        from .metrics import MetricsError, parse_listen
        try:
            parse_listen(str(settings.metrics))
        except MetricsError as exc:
            raise StateError(str(exc)) from None
    token = settings.metrics_token_file
    if token is not None and not os.path.isabs(str(token)):
        raise StateError(f"metrics token file {token!r}: give an absolute path")


def _check_ha(ha) -> dict | None:
    """The `ha` setting, complete: {"service_address": "<address>", "start_as": "standby"}."""
    if ha is None:
        return None
    if not isinstance(ha, dict):
        raise StateError('ha must be an object: {"service_address": "192.0.2.1",'
                         ' "start_as": "standby"}')
    unknown = sorted(set(ha) - {"service_address", "start_as"})
    if unknown:
        raise StateError(f"ha: unknown setting {unknown[0]!r}")
    if "service_address" not in ha:
        raise StateError("ha: missing setting 'service_address' (the address keepalived moves)")
    try:
        address = ipaddress.ip_address(str(ha["service_address"]))
    except ValueError:
        raise StateError(f"ha: bad service address {ha['service_address']!r}") from None
    start_as = ha.get("start_as", "standby")
    if start_as not in HA_ROLES:
        raise StateError(f"ha: start_as must be standby or active, not {start_as!r}")
    return {"service_address": str(address), "start_as": start_as}


@dataclass
class HubSettings:
    subnet: IPv4Network | IPv6Network
    endpoint: str
    listen_port: int = 51820
    interface: str = "pytun0"
    metrics: str | None = None  # Prometheus metrics on this address ("127.0.0.1:9586"); off
    metrics_token_file: str | None = None  # a bearer token scrapers must send (metrics.py)
    mtu: int = 1420
    under_load_threshold: int = DEFAULT_UNDER_LOAD  # handshake messages a second
    egress: str | None = None
    dns: list[IPv4Address | IPv6Address] = field(default_factory=list)
    routes: list[IPv4Network | IPv6Network] = field(default_factory=list)
    allow_peer_to_peer: bool = False
    subnet6: IPv6Network | None = None  # dual stack: the IPv6 subnet beside an IPv4 `subnet`
    expiry_warning: int = DEFAULT_EXPIRY_WARNING  # seconds before a peer's expiry: a warning
    # Hot standby (keepalived moves `service_address` between two hubs; see deploy/keepalived):
    # {"service_address": "192.0.2.1", "start_as": "standby"}
    ha: dict | None = None
    private_key_file: str | None = None  # the hub key outside the state dir (0600), shared
    # A PostgreSQL registry's URL (postgresql://...); None: registry.db in the state directory.
    # It may hold a password, so it stays out of repr (and the logs): mask() shows it.
    registry: str | None = field(default=None, repr=False)
    # Data-plane workers (server/workers.py): a number, or "auto" for one per core.
    workers: int | str = 1

    def __post_init__(self) -> None:
        given = [self.subnet, *([self.subnet6] if self.subnet6 else [])]
        if isinstance(self.subnet, str) and "," in self.subnet:  # "10.77.0.0/24,fd77::/64"
            given = [part.strip() for part in self.subnet.split(",") if part.strip()]
        nets = []
        for text in given:
            if isinstance(text, str) and "/" not in text and _is_address(text):
                raise StateError(f"subnet {text} has no /prefix: write e.g. {text}/24")
            try:
                nets.append(ipaddress.ip_network(text))
            except ValueError as exc:
                raise StateError(f"bad subnet {text!s}: {exc}") from None
        if not nets or len(nets) > 2 or len({n.version for n in nets}) != len(nets):
            raise StateError("give one subnet, or one IPv4 and one IPv6 subnet")
        nets.sort(key=lambda n: n.version)
        self.subnet, self.subnet6 = nets[0], (nets[1] if len(nets) == 2 else None)
        for net in nets:
            max_prefix = 30 if net.version == 4 else 126
            if net.prefixlen > max_prefix:
                raise StateError(f"subnet {net} is too small; use /{max_prefix} or wider")
        if not isinstance(self.listen_port, int) or not 1 <= self.listen_port <= 65535:
            raise StateError(f"listen port must be from 1 to 65535, not {self.listen_port!r}")
        self.endpoint = normalize_endpoint(str(self.endpoint), self.listen_port)
        _check_metrics(self)
        for name in (self.interface, self.egress):
            if name is not None and not _IFNAME.fullmatch(str(name)):
                raise StateError(f"bad interface name {name!r}: 1-15 of A-Z a-z 0-9 _ . -")
        if not isinstance(self.mtu, int) or not 1280 <= self.mtu <= 9000:
            raise StateError(f"MTU must be from 1280 to 9000, not {self.mtu!r}")
        try:
            self.dns = [ipaddress.ip_address(d) for d in self.dns]
        except ValueError as exc:
            raise StateError(f"bad DNS server: {exc}") from None
        try:
            self.routes = [ipaddress.ip_network(r) for r in self.routes]
        except ValueError as exc:
            raise StateError(f"bad route: {exc}") from None
        self.allow_peer_to_peer = bool(self.allow_peer_to_peer)
        if not isinstance(self.expiry_warning, int) or not 0 <= self.expiry_warning <= 10**9:
            raise StateError(f"expiry warning must be 0 or more seconds, not"
                             f" {self.expiry_warning!r}")
        self.ha = _check_ha(self.ha)
        if self.private_key_file is not None and not os.path.isabs(str(self.private_key_file)):
            raise StateError(f"private key file {self.private_key_file!r}: give an absolute"
                             " path")
        if (not isinstance(self.under_load_threshold, int)
                or isinstance(self.under_load_threshold, bool)
                or not 1 <= self.under_load_threshold <= 1_000_000):
            raise StateError(f"under-load threshold must be from 1 to 1000000 handshakes a "
                             f"second, not {self.under_load_threshold!r}")
        if self.workers != "auto" and (not isinstance(self.workers, int)
                                       or isinstance(self.workers, bool)
                                       or not 1 <= self.workers <= 64):
            raise StateError(f"workers must be from 1 to 64, or auto, not {self.workers!r}")
        if self.registry is not None and not is_url(self.registry):
            raise StateError("registry: give a postgresql:// URL (or leave it out for the"
                             " SQLite file in the state directory)")  # not echoed: a secret?

    @property
    def address(self) -> IPv4Interface | IPv6Interface:
        """The hub's inner address: the subnet's first host, with the subnet's prefix."""
        return ipaddress.ip_interface(f"{self.subnet.network_address + 1}/{self.subnet.prefixlen}")

    @property
    def subnets(self) -> list:
        return [self.subnet, *([self.subnet6] if self.subnet6 else [])]

    @property
    def addresses(self) -> list:
        """The hub's inner address in each subnet."""
        return [ipaddress.ip_interface(f"{n.network_address + 1}/{n.prefixlen}")
                for n in self.subnets]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["subnet"] = str(self.subnet)
        if self.subnet6:
            d["subnet6"] = str(self.subnet6)
        else:
            del d["subnet6"]
        # hub.json stays as it was when these are unset
        for optional in ("metrics", "metrics_token_file", "ha", "private_key_file",
                         "registry"):
            if d[optional] is None:
                del d[optional]
        d["dns"] = [str(x) for x in self.dns]
        d["routes"] = [str(x) for x in self.routes]
        if self.under_load_threshold == DEFAULT_UNDER_LOAD:
            del d["under_load_threshold"]  # unchanged: the file stays what older hubs read
        if self.expiry_warning == DEFAULT_EXPIRY_WARNING:
            del d["expiry_warning"]
        if self.workers == 1:
            del d["workers"]
        return json.dumps({"version": SETTINGS_VERSION, **d}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = SETTINGS_FILE) -> "HubSettings":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise StateError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise StateError(f"{where} must hold a JSON object")
        version = d.pop("version", SETTINGS_VERSION)
        if version != SETTINGS_VERSION:
            raise StateError(f"{where} has version {version!r}; this pytun reads"
                             f" {SETTINGS_VERSION}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise StateError(f"{where}: unknown setting {unknown[0]!r}")
        missing = [k for k in ("subnet", "endpoint") if k not in d]
        if missing:
            raise StateError(f"{where}: missing setting {missing[0]!r}")
        try:
            return cls(**d)
        except StateError as exc:
            raise StateError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise StateError(f"{where}: {exc}") from None


def load_settings(state_dir: str) -> HubSettings:
    path = settings_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise StateError(f"no hub state in {state_dir}; run pytun-admin init first") from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    return HubSettings.from_json(text, path)


def save_settings(state_dir: str, settings: HubSettings) -> None:
    """Replace hub.json atomically (write a temporary file, then rename)."""
    files.write_atomic(settings_path(state_dir), settings.to_json())


def init_state(state_dir: str, settings: HubSettings, *, private_key: bytes | None = None,
               default_rules: bool = True) -> str:
    """Create the state directory, the hub key pair and an empty registry. With
    `settings.private_key_file` the key is that file's (which must exist, mode 0600), and
    none is written here: a second hub of a hot-standby pair.

    Returns the hub's public key (base64). Refuses a directory that already holds state.
    """
    if settings.private_key_file:
        private_key = read_key_file(str(settings.private_key_file))
    for name in (SETTINGS_FILE, PRIVATE_KEY_FILE, REGISTRY_FILE):
        if os.path.exists(os.path.join(state_dir, name)):
            raise StateError(f"{state_dir} is already initialised; refusing to overwrite"
                             f" ({name} exists)")
    created: list[str] = []
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        os.chmod(state_dir, 0o700)
        private = private_key if private_key is not None else keys.generate_private()
        if not settings.private_key_file:
            created.append(private_key_path(state_dir))
            keys.write_secret_file(created[-1], keys.encode_key(private) + "\n")
        if not settings.registry:
            created += [registry_path(state_dir) + suffix for suffix in ("", "-wal", "-shm")]
        with open_hub_registry(state_dir, settings, create=True) as registry:
            if default_rules:
                registry.ensure_default_rules(policy.default_rules(settings))
        save_settings(state_dir, settings)
    except (OSError, RegistryError) as exc:
        for path in created:  # leave no half-made state that would block the next init
            if os.path.exists(path):
                os.unlink(path)
        if isinstance(exc, RegistryError):
            raise StateError(str(exc)) from None
        raise StateError(f"cannot write {exc.filename or state_dir}: {exc.strerror}") from None
    return keys.encode_key(keys.public_from_private(private))


def key_path(state_dir: str, settings: HubSettings | None = None) -> str:
    """Where the hub's private key is: the file hub.json names, else private.key."""
    if settings is None:
        try:
            settings = load_settings(state_dir)
        except StateError:
            settings = None
    if settings is not None and settings.private_key_file:
        return str(settings.private_key_file)
    return private_key_path(state_dir)


def read_key_file(path: str, what: str = "hub private key") -> bytes:
    """A private key from a file no one else may read."""
    try:
        text = files.read_private(path)
    except files.ExposedFile as exc:
        raise StateError(str(exc)) from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return keys.parse_private(text, what)
    except keys.BadKey as exc:
        raise StateError(f"{path}: {exc}") from None


def load_private_key(state_dir: str) -> bytes:
    """The hub's private key. Refuses a key file that others could read."""
    path = key_path(state_dir)
    if path == private_key_path(state_dir) and not os.path.exists(path):
        raise StateError(f"no hub private key in {state_dir}; run pytun-admin init first")
    return read_key_file(path)


def public_key(state_dir: str) -> str:
    """The hub's public key, base64."""
    return keys.encode_key(keys.public_from_private(load_private_key(state_dir)))
