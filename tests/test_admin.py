"""pytun-admin end to end, by calling main([...]) the way the console script does."""

import ipaddress
import json
import os
import stat

import pytest

from pytun.common import __version__, cli, config, control, keys
from pytun.server import admin, state

from .test_control import Server


@pytest.fixture
def hub(tmp_path, capsys):
    d = str(tmp_path / "state")
    rc = admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                     "vpn.example.com", "--dns", "10.77.0.1", "--route", "192.168.10.0/24,192.168.20.0/24"])
    assert rc == 0
    out = capsys.readouterr().out
    return d, out.strip()


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = admin.main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def peers_json(capsys, d) -> list:
    rc, out, _ = run(capsys, "list-peers", "--json", "--state-dir", d)
    assert rc == 0
    return json.loads(out)


def test_init(hub, capsys):
    d, public = hub
    keys.parse_public(public)
    assert public == state.public_key(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state.private_key_path(d)).st_mode) == 0o600
    s = state.load_settings(d)
    assert s.endpoint == "vpn.example.com:51820" and [str(r) for r in s.routes] == ["192.168.10.0/24", "192.168.20.0/24"]
    rc, out, err = run(capsys, "init", "--state-dir", d, "--subnet", "10.88.0.0/24", "--endpoint", "x")
    assert rc == 1 and out == ""
    assert err.startswith("pytun-admin: error: ") and "already initialised; refusing to overwrite" in err
    assert state.load_settings(d) == s and state.public_key(d) == public


def test_add_peer_twice_and_config_parses(hub, capsys):
    d, hub_public = hub
    rc, out, err = run(capsys, "--state-dir", d, "add-peer", "alice")
    assert rc == 0
    assert err.splitlines() == ["peer alice added at 10.77.0.2; its config is on stdout",
                                "hub not running; the change applies when it starts"]
    c = config.parse(out, "alice.conf")
    assert [str(a) for a in c.interface.addresses] == ["10.77.0.2/32"]
    assert [str(x) for x in c.interface.dns] == ["10.77.0.1"]
    (p,) = c.peers
    assert keys.encode_key(p.public_key) == hub_public
    assert p.endpoint == ("vpn.example.com", 51820)
    assert [str(n) for n in p.allowed_ips] == ["10.77.0.0/24", "192.168.10.0/24", "192.168.20.0/24"]
    assert p.persistent_keepalive == 25 and p.preshared_key is None
    rc, out2, _ = run(capsys, "add-peer", "bob", "--state-dir", d, "--full-tunnel", "--keepalive", "0", "--psk")
    c2 = config.parse(out2)
    assert [str(a) for a in c2.interface.addresses] == ["10.77.0.3/32"]
    assert [str(n) for n in c2.peers[0].allowed_ips] == ["0.0.0.0/0", "::/0"]
    assert c2.peers[0].persistent_keepalive == 0 and c2.peers[0].preshared_key is not None
    rows = peers_json(capsys, d)
    assert [(r["name"], r["address"]) for r in rows] == [("alice", "10.77.0.2/32"), ("bob", "10.77.0.3/32")]
    # the registry knows the laptop's public key, never its private key
    assert rows[0]["public_key"] == keys.encode_key(keys.public_from_private(c.interface.private_key))
    db = open(state.registry_path(d), "rb").read()
    assert keys.encode_key(c.interface.private_key).encode() not in db
    assert "preshared_key" not in json.dumps(rows)


def test_add_peer_with_public_key(hub, capsys):
    d, _ = hub
    laptop = keys.encode_key(keys.public_from_private(keys.generate_private()))
    rc, out, _ = run(capsys, "--state-dir", d, "add-peer", "carol", "--public-key", laptop,
                     "--ip", "10.77.0.50", "--site", "192.168.77.0/24")
    assert rc == 0
    assert f"PrivateKey = <the private key that goes with {laptop}>" in out
    with pytest.raises(config.ConfigError, match="PrivateKey is a placeholder"):
        config.parse(out, "carol.conf")
    (row,) = peers_json(capsys, d)
    assert row == {**row, "name": "carol", "public_key": laptop, "address": "10.77.0.50/32",
                   "sites": ["192.168.77.0/24"], "disabled": False}


