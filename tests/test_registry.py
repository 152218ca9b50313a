"""The peer registry (SQLite, and PostgreSQL where a throwaway cluster can run: the tests that
take `reg` or `registry_location` run against both) and the hub's state directory."""

import ipaddress
import json
import os
import sqlite3
import stat
import time

import pytest

from pytun.common import keys
from pytun.server import state
from pytun.server.registry import (SCHEMA_VERSION, Peer, RegistryError, SqliteRegistry, check_name,
                                   open_registry)

SUBNET = ipaddress.ip_network("10.77.0.0/24")
HUB = {ipaddress.ip_address("10.77.0.1")}


def pub(i: int) -> str:
    return keys.encode_key(keys.public_from_private(keys.generate_private(bytes([i]) * 32)))


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def reg(registry_location):
    r = open_registry(registry_location, create=True)
    yield r
    r.close()


def peer(name, i, addr, **kw) -> Peer:
    return Peer(name=name, public_key=pub(i), address=addr, **kw)


def dump(reg) -> list:
    return [(p.name, p.public_key, str(p.address), p.disabled) for p in reg.list()]


def test_add_get_list_round_trip(reg):
    psk = keys.encode_key(bytes(32))
    reg.add(peer("alice", 1, "10.77.0.2", sites=["192.168.5.0/24"], full_tunnel=True,
                 keepalive=25, preshared_key=psk), subnet=SUBNET, reserved=HUB)
    reg.add(peer("bob@laptop", 2, "10.77.0.3/32"))
    a = reg.get("alice")
    assert a.address == ipaddress.ip_interface("10.77.0.2/32")
    assert a.sites == [ipaddress.ip_network("192.168.5.0/24")]
    assert (a.full_tunnel, a.keepalive, a.disabled, a.preshared_key) == (True, 25, False, psk)
    assert a.endpoint is None and a.last_handshake is None and a.created > 0
    assert [p.name for p in reg.list()] == ["alice", "bob@laptop"]
    assert psk not in repr(a) and "preshared_key" not in repr(a)


