"""A peer's life in the registry and pytun-admin: expiry, renew, disable with a reason,
rotate-key, and names that are one person whatever their case."""

import datetime
import json
import time

import pytest

from pytun.common import config, keys
from pytun.server import admin

from .test_admin import peers_json, run


@pytest.fixture
def hub(tmp_path, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com"]) == 0
    capsys.readouterr()
    return d


def by_name(capsys, d) -> dict:
    return {p["name"]: p for p in peers_json(capsys, d)}


def test_expiry_by_ttl_or_time_and_renew(hub, capsys, tmp_path):
    t0 = int(time.time())
    rc, _, err = run(capsys, "add-peer", "alice", "--ttl", "2h", "-o", str(tmp_path / "a.conf"),
                     "--state-dir", hub)
    assert rc == 0, err
    alice = by_name(capsys, hub)["alice"]
    assert t0 + 7200 <= alice["expires"] <= int(time.time()) + 7200
    assert alice["state"] == "enabled"
    rc, _, _ = run(capsys, "add-peer", "bob", "--expires", "2099-01-02T03:04:05+01:00", "-o",
                   str(tmp_path / "b.conf"), "--state-dir", hub)
    utc = datetime.datetime(2099, 1, 2, 2, 4, 5, tzinfo=datetime.timezone.utc)
    assert rc == 0 and by_name(capsys, hub)["bob"]["expires"] == int(utc.timestamp())
    rc, out, _ = run(capsys, "renew", "BOB", "--ttl", "30d", "--state-dir", hub)
    assert rc == 0 and out.startswith("peer bob expires at ")
    assert abs(by_name(capsys, hub)["bob"]["expires"] - (time.time() + 30 * 86400)) < 5
    rc, out, _ = run(capsys, "renew", "bob", "--never", "--state-dir", hub)
    assert rc == 0 and by_name(capsys, hub)["bob"]["expires"] is None
    table = run(capsys, "list-peers", "--state-dir", hub)[1]
    assert "EXPIRES" in table.splitlines()[0]


@pytest.mark.parametrize("argv, message", [
    (["--ttl", "30x"], "bad duration '30x'"),
    (["--ttl=-1d"], "bad duration"),
    (["--expires", "2099-01-01"], "bad time '2099-01-01'"),  # no time zone: refused
    (["--expires", "tomorrow"], "bad time"),
    (["--expires", "2001-01-01T00:00:00Z"], "is in the past"),
    (["--ttl", "1d", "--expires", "2099-01-01T00:00:00Z"], "not both"),
])
def test_bad_expiry_is_refused_and_nothing_stored(hub, capsys, tmp_path, argv, message):
    rc, _, err = run(capsys, "add-peer", "alice", *argv, "-o", str(tmp_path / "a.conf"),
                     "--state-dir", hub)
    assert rc == 1 and message in err and err.count("\n") == 1, err
    assert peers_json(capsys, hub) == [] and not (tmp_path / "a.conf").exists()


def test_disable_with_a_reason_and_names_in_any_case(hub, capsys, tmp_path):
    run(capsys, "add-peer", "alice", "-o", str(tmp_path / "a.conf"), "--state-dir", hub)
    rc, out, _ = run(capsys, "disable-peer", "ALICE", "--reason", "laptop stolen",
                     "--state-dir", hub)
    assert rc == 0 and out.strip() == "disabled peer alice"
    alice = by_name(capsys, hub)["alice"]
    assert (alice["state"], alice["disabled_reason"]) == ("disabled", "laptop stolen")
    assert "disabled (laptop stolen)" in run(capsys, "list-peers", "--state-dir", hub)[1]
    shown = json.loads(run(capsys, "show", "--json", "--state-dir", hub)[1])
    assert [(p["name"], p["state"]) for p in shown] == [("alice", "disabled")]
    rc, _, err = run(capsys, "disable-peer", "alice", "--reason", "two\nlines",
                     "--state-dir", hub)
    assert rc == 1 and "one line" in err
    assert run(capsys, "enable-peer", "Alice", "--state-dir", hub)[0] == 0
    alice = by_name(capsys, hub)["alice"]
    assert (alice["state"], alice["disabled_reason"]) == ("enabled", "")
    assert run(capsys, "remove-peer", "aLiCe", "--state-dir", hub)[0] == 0
    assert peers_json(capsys, hub) == []


def test_rotate_key_gives_a_new_pair_and_keeps_the_rest(hub, capsys, tmp_path):
    old_path, new_path = tmp_path / "a.conf", tmp_path / "a2.conf"
    run(capsys, "add-peer", "alice", "--psk", "--group", "dev", "-o", str(old_path),
        "--state-dir", hub)
    before = by_name(capsys, hub)["alice"]
    rc, _, err = run(capsys, "rotate-key", "alice", "-o", str(new_path), "--state-dir", hub)
    assert rc == 0 and "old one no longer connects" in err
    after = by_name(capsys, hub)["alice"]
    old, new = config.parse(old_path.read_text()), config.parse(new_path.read_text())
    assert keys.encode_key(keys.public_from_private(new.interface.private_key)) == \
        after["public_key"] != before["public_key"]
    assert new.peers[0].preshared_key not in (None, old.peers[0].preshared_key)
    assert (after["address"], after["groups"]) == (before["address"], before["groups"])
    assert new.interface.addresses == old.interface.addresses
    assert oct(new_path.stat().st_mode & 0o777) == "0o600"
    # A laptop-made key: only its public key comes in; the hub's own key is refused.
    laptop = keys.encode_key(keys.public_from_private(keys.generate_private()))
    rc, out, _ = run(capsys, "rotate-key", "alice", "--public-key", laptop, "--state-dir", hub)
    assert rc == 0 and by_name(capsys, hub)["alice"]["public_key"] == laptop
    hub_key = run(capsys, "show", "--state-dir", hub)  # any command; the key is in the state
    from pytun.server import state
    rc, _, err = run(capsys, "rotate-key", "alice", "--public-key", state.public_key(hub),
                     "--state-dir", hub)
    assert rc == 1 and "hub's own public key" in err
    assert by_name(capsys, hub)["alice"]["public_key"] == laptop
    assert hub_key[0] == 0
