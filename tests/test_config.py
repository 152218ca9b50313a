"""wg-quick config files: parse, render, strip, and one clear error (with its line) per mistake."""

import ipaddress

import pytest

from .conftest import require_tools
from .hubnet import start_wireguard_go
from .netns import topology  # noqa: F401 (fixture)

from pytun.common import config, keys
from pytun.common.config import ConfigError

PRIV = keys.generate_private(bytes(range(32)))
PUB = keys.public_from_private(PRIV)
HUB = keys.public_from_private(keys.generate_private(bytes(range(1, 33))))
PSK = bytes(range(100, 132))
B = keys.encode_key

FULL = f"""\
# laptop config
[Interface]
PrivateKey = {B(PRIV)}
Address = 10.77.0.2/32, fd77::2/128
Address = 10.78.0.2/32
DNS = 10.77.0.1, 2001:db8::53, corp.example
MTU = 1380
ListenPort = 51000
FwMark = 0x1234
Table = off
PreUp = echo pre up
PostUp = echo "post up"
PreDown = true
PostDown = false
SaveConfig = false

[Peer]   # the hub
PublicKey = {B(HUB)}
PresharedKey = {B(PSK)}
Endpoint = vpn.example.com:51820
AllowedIPs = 10.77.0.0/24, 192.168.10.0/24
AllowedIPs = fd77::/64
PersistentKeepalive = 25

[peer]
publickey = {B(PUB)}
endpoint = [2001:db8::1]:4000
persistentkeepalive = off
"""


def test_parse_everything():
    c = config.parse(FULL, "full.conf")
    i = c.interface
    assert i.private_key == PRIV
    assert i.addresses == [ipaddress.ip_interface(a) for a in ("10.77.0.2/32", "fd77::2/128", "10.78.0.2/32")]
    assert i.dns == [ipaddress.ip_address("10.77.0.1"), ipaddress.ip_address("2001:db8::53")]
    assert i.dns_search == ["corp.example"]
    assert (i.mtu, i.listen_port, i.fwmark, i.table) == (1380, 51000, 0x1234, "off")
    assert i.pre_up == ["echo pre up"] and i.post_up == ['echo "post up"']
    assert i.pre_down == ["true"] and i.post_down == ["false"] and i.save_config is False
    hub, other = c.peers
    assert hub.public_key == HUB and hub.preshared_key == PSK
    assert hub.endpoint == ("vpn.example.com", 51820)
    assert [str(n) for n in hub.allowed_ips] == ["10.77.0.0/24", "192.168.10.0/24", "fd77::/64"]
    assert hub.persistent_keepalive == 25
    assert other.endpoint == ("2001:db8::1", 4000) and other.persistent_keepalive == 0


def test_repr_hides_secrets():
    c = config.parse(FULL)
    text = repr(c)
    assert B(PRIV) not in text and str(PRIV) not in text and str(PSK) not in text
    assert "private_key" not in text and "preshared_key" not in text


def test_render_round_trip():
    c = config.parse(FULL)
    again = config.parse(config.render(c))
    assert again == c
    assert config.render(again) == config.render(c)


def test_render_minimal_shape():
    c = config.WgConfig(
        interface=config.InterfaceConfig(private_key=PRIV, addresses=[ipaddress.ip_interface("10.77.0.2/32")]),
        peers=[config.PeerConfig(public_key=HUB, endpoint=("vpn.example.com", 51820),
                                 allowed_ips=[ipaddress.ip_network("10.77.0.0/24")], persistent_keepalive=25)])
    assert config.render(c) == (
        f"[Interface]\nPrivateKey = {B(PRIV)}\nAddress = 10.77.0.2/32\n\n"
        f"[Peer]\nPublicKey = {B(HUB)}\nEndpoint = vpn.example.com:51820\n"
        "AllowedIPs = 10.77.0.0/24\nPersistentKeepalive = 25\n")


