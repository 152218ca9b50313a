"""server/migrate.py and its pytun-admin commands: backup and restore, export, import-wg."""

import os
import sqlite3
import stat
import textwrap
import threading
import time

import pytest

from pytun.common import config, keys
from pytun.server import admin, migrate, state
from pytun.server.registry import Peer, SqliteRegistry

from .test_admin import run


def key() -> str:
    return keys.encode_key(keys.public_from_private(keys.generate_private()))


@pytest.fixture
def hub(tmp_path, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24,fd77::/64",
                       "--endpoint", "vpn.example.com", "--route", "10.20.0.0/16"]) == 0
    run(capsys, "add-peer", "alice", "--psk", "--group", "dev", "--site", "192.168.50.0/24",
        "-o", str(tmp_path / "a.conf"), "--state-dir", d)
    run(capsys, "add-peer", "bob", "-o", str(tmp_path / "b.conf"), "--state-dir", d)
    run(capsys, "disable-peer", "bob", "--state-dir", d)
    run(capsys, "access", "add", "dev", "10.20.3.0/24", "tcp/5432", "--state-dir", d)
    capsys.readouterr()
    return d


def dump(state_dir: str) -> tuple:
    with SqliteRegistry(state.registry_path(state_dir), create=False) as r:
        return ([(p.name, p.public_key, p.preshared_key, str(p.address), str(p.address6),
                  p.sites, p.groups, p.disabled) for p in r.list()],
                [r.text() for r in r.rules()], r.groups())


def test_backup_and_restore_bring_back_everything(hub, tmp_path, capsys):
    backup = tmp_path / "hub.backup"
    rc, out, err = run(capsys, "backup", str(backup), "--state-dir", hub)
    assert rc == 0 and "backup of 2 peers" in out, err
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    assert run(capsys, "backup", str(backup), "--state-dir", hub)[0] == 1  # never overwritten
    fresh = str(tmp_path / "fresh")
    rc, out, err = run(capsys, "restore", str(backup), "--state-dir", fresh)
    assert rc == 0 and "2 peers" in out, err
    assert dump(fresh) == dump(hub)
    assert state.public_key(fresh) == state.public_key(hub)
    assert state.load_settings(fresh) == state.load_settings(hub)
    for name in ("private.key", "registry.db"):
        assert stat.S_IMODE(os.stat(os.path.join(fresh, name)).st_mode) == 0o600
    rc, _, err = run(capsys, "restore", str(backup), "--state-dir", fresh)
    assert rc == 1 and "already initialised" in err  # a hub is never overwritten
    (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
    rc, _, err = run(capsys, "restore", str(tmp_path / "junk"), "--state-dir",
                     str(tmp_path / "other"))
    assert rc == 1 and "not a pytun backup" in err and err.count("\n") == 1


def test_backup_is_consistent_while_the_registry_is_written(hub, tmp_path):
    stop = threading.Event()

    def writer():
        with SqliteRegistry(state.registry_path(hub), create=False) as r:
            i = 0
            while not stop.is_set():
                r.add(Peer(name=f"w{i}", public_key=key(), address=f"10.77.0.{10 + i % 200}"))
                r.remove(f"w{i}")
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.05)  # let the writer run while the copies are taken
        copies = []
        for n in range(5):
            path = str(tmp_path / f"b{n}")
            migrate.backup(hub, path)
            copies.append(path)
    finally:
        stop.set()
        thread.join()
    for path in copies:
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT count(*) FROM peers").fetchone()[0] in (2, 3)


def test_export_is_a_wg_quick_server_config(hub, capsys, tmp_path):
    rc, out, _ = run(capsys, "export", "--state-dir", hub)
    assert rc == 0
    parsed = config.parse(out)
    assert [str(a) for a in parsed.interface.addresses] == ["10.77.0.1/24", "fd77::1/64"]
    assert parsed.interface.listen_port == 51820
    assert keys.encode_key(keys.public_from_private(parsed.interface.private_key)) == \
        state.public_key(hub)
    (alice,) = parsed.peers  # bob is disabled
    assert [str(n) for n in alice.allowed_ips] == ["10.77.0.2/32", "fd77::2/128",
                                                   "192.168.50.0/24"]
    assert alice.preshared_key is not None and "# bob is disabled" in out
    assert "# Name = alice" in out
    # and it imports back into the same peers
    path = tmp_path / "wg0.conf"
    path.write_text(out)
    back = str(tmp_path / "back")
    rc, _, err = run(capsys, "import-wg", str(path), "--endpoint", "vpn.example.com",
                     "--interface", "pytun9", "--state-dir", back)
    assert rc == 0, err
    assert [p[:6] for p in dump(back)[0]] == [p[:6] for p in dump(hub)[0] if p[0] == "alice"]