def test_bad_inputs_exit_1_registry_unchanged(hub, capsys):
    d, _ = hub
    assert run(capsys, "--state-dir", d, "add-peer", "alice")[0] == 0
    before = peers_json(capsys, d)
    alice_key = before[0]["public_key"]
    cases = [
        (["add-peer", "alice"], "a peer named 'alice' already exists"),
        (["add-peer", "bob", "--public-key", alice_key], "already belongs to peer 'alice'"),
        (["add-peer", "bob", "--ip", "10.77.0.2"], "already used by peer 'alice'"),
        (["add-peer", "bob", "--ip", "10.99.0.2"], "outside the subnet 10.77.0.0/24"),
        (["add-peer", "bob", "--ip", "10.77.0.1"], "reserved for the hub"),
        (["add-peer", "bob", "--ip", "10.77.0.255"], "not a host address"),
        (["add-peer", "bob", "--ip", "banana"], "not an IP address"),
        (["add-peer", "bob", "--public-key", "abc"], "44 characters"),
        (["add-peer", "bob", "--public-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="], "low-order"),
        (["add-peer", "bad name"], "bad peer name"),
        (["add-peer", "bob", "--site", "192.168.1.1/24"], "bad site"),
        (["add-peer", "bob", "--site", "10.77.0.0/25"], "overlaps the hub subnet"),
        (["add-peer", "bob", "--keepalive", "70000"], "--keepalive"),
        (["add-peer", "bob", "-o", d], "is a directory"),
        (["add-peer", "bob", "-o", os.path.join(d, "missing", "bob.conf")], "cannot write"),
        (["remove-peer", "nobody"], "no peer named 'nobody'"),
        (["disable-peer", "nobody"], "no peer named 'nobody'"),
        (["enable-peer", "nobody"], "no peer named 'nobody'"),
    ]
    for argv, fragment in cases:
        rc, out, err = run(capsys, "--state-dir", d, *argv)
        assert rc == 1, argv
        assert err.startswith("pytun-admin: error: ") and fragment in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "PrivateKey" not in out
        assert peers_json(capsys, d) == before, argv


def test_usage_errors_exit_2(hub, capsys):
    d, _ = hub
    assert run(capsys, "--state-dir", d, "add-peer")[0] == 2
    assert run(capsys, "--state-dir", d, "add-peer", "x", "--keepalive", "soon")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2


def test_full_subnet(tmp_path, capsys):
    d = str(tmp_path / "s")
    assert run(capsys, "init", "--state-dir", d, "--subnet", "10.9.0.0/30", "--endpoint", "h.example:4000")[0] == 0
    assert run(capsys, "add-peer", "one", "--state-dir", d)[0] == 0
    rc, _, err = run(capsys, "add-peer", "two", "--state-dir", d)
    assert rc == 1 and err.strip() == "pytun-admin: error: subnet 10.9.0.0/30 is full"
    assert [r["name"] for r in peers_json(capsys, d)] == ["one"]


def test_no_state_dir(tmp_path, capsys, monkeypatch):
    d = str(tmp_path / "nothing")
    for argv in (["list-peers"], ["add-peer", "x"], ["show"], ["remove-peer", "x"]):
        rc, out, err = run(capsys, "--state-dir", d, *argv)
        assert rc == 1
        assert err.strip() == f"pytun-admin: error: no hub state in {d}; run pytun-admin init first"
    assert not os.path.exists(d)
    monkeypatch.setenv("PYTUN_STATE_DIR", d)
    assert "no hub state in " + d in run(capsys, "list-peers")[2]


def test_output_file_and_qr(hub, capsys, tmp_path):
    d, _ = hub
    target = tmp_path / "alice.conf"
    rc, out, _ = run(capsys, "--state-dir", d, "add-peer", "alice", "-o", str(target))
    assert rc == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    c = config.load(str(target))
    assert keys.encode_key(c.interface.private_key) not in out and "PrivateKey" not in out
    assert str(target) in out
    rc, out, _ = run(capsys, "--state-dir", d, "add-peer", "bob", "--qr")
    assert rc == 0 and len(out.splitlines()) > 20 and "PrivateKey" not in out


def test_remove_disable_enable(hub, capsys):
    d, _ = hub
    run(capsys, "--state-dir", d, "add-peer", "alice")
    run(capsys, "--state-dir", d, "add-peer", "bob", "--site", "192.168.5.0/24")
    assert run(capsys, "--state-dir", d, "disable-peer", "alice")[0] == 0
    assert [r["disabled"] for r in peers_json(capsys, d)] == [True, False]
    rc, out, _ = run(capsys, "--state-dir", d, "list-peers")
    assert "disabled" in out and "192.168.5.0/24" in out
    assert run(capsys, "--state-dir", d, "enable-peer", "alice")[0] == 0
    assert [r["disabled"] for r in peers_json(capsys, d)] == [False, False]
    assert run(capsys, "--state-dir", d, "remove-peer", "alice")[0] == 0
    assert [r["name"] for r in peers_json(capsys, d)] == ["bob"]
    # the freed address is handed out again
    out = run(capsys, "--state-dir", d, "add-peer", "carol")[1]
    assert "Address = 10.77.0.2/32" in out