def test_file_modes(tmp_path):
    path = tmp_path / "registry.db"
    r = SqliteRegistry(str(path))
    r.add(peer("alice", 1, "10.77.0.2"))
    assert mode(path) == 0o600
    for side in ("-wal", "-shm"):
        if os.path.exists(f"{path}{side}"):
            assert mode(f"{path}{side}") == 0o600
    assert r._read("PRAGMA journal_mode") == [("wal",)]
    assert r._read("PRAGMA synchronous") == [(2,)]  # FULL
    assert r._read("PRAGMA busy_timeout") == [(5000,)]
    assert r._read("PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(2,)]
    r.close()


@pytest.mark.parametrize("bad,fragment", [
    (lambda: peer("alice", 9, "10.77.0.9"), "a peer named 'alice' already exists"),
    (lambda: peer("carol", 1, "10.77.0.9"), "public key already belongs to peer 'alice'"),
    (lambda: peer("carol", 9, "10.77.0.2"), "address 10.77.0.2 is already used by peer 'alice'"),
    (lambda: peer("carol", 9, "10.78.0.9"), "outside the subnet 10.77.0.0/24"),
    (lambda: peer("carol", 9, "10.77.0.0"), "not a host address"),
    (lambda: peer("carol", 9, "10.77.0.255"), "not a host address"),
    (lambda: peer("carol", 9, "10.77.0.1"), "reserved for the hub"),
    (lambda: peer("carol", 9, "10.77.0.9", sites=["10.77.0.128/25"]), "overlaps the hub subnet"),
    (lambda: peer("carol", 9, "10.77.0.9", sites=["192.168.0.0/16"]), "overlaps site 192.168.5.0/24 of peer 'alice'"),
])
def test_add_refusals_leave_registry_unchanged(reg, bad, fragment):
    reg.add(peer("alice", 1, "10.77.0.2", sites=["192.168.5.0/24"]))
    before = dump(reg)
    token = reg.change_token()
    with pytest.raises(RegistryError, match=fragment):
        reg.add(bad(), subnet=SUBNET, reserved=HUB)
    assert dump(reg) == before
    assert reg.change_token() == token


@pytest.mark.parametrize("kw,fragment", [
    ({"name": ""}, "bad peer name"),
    ({"name": "a" * 33}, "bad peer name"),
    ({"name": "has space"}, "bad peer name"),
    ({"name": "semi;colon"}, "bad peer name"),
    ({"public_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, "low-order"),
    ({"public_key": "short"}, "44 characters"),
    ({"address": "10.77.0.0/24"}, "must be a single address"),
    ({"address": "nonsense"}, "not an IP address"),
    ({"sites": ["192.168.1.1/24"]}, "bad site"),
    ({"keepalive": -1}, "keepalive"),
    ({"preshared_key": "x"}, "preshared key"),
])
def test_peer_validation(kw, fragment):
    fields = {"name": "ok", "public_key": pub(1), "address": "10.77.0.2", **kw}
    with pytest.raises(RegistryError, match=fragment):
        Peer(**fields)


def test_names():
    for good in ("a", "alice.smith@example.com", "A-1_b", "x" * 32):
        assert check_name(good) == good


def test_remove_disable_unknown(reg):
    reg.add(peer("alice", 1, "10.77.0.2"))
    reg.set_disabled("alice", True)
    assert reg.get("alice").disabled is True
    reg.set_disabled("alice", False)
    assert reg.get("alice").disabled is False
    for op in (lambda: reg.remove("bob"), lambda: reg.set_disabled("bob", True), lambda: reg.get("bob"),
               lambda: reg.record_endpoint("bob", "1.2.3.4:5", 1)):
        with pytest.raises(RegistryError, match="no peer named.* 'bob'"):
            op()
    assert reg.remove("alice").name == "alice"
    assert reg.list() == []


def test_allocate_lowest_free(reg):
    assert str(reg.allocate_address(SUBNET, HUB)) == "10.77.0.2/32"
    reg.add(peer("a", 1, "10.77.0.2"))
    reg.add(peer("c", 3, "10.77.0.4"))
    assert str(reg.allocate_address(SUBNET, HUB)) == "10.77.0.3/32"
    reg.add(peer("b", 2, "10.77.0.3"))
    assert str(reg.allocate_address(SUBNET, HUB)) == "10.77.0.5/32"
    reg.remove("a")
    assert str(reg.allocate_address(SUBNET, HUB)) == "10.77.0.2/32"
    # the hub's first-host address is never handed out, even when not listed as reserved
    assert str(reg.allocate_address(ipaddress.ip_network("10.9.0.0/24"))) == "10.9.0.2/32"


def test_allocate_full_subnet(reg):
    small = ipaddress.ip_network("10.77.0.0/30")  # .0 network, .1 hub, .2 the only peer, .3 broadcast
    assert str(reg.allocate_address(small)) == "10.77.0.2/32"
    reg.add(peer("only", 1, "10.77.0.2"), subnet=small)
    with pytest.raises(RegistryError, match=r"^subnet 10.77.0.0/30 is full$"):
        reg.allocate_address(small)


def test_allocate_ipv6(reg):
    v6 = ipaddress.ip_network("fd77::/64")
    assert str(reg.allocate_address(v6)) == "fd77::2/128"
    reg.add(peer("a", 1, "fd77::2"), subnet=v6)
    assert str(reg.allocate_address(v6)) == "fd77::3/128"


def changed(reg, token, within: float = 1.0):
    """reg's change token once it differs from `token`, polled for at most `within` s."""
    deadline = time.monotonic() + within
    while (now := reg.change_token()) == token:
        assert time.monotonic() < deadline, "the change token did not move"
        time.sleep(0.001)
    return now


def test_change_token_sees_other_connections(registry_location):
    hub = open_registry(registry_location, create=True)
    admin = open_registry(registry_location)
    t0 = hub.change_token()
    assert hub.change_token() == t0
    admin.add(peer("alice", 1, "10.77.0.2"))
    t1 = changed(hub, t0)  # PostgreSQL: the notification is on its way, within a second
    assert [p.name for p in hub.list()] == ["alice"]
    admin.set_disabled("alice", True)
    t2 = changed(hub, t1)
    hub.add(peer("bob", 2, "10.77.0.3"))  # its own commits count too
    assert hub.change_token() != t2
    t3 = hub.change_token()
    hub.record_endpoint("alice", "198.51.100.7:4000", 1700000000)  # but not its endpoint notes
    assert hub.change_token() == t3
    hub.close()
    admin.close()


def test_record_endpoint_by_name_or_key(reg):
    reg.add(peer("alice", 1, "10.77.0.2"))
    reg.record_endpoint("alice", "198.51.100.7:4000", 1700000000)
    a = reg.get("alice")
    assert (a.endpoint, a.last_handshake) == ("198.51.100.7:4000", 1700000000)
    reg.record_endpoint(pub(1), "[2001:db8::1]:5", 1700000100)
    assert reg.get("alice").endpoint == "[2001:db8::1]:5"


def test_refuses_newer_schema_and_garbage(tmp_path):
    path = tmp_path / "registry.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(RegistryError, match="schema version 99"):
        SqliteRegistry(str(path))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="junk.db"):
        SqliteRegistry(str(junk))
    with pytest.raises(RegistryError, match="does not exist"):
        SqliteRegistry(str(tmp_path / "absent.db"), create=False)
    assert not (tmp_path / "absent.db").exists()


# ---------------------------------------------------------------------------------- state dir


def test_resolve_state_dir(monkeypatch):
    monkeypatch.delenv("PYTUN_STATE_DIR", raising=False)
    assert state.resolve_state_dir(None) == "/var/lib/pytun"
    monkeypatch.setenv("PYTUN_STATE_DIR", "/srv/p")
    assert state.resolve_state_dir(None) == "/srv/p"
    assert state.resolve_state_dir("/x") == "/x"


def test_init_state(tmp_path):
    d = str(tmp_path / "hub")
    s = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com", dns=["10.77.0.1"],
                          routes=["192.168.10.0/24"])
    public = state.init_state(d, s)
    assert mode(d) == 0o700
    assert mode(state.private_key_path(d)) == 0o600
    assert mode(state.registry_path(d)) == 0o600
    assert keys.encode_key(keys.public_from_private(state.load_private_key(d))) == public == state.public_key(d)
    loaded = state.load_settings(d)
    assert loaded == s
    assert loaded.endpoint == "vpn.example.com:51820"
    assert str(loaded.address) == "10.77.0.1/24"
    assert json.loads(open(state.settings_path(d)).read())["subnet"] == "10.77.0.0/24"
    key_before = open(state.private_key_path(d)).read()
    with pytest.raises(state.StateError, match="already initialised; refusing to overwrite"):
        state.init_state(d, s)
    assert open(state.private_key_path(d)).read() == key_before


def test_settings_validation():
    assert state.HubSettings(subnet="fd77::/64", endpoint="[2001:db8::1]").endpoint == "[2001:db8::1]:51820"
    assert state.HubSettings(subnet="10.0.0.0/8", endpoint="2001:db8::1", listen_port=4000).endpoint \
        == "[2001:db8::1]:4000"
    assert state.HubSettings(subnet="10.0.0.0/8", endpoint="h.example:443").endpoint == "h.example:443"
    for kw, fragment in [
        ({"subnet": "10.77.0.5/24"}, "host bits set"),
        ({"subnet": "10.77.0.0/31"}, "too small"),
        ({"subnet": "nope"}, "bad subnet"),
        ({"endpoint": "bad host!"}, "not a host name"),
        ({"endpoint": "h.example:99999"}, "port must be"),
        ({"listen_port": 0}, "listen port"),
        ({"mtu": 100}, "MTU"),
        ({"interface": "a" * 16}, "bad interface name"),
        ({"dns": ["x"]}, "bad DNS"),
        ({"routes": ["10.1.1.1/16"]}, "bad route"),
    ]:
        args = {"subnet": "10.77.0.0/24", "endpoint": "vpn.example.com", **kw}
        with pytest.raises(state.StateError, match=fragment):
            state.HubSettings(**args)


def test_load_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(state.StateError, match=f"no hub state in {d}; run pytun-admin init first"):
        state.load_settings(d)
    for text, fragment in [("{", "not valid JSON"), ('{"subnet": "10.0.0.0/8"}', "missing setting 'endpoint'"),
                           ('{"subnet": "10.0.0.0/8", "endpoint": "h:1", "colour": 1}', "unknown setting"),
                           ('{"subnet": "10.0.0.0/8", "endpoint": "h:1", "mtu": 5}', "MTU")]:
        open(state.settings_path(d), "w").write(text)
        with pytest.raises(state.StateError, match=fragment):
            state.load_settings(d)
    keys.write_secret_file(state.private_key_path(d), keys.encode_key(keys.generate_private()))
    os.chmod(state.private_key_path(d), 0o644)
    with pytest.raises(state.StateError, match="readable by others"):
        state.load_private_key(d)
