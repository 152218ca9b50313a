"""The PostgreSQL registry beside the SQLite one: what only it does (live changes by
LISTEN/NOTIFY, a database that goes away and comes back, several hubs starting at once), and
pytun-admin with hub.json's `registry` URL. The throwaway cluster is tests/pgserver.py's."""

import ipaddress
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from pytun.common import keys
from pytun.server import admin, policy, state
from pytun.server.registry import Peer, RegistryError, open_registry
from pytun.server.registry_pg import PostgresRegistry, pg_sql


def pub(i: int) -> str:
    return keys.encode_key(keys.public_from_private(keys.generate_private(bytes([i]) * 32)))


def changed(reg, token, within: float = 1.0):
    deadline = time.monotonic() + within
    while (now := reg.change_token()) == token:
        assert time.monotonic() < deadline, "the change token did not move within a second"
        time.sleep(0.0005)
    return now


def test_pg_sql():
    assert pg_sql("SELECT name FROM peers WHERE name = ? COLLATE NOCASE ORDER BY name = ? DESC") \
        == "SELECT name FROM peers WHERE lower(name) = lower(%s) ORDER BY name = %s DESC"
    assert pg_sql("WHERE id = ? OR name = ? COLLATE NOCASE") == \
        "WHERE id = %s OR lower(name) = lower(%s)"


def test_groups_rules_expiry_keys_on_both_backends(registry_location):
    """Every table through the one interface: groups, rules, expiry, keys, default rules."""
    with open_registry(registry_location, create=True) as r:
        settings = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com")
        assert r.ensure_default_rules(policy.default_rules(settings)) is True
        assert r.ensure_default_rules(policy.default_rules(settings)) is False
        defaults = len(r.rules())
        r.add(Peer(name="Alice", public_key=pub(1), address="10.77.0.2", groups=["dev"]))
        r.add_group("ops", "on call")
        assert [g for g, _ in r.groups()] == ["everyone", "full-tunnel", "dev", "ops"]
        rule = r.add_rule(policy.parse_rule("dev", "10.20.3.0/24", "tcp/5432"))
        assert rule.id is not None and r.rules()[-1] == rule and len(r.rules()) == defaults + 1
        with pytest.raises(RegistryError, match="group dev is named by rule"):
            r.remove_group("dev")
        with pytest.raises(RegistryError, match="no group named 'nope'"):
            r.add_rule(policy.parse_rule("nope", "hub", "any"))
        assert r.remove_rule(rule.id) == rule
        assert r.remove_group("dev") == ["Alice"]
        r.set_groups("alice", ["ops"])  # any case finds her
        assert r.get("ALICE").groups == ["ops"]
        r.set_expiry("alice", 2_000_000_000)
        assert r.get("alice").expires == 2_000_000_000
        r.set_keys("alice", pub(2), keys.encode_key(bytes(32)))
        assert r.get("alice").public_key == pub(2)
        with pytest.raises(RegistryError, match="names are case-insensitive"):
            r.add(Peer(name="alice", public_key=pub(3), address="10.77.0.3"))
        assert r.record_endpoints([("Alice", "198.51.100.2:1", 5), ("gone", None, None)]) == 1
        assert r.get("alice").endpoint == "198.51.100.2:1"


def test_a_change_reaches_another_connection_by_notify(pg_url):
    """Two hubs' registries on one database: a write on one moves the other's change token at
    once (NOTIFY), not at the next reconcile; the hub's own endpoint notes do not."""
    hub = open_registry(pg_url, create=True)
    other = open_registry(pg_url)
    try:
        token = hub.change_token()
        hub._reconcile_at = float("inf")  # only a notification can move it now
        delays = []
        for i in range(20):
            start = time.monotonic()
            other.add(Peer(name=f"p{i}", public_key=pub(i + 1), address=f"10.77.0.{i + 2}"))
            token = changed(hub, token)
            delays.append(time.monotonic() - start)
        other.record_endpoints([("p0", "198.51.100.2:1", 5)])
        hub.raise_handshake_timestamps([(pub(1), bytes(12))])
        time.sleep(0.05)
        assert hub.change_token() == token
        print(f"add-peer to change token: median {statistics.median(delays) * 1000:.2f} ms,"
              f" max {max(delays) * 1000:.2f} ms")
    finally:
        hub.close()
        other.close()


def test_a_missed_notification_is_caught_by_the_reconcile(pg_url, monkeypatch):
    from pytun.server import registry_pg
    hub = open_registry(pg_url, create=True)
    try:
        token = hub.change_token()
        with open_registry(pg_url) as other:
            monkeypatch.setattr(registry_pg, "CHANNEL", "elsewhere")  # the NOTIFY goes astray
            other.add(Peer(name="alice", public_key=pub(1), address="10.77.0.2"))
        time.sleep(0.05)
        assert hub.change_token() == token
        hub._reconcile_at = 0.0  # the periodic read is due
        assert hub.change_token() != token
    finally:
        hub.close()


def test_two_hubs_starting_at_once_make_the_schema_once(pg_url):
    errors, made = [], []

    def start():
        try:
            made.append(open_registry(pg_url, create=True))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(made) == 4
    for r in made:
        r.close()


