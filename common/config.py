"""wg-quick configuration files: parse, render, and strip to the `wg setconf` form.

The format is the one wg(8) and wg-quick(8) read:

    [Interface]
    PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
    Address = 10.77.0.2/32, fd77::2/128
    DNS = 10.77.0.1, corp.example

    [Peer]
    PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
    Endpoint = vpn.example.com:51820
    AllowedIPs = 10.77.0.0/24
    PersistentKeepalive = 25

Keys and section names are case-insensitive, `#` starts a comment, list values may be split
over several lines. Every error is a `ConfigError` whose message starts with `path:line:`.
Key values are kept as 32 raw bytes and never appear in a repr, and an error that quotes the
file (a mistyped line such as `PrivateKey yAnz...=`) shows key-like words as `<redacted>`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from ipaddress import (IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface,
                       IPv6Network)

from .endpoint import HOSTNAME, Endpoint, is_ip
from .errors import PytunError
from . import keys

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

PLACEHOLDER_PREFIX = "<the private key that goes with "

_HOSTNAME = HOSTNAME  # also what a DNS search domain must look like


class ConfigError(PytunError):
    """A config file that cannot be used. The message starts with `path:line:`."""


# A word of 16 or more base64 (or base64url) characters with upper and lower case letters and
# a digit, `+`, `/` or more than four capitals: a key, a piece of one, or a secret pasted into
# the wrong line. Host names, addresses and the config's own words (PersistentKeepalive) are not.
_KEY_LIKE = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/_=-])")
REDACTED = "<redacted>"


def _key_like(word: str) -> bool:
    upper = sum(c.isupper() for c in word)
    return (upper > 0 and any(c.islower() for c in word)
            and (upper > 4 or any(c.isdigit() or c in "+/" for c in word)))


def redact(text: str) -> str:
    """`text` with every key-like word replaced by `<redacted>`, for messages that quote input."""
    return _KEY_LIKE.sub(lambda m: REDACTED if _key_like(m.group(0)) else m.group(0), text)


@dataclass
class InterfaceConfig:
    private_key: bytes | None = field(default=None, repr=False)
    addresses: list[IPInterface] = field(default_factory=list)
    dns: list[IPAddress] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    mtu: int | None = None
    listen_port: int | None = None
    fwmark: int | None = None
    table: str | None = None
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool = False


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: tuple[str, int] | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)
    persistent_keepalive: int = 0
    # `# pytun-endpoint = HOST:PORT` lines: where pytun-client tries next when the hub stops
    # answering. A comment, so every WireGuard app still reads the file.
    alternate_endpoints: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class WgConfig:
    interface: InterfaceConfig
    peers: list[PeerConfig] = field(default_factory=list)


# ---------------------------------------------------------------------------------- values


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` or `[v6]:port` -> Endpoint(host, port). ValueError with a readable reason."""
    return Endpoint.parse(text)


def format_endpoint(endpoint: tuple[str, int]) -> str:
    return str(Endpoint(*endpoint))


def placeholder_for(public_key: bytes) -> str:
    """The PrivateKey value add-peer writes when the laptop keeps its own private key."""
    return f"{PLACEHOLDER_PREFIX}{keys.encode_key(public_key)}>"


def _is_ip(text: str) -> bool:
    return is_ip(text)


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _int(value: str, what: str, low: int, high: int) -> int:
    try:
        n = int(value, 0)
    except ValueError:
        raise ValueError(f"{what} must be a number, not {value!r}") from None
    if not low <= n <= high:
        raise ValueError(f"{what} must be from {low} to {high}, not {n}")
    return n


# ---------------------------------------------------------------------------------- parse


class _Placeholder(ValueError):
    """add-peer's PrivateKey placeholder, whose message names the (public) key to use."""