WG0 = """\
[Interface]
PrivateKey = {hub_private}
Address = 10.8.0.1/24
ListenPort = 51999
PostUp = iptables -t nat -A POSTROUTING -s 10.8.0.0/24 -o eth0 -j MASQUERADE
DNS = 1.1.1.1

# Name = Alice Smith
[Peer]
PublicKey = {k1}
PresharedKey = {psk}
AllowedIPs = 10.8.0.2/32

# Client: bob (2f1c9e)
[Peer]
PublicKey = {k2}
AllowedIPs = 10.8.0.3/32, 192.168.7.0/24
PersistentKeepalive = 25

# carol
[Peer]
PublicKey = {k3}
AllowedIPs = 10.8.0.4/32

[Peer]
PublicKey = {k4}
AllowedIPs = 10.8.0.5/32

# stray, outside the subnet
[Peer]
PublicKey = {k5}
AllowedIPs = 172.16.0.0/24
"""


def test_import_plan_maps_names_sites_and_says_what_it_leaves_out(tmp_path):
    private = keys.generate_private()
    ks = [key() for _ in range(5)]
    text = WG0.format(hub_private=keys.encode_key(private), psk=keys.encode_key(bytes(32)),
                      k1=ks[0], k2=ks[1], k3=ks[2], k4=ks[3], k5=ks[4])
    plan = migrate.plan_import(text, "wg0.conf", endpoint="vpn.example.com",
                               live={ks[0]: ("198.51.100.7:4000", 1_800_000_000)})
    assert plan.private_key == private
    assert (str(plan.settings.subnet), plan.settings.listen_port) == ("10.8.0.0/24", 51999)
    assert [(p.name, str(p.address.ip), [str(s) for s in p.sites], p.keepalive)
            for p in plan.peers] == [("Alice-Smith", "10.8.0.2", [], 0),
                                     ("bob", "10.8.0.3", ["192.168.7.0/24"], 25),
                                     ("carol", "10.8.0.4", [], 0), ("peer-4", "10.8.0.5", [], 0)]
    assert plan.peers[0].preshared_key == keys.encode_key(bytes(32))
    assert (plan.peers[0].endpoint, plan.peers[0].last_handshake) == ("198.51.100.7:4000",
                                                                      1_800_000_000)
    assert [u.split(":")[0] for u in plan.unmapped] == [
        "PostUp = iptables -t nat -A POSTROUTING -s 10.8.0.0/24 -o eth0 -j MASQUERADE",
        "DNS in the server's [Interface]", f"[Peer] {ks[4]}"]
    assert "everyone -> internet any" in [r.text() for r in plan.rules]
    state_dir = str(tmp_path / "st")
    migrate.apply_import(plan, state_dir)
    assert state.public_key(state_dir) == keys.encode_key(keys.public_from_private(private))
    assert [p[0] for p in dump(state_dir)[0]] == ["Alice-Smith", "bob", "carol", "peer-4"]


def test_an_import_that_cannot_be_done_says_why_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "wg0.conf"
    bad.write_text(textwrap.dedent(f"""\
        [Interface]
        PrivateKey = {keys.encode_key(keys.generate_private())}
        Address = 10.8.0.254/24
        """))
    rc, _, err = run(capsys, "import-wg", str(bad), "--endpoint", "x", "--state-dir",
                     str(tmp_path / "st"))
    assert rc == 1 and "is not the first of its subnet" in err and err.count("\n") == 1
    assert not (tmp_path / "st").exists()
    bad.write_text("[Interface]\nPrivateKey = nonsense\n")
    rc, _, err = run(capsys, "import-wg", str(bad), "--endpoint", "x", "--state-dir",
                     str(tmp_path / "st"))
    assert rc == 1 and "wg0.conf:2:" in err