def test_refusals_are_one_line():
    with pytest.raises(RegistryError, match=r"^registry postgresql://pytun:\*\*\*@/nope\?host="
                                            r"/nonexistent&port=1: cannot connect: .*$") as e:
        PostgresRegistry("postgresql://pytun:s3cret@/nope?host=/nonexistent&port=1")
    assert "\n" not in str(e.value) and "s3cret" not in str(e.value)


def test_without_a_schema_the_admin_is_told_to_init(pg_url):
    with pytest.raises(RegistryError, match="has no pytun registry in it; pytun-admin init"):
        open_registry(pg_url)


# -- a database that goes away and comes back --------------------------------------------------


def admin_cli(d, *argv):
    """pytun-admin in its own process, as an operator runs it."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "pytun.server.admin", "--state-dir", d, *argv],
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def pg_hub(tmp_path, pg_url, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com", "--registry", pg_url]) == 0
    capsys.readouterr()
    return d


def test_admin_init_and_peers_on_postgresql(pg_hub, pg_url, capsys):
    assert not os.path.exists(state.registry_path(pg_hub))  # no SQLite file beside it
    assert state.load_settings(pg_hub).registry == pg_url
    assert admin.main(["--state-dir", pg_hub, "add-peer", "alice", "-o",
                       os.path.join(pg_hub, "..", "alice.conf")]) == 0
    err = capsys.readouterr().err
    assert "hubs that share the registry apply the change" in err
    assert admin.main(["--state-dir", pg_hub, "list-peers", "--json"]) == 0
    (alice,) = json.loads(capsys.readouterr().out)
    assert (alice["name"], alice["address"]) == ("alice", "10.77.0.2/32")
    with open_registry(pg_url) as r:  # the registry is the one truth, for any host
        assert ipaddress.ip_interface("10.77.0.2/32") == r.get("alice").address
        assert len(r.rules()) > 0  # init's default rules


def test_an_outage_fails_in_one_line_and_heals(pg_hub, pg_url, pg_server):
    """The database stops while a hub's registry is open: pytun-admin fails with one line and
    no traceback, the hub's registry raises RegistryError (never hangs), and once it is back,
    the hub's next poll reconnects and sees the change made meanwhile."""
    hub = open_registry(pg_url)
    try:
        token = hub.change_token()
        hub.list()
        pg_server.stop()
        try:
            done = admin_cli(pg_hub, "add-peer", "bob", "--public-key", pub(7))
            assert done.returncode == 1, done
            assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1
            assert done.stderr.startswith("pytun-admin: error: registry postgresql://")
            # The listening connection learns of the loss on its next poll or the one after.
            deadline = time.monotonic() + 1
            with pytest.raises(RegistryError, match="^registry postgresql://[^\n]*$"):
                while time.monotonic() < deadline:
                    hub.change_token()
            for call in (hub.list, lambda: hub.record_endpoints(
                    [("alice", "198.51.100.2:1", 1)]), hub.change_token):
                start = time.monotonic()
                with pytest.raises(RegistryError, match="^registry postgresql://[^\n]*$"):
                    call()
                assert time.monotonic() - start < 3
        finally:
            pg_server.start()
        done = admin_cli(pg_hub, "add-peer", "bob", "--public-key", pub(7))
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 5
        while True:  # reconnects (at most once a second), then sees bob
            try:
                if hub.change_token() != token:
                    break
            except RegistryError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [p.name for p in hub.list()] == ["bob"]
    finally:
        hub.close()


def test_a_hub_picks_up_a_peer_added_elsewhere_within_a_second(tmp_path, pg_url):
    """A Hub object over the PostgreSQL registry (no kernel): an add-peer on another connection
    (another host's pytun-admin) moves the token its poll compares, and a sync loads the peer."""
    from .test_hub_state import World
    world = World(tmp_path, pg_url)
    try:
        hub = world.hub
        assert "bob" not in hub.peers
        with open_registry(pg_url) as elsewhere:
            elsewhere.add(Peer(name="bob", public_key=pub(9), address="10.77.0.9"))
        hub.registry._reconcile_at = float("inf")  # the notification, not the reconcile
        deadline = time.monotonic() + 1
        while hub.registry.change_token() == hub._token:  # what _poll_registry checks
            assert time.monotonic() < deadline, "the hub did not see the change within 1 s"
            time.sleep(0.001)
        added, _ = hub.sync()
        assert added == ["bob"] and "bob" in hub.peers
    finally:
        world.registry.close()


def test_doctor_checks_that_the_database_answers(pg_hub, pg_url, pg_server):
    from pytun.server import doctor
    check = doctor.check_pg_registry(pg_url)
    assert check.status == doctor.PASS and "0 peers" in check.detail
    dead = doctor.check_pg_registry("postgresql://pytun:s3cret@/nope?host=/nonexistent&port=1")
    assert dead.status == doctor.FAIL and "cannot connect" in dead.detail
    assert "s3cret" not in f"{dead.detail} {dead.fix}"
