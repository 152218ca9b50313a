"""Where the registry is: hub.json's `registry` URL (PostgreSQL) or registry.db (SQLite), and
the URL's password kept out of what pytun prints."""

import json

import pytest

from pytun.server import admin, registry, state
from pytun.server.registry import SqliteRegistry, mask, open_registry


@pytest.mark.parametrize("url, shown", [
    ("postgresql://pytun:s3cret@db.example.com:5432/pytun?sslmode=require",
     "postgresql://pytun:***@db.example.com:5432/pytun?sslmode=require"),
    ("postgres://db/pytun?password=s3cret&sslmode=require",
     "postgres://db/pytun?password=***&sslmode=require"),
    ("postgresql:///pytun?host=/run/postgresql", "postgresql:///pytun?host=/run/postgresql"),
    ("postgresql://pytun@db/pytun", "postgresql://pytun@db/pytun"),
    ("/var/lib/pytun/registry.db", "/var/lib/pytun/registry.db"),
])
def test_mask(url, shown):
    assert mask(url) == shown


def test_settings_round_trip_and_repr():
    url = "postgresql://pytun:s3cret@db.example.com/pytun"
    s = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com", registry=url)
    assert "s3cret" not in repr(s)
    assert state.HubSettings.from_json(s.to_json()).registry == url
    plain = state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com")
    assert "registry" not in json.loads(plain.to_json())  # hub.json stays as older hubs read it
    with pytest.raises(state.StateError, match="give a postgresql:// URL"):
        state.HubSettings(subnet="10.77.0.0/24", endpoint="x", registry="/tmp/r.db")


def test_open_registry_picks_the_backend(tmp_path):
    with open_registry(str(tmp_path / "r.db"), create=True) as r:
        assert isinstance(r, SqliteRegistry)
    with pytest.raises(registry.RegistryError, match="does not exist"):
        open_registry(str(tmp_path / "absent.db"))
    d = str(tmp_path / "state")
    state.init_state(d, state.HubSettings(subnet="10.77.0.0/24", endpoint="vpn.example.com"))
    with state.open_hub_registry(d) as r:
        assert r.path == state.registry_path(d)


def test_init_refuses_a_registry_that_is_no_url(tmp_path, capsys):
    rc = admin.main(["--state-dir", str(tmp_path / "s"), "init", "--subnet", "10.77.0.0/24",
                     "--endpoint", "vpn.example.com", "--registry", "mysql://x:secret@h/db"])
    err = capsys.readouterr().err
    assert rc == 1 and "give a postgresql:// URL" in err and "Traceback" not in err
    assert "secret" not in err