def test_strip_drops_wg_quick_keys():
    out = config.strip(FULL)
    for gone in ("Address", "DNS", "MTU", "Table", "PreUp", "PostUp", "PreDown", "PostDown", "SaveConfig"):
        assert gone not in out
    assert f"PrivateKey = {B(PRIV)}" in out and "ListenPort = 51000" in out and "FwMark = 0x1234" in out
    assert "Endpoint = [2001:db8::1]:4000" in out
    assert config.strip(config.parse(FULL)) == out
    stripped = config.parse(out)
    assert stripped.peers == config.parse(FULL).peers


def test_placeholder_is_refused_clearly():
    text = config.render(config.parse(FULL).__class__(
        interface=config.InterfaceConfig(addresses=[ipaddress.ip_interface("10.77.0.3/32")]),
        peers=[config.PeerConfig(public_key=HUB, allowed_ips=[ipaddress.ip_network("10.77.0.0/24")])]),
        placeholder_public_key=PUB)
    assert f"PrivateKey = <the private key that goes with {B(PUB)}>" in text
    with pytest.raises(ConfigError, match=r"^laptop.conf:2: PrivateKey is a placeholder: "):
        config.parse(text, "laptop.conf")


def test_case_insensitive_keys_and_sections():
    c = config.parse(f"[INTERFACE]\nprivatekey={B(PRIV)}\nADDRESS=10.1.0.2\n[Peer]\nPUBLICKEY = {B(HUB)}\n")
    assert c.interface.addresses == [ipaddress.ip_interface("10.1.0.2/32")]
    assert c.peers[0].public_key == HUB