def _set_interface(iface: InterfaceConfig, key: str, value: str) -> None:
    if key == "privatekey":
        if value.startswith("<") and value.endswith(">"):
            raise _Placeholder(
                f"PrivateKey is a placeholder: {value}; replace it with the laptop's own "
                "private key (the one `wg pubkey` turns into the public key the hub knows)"
            )
        iface.private_key = keys.parse_private(value, "PrivateKey")
    elif key == "address":
        for item in _split_list(value):
            try:
                iface.addresses.append(ipaddress.ip_interface(item))
            except ValueError:
                raise ValueError(f"Address {item!r} is not an IP address with optional"
                                 " /prefix") from None
    elif key == "dns":
        for item in _split_list(value):
            if _is_ip(item):
                iface.dns.append(ipaddress.ip_address(item))
            elif _HOSTNAME.fullmatch(item):
                iface.dns_search.append(item)
            else:
                raise ValueError(f"DNS {item!r} is neither an IP address nor a search domain")
    elif key == "mtu":
        iface.mtu = _int(value, "MTU", 576, 65535)
    elif key == "listenport":
        iface.listen_port = _int(value, "ListenPort", 0, 65535)
    elif key == "fwmark":
        iface.fwmark = 0 if value.lower() == "off" else _int(value, "FwMark", 0, 0xFFFFFFFF)
    elif key == "table":
        if (value.lower() not in ("off", "auto") and not value.isdigit()
                and not re.fullmatch(r"\w+", value)):
            raise ValueError(f"Table must be off, auto, a number or a table name, not {value!r}")
        iface.table = value
    elif key in _HOOKS:
        getattr(iface, _HOOKS[key]).append(value)
    elif key == "saveconfig":
        if value.lower() not in ("true", "false"):
            raise ValueError(f"SaveConfig must be true or false, not {value!r}")
        iface.save_config = value.lower() == "true"
    else:
        raise KeyError(key)


def _set_peer(peer: dict[str, Any], key: str, value: str) -> None:
    if key == "publickey":
        peer["public_key"] = keys.parse_public(value, "PublicKey")
    elif key == "presharedkey":
        peer["preshared_key"] = keys.parse_psk(value, "PresharedKey")
    elif key == "endpoint":
        peer["endpoint"] = parse_endpoint(value)
    elif key == "allowedips":
        for item in _split_list(value):
            try:
                peer["allowed_ips"].append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"AllowedIPs {item!r} is not an IP network") from None
    elif key == "persistentkeepalive":
        peer["persistent_keepalive"] = (0 if value.lower() == "off"
                                        else _int(value, "PersistentKeepalive", 0, 65535))
    else:
        raise KeyError(key)


_ALTERNATE = re.compile(r"#\s*pytun-endpoint\s*=\s*(\S+)", re.I)
_HOOKS = {"preup": "pre_up", "postup": "post_up", "predown": "pre_down", "postdown": "post_down"}
_SINGLE = {"privatekey", "mtu", "listenport", "fwmark", "table", "saveconfig",
           "publickey", "presharedkey", "endpoint", "persistentkeepalive"}


def parse(text: str, path: str = "<config>", *, require_private_key: bool = True) -> WgConfig:
    """Parse wg-quick text. `path` only names the source in error messages."""
    iface: InterfaceConfig | None = None
    iface_line = 0
    peers: list[tuple[int, dict[str, Any]]] = []
    section: str | None = None
    seen: dict[str, int] = {}

    def fail(lineno: int, msg: str, *, quotes_input: bool = True) -> ConfigError:
        return ConfigError(f"{path}:{lineno}: {redact(msg) if quotes_input else msg}")

    for lineno, raw in enumerate(text.splitlines(), 1):
        if m := _ALTERNATE.fullmatch(raw.strip()):
            if section != "peer":
                raise fail(lineno, "pytun-endpoint belongs in a [Peer] section")
            try:
                peers[-1][1].setdefault("alternate_endpoints", []).append(
                    parse_endpoint(m.group(1)))
            except ValueError as exc:
                raise fail(lineno, f"pytun-endpoint: {exc}") from None
            continue
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            name = line.lower()
            if name == "[interface]":
                if iface is not None:
                    raise fail(lineno, "a second [Interface] section (the first is at line"
                                       f" {iface_line})")
                iface, iface_line, section = InterfaceConfig(), lineno, "interface"
            elif name == "[peer]":
                peers.append((lineno, {"allowed_ips": []}))
                section = "peer"
            else:
                raise fail(lineno, f"unknown section {line}; expected [Interface] or [Peer]")
            seen = {}
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise fail(lineno, f"expected `Key = value`, got {redact(line)[:60]!r}")
        if section is None:
            raise fail(lineno, f"{key} appears before any [Interface] or [Peer] section")
        lkey = key.lower()
        if lkey in _SINGLE and lkey in seen:
            raise fail(lineno, f"{key} given twice in one section (first at line {seen[lkey]})")
        seen[lkey] = lineno
        try:
            if section == "interface":
                assert iface is not None  # section "interface" made it
                _set_interface(iface, lkey, value)
            else:
                _set_peer(peers[-1][1], lkey, value)
        except KeyError:
            where = "[Interface]" if section == "interface" else "[Peer]"
            raise fail(lineno, f"unknown key {key!r} in {where}") from None
        except _Placeholder as exc:  # quotes a public key, which the operator needs to see
            raise fail(lineno, str(exc), quotes_input=False) from None
        except ValueError as exc:  # keys.BadKey is a ValueError too
            raise fail(lineno, str(exc)) from None

    if iface is None:
        raise fail(1, "no [Interface] section")
    if require_private_key and iface.private_key is None:
        raise fail(iface_line, "missing PrivateKey in [Interface]")
    result = WgConfig(interface=iface)
    first_seen: dict[bytes, int] = {}
    for lineno, fields in peers:
        if "public_key" not in fields:
            raise fail(lineno, "[Peer] without a PublicKey")
        pk = fields["public_key"]
        if pk in first_seen:
            raise fail(lineno, f"the same PublicKey is already a [Peer] at line {first_seen[pk]}")
        first_seen[pk] = lineno
        result.peers.append(PeerConfig(**fields))
    return result