def test_show_without_hub_falls_back(hub, capsys):
    d, _ = hub
    laptop = config.parse(run(capsys, "--state-dir", d, "add-peer", "alice")[1])
    alice_public = keys.encode_key(keys.public_from_private(laptop.interface.private_key))
    rc, out, err = run(capsys, "--state-dir", d, "show", "--json")
    assert rc == 0 and len(err.strip().splitlines()) == 1 and "hub not running" in err
    (row,) = json.loads(out)
    assert row == {"name": "alice", "public_key": alice_public, "address": "10.77.0.2/32",
                   "endpoint": None, "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0,
                   "state": "enabled", "expires": None}
    rc, out, _ = run(capsys, "--state-dir", d, "show")
    assert rc == 0 and "alice" in out and "never" in out


def test_show_and_sync_with_a_running_hub(hub, capsys):
    d, _ = hub
    seen = []

    def fake_hub(pairs):
        seen.append(pairs)
        if ("get", "1") in pairs:
            return control.get_response_pairs([{
                "name": "alice", "public_key": "k", "address": "10.77.0.2/32",
                "endpoint": "198.51.100.7:4000", "latest_handshake": 1, "rx_bytes": 2048, "tx_bytes": 5}])
        return []

    with Server(state.socket_path(d), fake_hub):
        rc, _, err = run(capsys, "--state-dir", d, "add-peer", "alice")
        assert rc == 0 and err == "peer alice added at 10.77.0.2; its config is on stdout\n"
        assert seen == [[("sync", "1")]]
        rc, out, err = run(capsys, "--state-dir", d, "show", "--json")
        assert rc == 0 and err == ""
        assert json.loads(out) == [{"name": "alice", "public_key": "k", "address": "10.77.0.2/32",
                                    "endpoint": "198.51.100.7:4000", "latest_handshake": 1,
                                    "rx_bytes": 2048, "tx_bytes": 5, "state": "enabled",
                                    "expires": None}]
        out = run(capsys, "--state-dir", d, "show")[1]
        assert "198.51.100.7:4000" in out and "2.00 KiB" in out and "5 B" in out and "ago" in out


def test_sync_refused_is_a_warning(hub, capsys):
    d, _ = hub

    def refusing(pairs):
        raise control.ControlError("cannot apply: interface gone", 5)

    with Server(state.socket_path(d), refusing):
        rc, out, err = run(capsys, "--state-dir", d, "add-peer", "alice")
    assert rc == 0 and "[Interface]" in out
    assert "warning" in err and "interface gone" in err
    assert [r["name"] for r in peers_json(capsys, d)] == ["alice"]


def test_version_and_help(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"pytun-admin {__version__}" == "pytun-admin 0.1.0"
    for sub in ("init", "add-peer", "remove-peer", "disable-peer", "enable-peer", "list-peers", "show"):
        rc, out, _ = run(capsys, sub, "--help")
        assert rc == 0 and "usage: pytun-admin " + sub in out and "--state-dir" in out


def test_human_units():
    assert cli.human_ago(None) == "never"
    assert cli.human_ago(100, now=112) == "12 seconds ago"
    assert cli.human_ago(100, now=163) == "1 minute, 3 seconds ago"
    assert cli.human_ago(100, now=100 + 86400 + 7200) == "1 day, 2 hours ago"
    assert cli.human_bytes(0) == "0 B"
    assert cli.human_bytes(1536) == "1.50 KiB"
    assert cli.human_bytes(5 * 1024**3) == "5.00 GiB"


def test_ipv6_subnet(tmp_path, capsys):
    d = str(tmp_path / "v6")
    assert run(capsys, "init", "--state-dir", d, "--subnet", "fd77::/64", "--endpoint", "2001:db8::1")[0] == 0
    out = run(capsys, "add-peer", "a", "--state-dir", d)[1]
    c = config.parse(out)
    assert c.interface.addresses == [ipaddress.ip_interface("fd77::2/128")]
    assert c.peers[0].endpoint == ("2001:db8::1", 51820)