def _err(body: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(body, "t.conf")
    msg = str(info.value)
    assert msg.startswith(f"t.conf:{line}: "), msg
    assert fragment in msg, msg
    assert "\n" not in msg


LOW = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
IF = f"[Interface]\nPrivateKey = {B(PRIV)}\n"


@pytest.mark.parametrize("body,line,fragment", [
    (IF + "Colour = blue\n", 3, "unknown key 'Colour' in [Interface]"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nListenPort = 5\n", 5, "unknown key 'ListenPort' in [Peer]"),
    ("[Interface]\nPrivateKey = nope\n", 2, "PrivateKey must be 44 characters"),
    ("[Interface]\nPrivateKey = " + "!" * 43 + "=\n", 2, "not valid base64"),
    (IF + "Address = 10.77.0.300/32\n", 3, "Address '10.77.0.300/32'"),
    (IF + "Address = 10.77.0.2/33\n", 3, "Address"),
    (IF + "DNS = 1.1.1.1, bad domain!\n", 3, "DNS 'bad domain!'"),
    (IF + "MTU = big\n", 3, "MTU must be a number"),
    (IF + "MTU = 100\n", 3, "MTU must be from 576"),
    (IF + "ListenPort = 70000\n", 3, "ListenPort must be from 0 to 65535"),
    (IF + "SaveConfig = maybe\n", 3, "SaveConfig must be true or false"),
    (IF + "\n# c\nnot a key value\n", 5, "expected `Key = value`"),
    ("PrivateKey = " + B(PRIV) + "\n", 1, "before any [Interface]"),
    (IF + "[Peers]\n", 3, "unknown section [Peers]"),
    (IF + "[Interface]\n", 3, "a second [Interface] section (the first is at line 1)"),
    (IF + "PrivateKey = " + B(PRIV) + "\n", 3, "PrivateKey given twice"),
    ("# nothing\n[Interface]\nAddress = 10.0.0.2\n", 2, "missing PrivateKey"),
    ("", 1, "no [Interface] section"),
    (IF + "[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "[Peer] without a PublicKey"),
    (IF + "[Peer]\nPublicKey = " + LOW + "\n", 4, "low-order"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nPresharedKey = abc\n", 5, "PresharedKey must be 44"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nEndpoint = vpn.example.com\n", 5, "host:port"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nEndpoint = 1.2.3.4:0\n", 5, "port must be a number from 1"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nEndpoint = 2001:db8::1:51820\n", 5, "in brackets"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nEndpoint = [nope]:1\n", 5, "not an IPv6 address"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nAllowedIPs = 10.0.0.0/8, x\n", 5, "AllowedIPs 'x'"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\nPersistentKeepalive = -1\n", 5, "PersistentKeepalive"),
    (IF + "[Peer]\nPublicKey = " + B(HUB) + "\n[Peer]\nPublicKey = " + B(HUB) + "\n", 5, "already a [Peer] at line 3"),
])
def test_errors_name_the_line(body, line, fragment):
    _err(body, line, fragment)


def test_error_message_never_contains_a_secret():
    body = f"[Interface]\nPrivateKey = {B(PRIV)}\n[Peer]\nPublicKey = {B(HUB)}\nPresharedKey = {B(PSK)[:-2]}\n"
    with pytest.raises(ConfigError) as info:
        config.parse(body)
    assert B(PSK)[:20] not in str(info.value)


def test_optional_private_key_and_load(tmp_path):
    c = config.parse(f"[Interface]\nListenPort = 1\n[Peer]\nPublicKey = {B(HUB)}\n", require_private_key=False)
    assert c.interface.private_key is None
    p = tmp_path / "a.conf"
    p.write_text(FULL)
    assert config.load(str(p)) == config.parse(FULL)
    with pytest.raises(ConfigError, match=r"missing.conf: cannot read"):
        config.load(str(tmp_path / "missing.conf"))


def test_endpoint_helpers():
    assert config.parse_endpoint("1.2.3.4:5") == ("1.2.3.4", 5)
    assert config.format_endpoint(("fd00::1", 7)) == "[fd00::1]:7"
    assert config.format_endpoint(("host.example", 7)) == "host.example:7"


@pytest.mark.netns
def test_stock_wg_setconf_accepts_strip(tmp_path, topology):
    """The stripped form is what the real `wg setconf` reads: wireguard-go in a namespace."""
    require_tools("wg", "wireguard-go")
    ns = topology.netns("cfg")
    name, _ = start_wireguard_go(ns)
    p = tmp_path / "wg.conf"
    # A host name would make wg resolve it, and this machine has no resolver to ask.
    p.write_text(config.strip(FULL).replace("vpn.example.com", "192.0.2.7"))
    ns.run("wg", "setconf", name, str(p))
    dump = ns.run("wg", "show", name, "dump").stdout
    assert B(HUB) in dump and "192.0.2.7:51820" in dump and "192.168.10.0/24" in dump


@pytest.mark.parametrize("line", [
    f"PrivateKey {B(PRIV)}",            # the `=` forgotten
    f"PrivateKey: {B(PRIV)}",
    f"{B(PRIV)}",                      # the key alone: its own `=` makes it `Key = value`
    f"PrivateKey {B(PRIV)[:30]}",       # a piece of one
    f"Table = {B(PRIV)}",               # pasted into the wrong line
    f"Address = {B(PRIV)}",
    f"PrivateKey = {B(PRIV)}x",         # one character too many
    f"PrivateKey {B(PRIV).replace('+', '-').replace('/', '_')}",  # base64url
])
def test_a_mistyped_line_never_shows_the_key(line):
    with pytest.raises(ConfigError) as info:
        config.parse(f"[Interface]\n{line}\n", "laptop.conf")
    msg = str(info.value)
    assert msg.startswith("laptop.conf:2: "), msg
    for start in range(0, 44 - 12):
        assert B(PRIV)[start:start + 12] not in msg.replace("-", "+").replace("_", "/"), msg
    assert "<redacted>" in msg or "must be 44 characters" in msg, msg


def test_redaction_keeps_what_the_operator_needs():
    assert config.redact("expected `Key = value`, got 'PrivateKey yAnz5TF+lXXJte14tji3zlMNq+h'") \
        == "expected `Key = value`, got 'PrivateKey <redacted>'"
    for text in ("endpoint 'vpn.example.com:51820'", "Address '10.77.0.300/32'",
                 "AllowedIPs 'fd77:1234:5678::/64'", "unknown key 'PersistentKeepalives'",
                 "DNS 'corp-internal-resolvers.example'"):
        assert config.redact(text) == text
    # The placeholder names the public key the laptop's own private key must match.
    text = config.render(config.WgConfig(config.InterfaceConfig(), []), placeholder_public_key=PUB)
    with pytest.raises(ConfigError, match=B(PUB).replace("+", r"\+")):
        config.parse(text)