def read_text(path: str) -> str:
    """The file's text; ConfigError (with the path) when it cannot be read or is not text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}:1: not a text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load(path: str, *, require_private_key: bool = True) -> WgConfig:
    return parse(read_text(path), path, require_private_key=require_private_key)


# ---------------------------------------------------------------------------------- render


def render(config: WgConfig, *, placeholder_public_key: bytes | None = None) -> str:
    """wg-quick text for `config`.

    With no private key, `placeholder_public_key` writes a placeholder PrivateKey line that
    `parse` refuses with a clear message (the laptop owner fills in their own key).
    """
    return _render(config, wg_quick=True, placeholder_public_key=placeholder_public_key)


def strip(config: WgConfig | str) -> str:
    """The `wg setconf` form, as `wg-quick strip` gives it: no Address, DNS, MTU, Table,
    Pre/Post hooks or SaveConfig."""
    if isinstance(config, str):
        config = parse(config, require_private_key=False)
    return _render(config, wg_quick=False, placeholder_public_key=None)


def _render(config: WgConfig, *, wg_quick: bool, placeholder_public_key: bytes | None) -> str:
    i = config.interface
    out = ["[Interface]"]
    if i.private_key is not None:
        out.append(f"PrivateKey = {keys.encode_key(i.private_key)}")
    elif placeholder_public_key is not None:
        out.append(f"PrivateKey = {placeholder_for(placeholder_public_key)}")
    if i.listen_port is not None:
        out.append(f"ListenPort = {i.listen_port}")
    if i.fwmark is not None:
        out.append(f"FwMark = {i.fwmark:#x}" if i.fwmark else "FwMark = off")
    if wg_quick:
        if i.addresses:
            out.append("Address = " + ", ".join(str(a) for a in i.addresses))
        if i.dns or i.dns_search:
            out.append("DNS = " + ", ".join([str(d) for d in i.dns] + i.dns_search))
        if i.mtu is not None:
            out.append(f"MTU = {i.mtu}")
        if i.table is not None:
            out.append(f"Table = {i.table}")
        for key, cmds in (("PreUp", i.pre_up), ("PostUp", i.post_up),
                          ("PreDown", i.pre_down), ("PostDown", i.post_down)):
            out.extend(f"{key} = {cmd}" for cmd in cmds)
        if i.save_config:
            out.append("SaveConfig = true")
    for p in config.peers:
        out += ["", "[Peer]", f"PublicKey = {keys.encode_key(p.public_key)}"]
        if p.preshared_key is not None:
            out.append(f"PresharedKey = {keys.encode_key(p.preshared_key)}")
        if p.endpoint is not None:
            out.append(f"Endpoint = {format_endpoint(p.endpoint)}")
        if wg_quick:
            out.extend(f"# pytun-endpoint = {format_endpoint(e)}" for e in p.alternate_endpoints)
        if p.allowed_ips:
            out.append("AllowedIPs = " + ", ".join(str(n) for n in p.allowed_ips))
        if p.persistent_keepalive:
            out.append(f"PersistentKeepalive = {p.persistent_keepalive}")
    return "\n".join(out) + "\n"
