"""The audit log: who changed what through pytun-admin, when, before and after; append-only,
no secrets, nothing for a listing or a failed command."""

from __future__ import annotations

import json
import os

import pytest

from pytun.server import admin, audit, state


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("SUDO_UID", raising=False)
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com", "--interface", "ptaudit0"]) == 0
    return d


def run(d, *argv) -> int:
    return admin.main(["--state-dir", d, *argv])


def test_each_change_is_one_entry_with_before_and_after(hub_dir, monkeypatch, capsys):
    assert run(hub_dir, "add-peer", "alice", "--group", "ops") == 0
    monkeypatch.setenv("SUDO_USER", "carol")
    monkeypatch.setenv("SUDO_UID", "1001")
    assert run(hub_dir, "disable-peer", "alice") == 0
    entries = audit.read(hub_dir)
    assert [e["command"] for e in entries] == ["init", "add-peer", "disable-peer"]
    added = entries[1]
    assert {c["object"] for c in added["changes"]} == {"peer:alice", "group:ops"}
    peer = next(c for c in added["changes"] if c["object"] == "peer:alice")
    assert peer["before"] is None and peer["after"]["groups"] == ["ops"]
    disabled = entries[2]
    assert disabled["changes"] == [{"object": "peer:alice",
                                    "before": {**peer["after"], "disabled": False},
                                    "after": {**peer["after"], "disabled": True}}]
    assert disabled["uid"] == os.getuid() and disabled["user"]
    assert (disabled["sudo_user"], disabled["sudo_uid"]) == ("carol", 1001)
    assert disabled["argv"][-2:] == ["disable-peer", "alice"]
    capsys.readouterr()
    assert run(hub_dir, "audit") == 0
    out = capsys.readouterr().out
    assert "(sudo by carol)" in out and "peer:alice disabled: false -> true" in out


def test_listings_and_failures_write_nothing(hub_dir, capsys):
    before = open(audit.audit_path(hub_dir)).read()
    assert run(hub_dir, "list-peers") == 0
    assert run(hub_dir, "access", "list") == 0
    assert run(hub_dir, "disable-peer", "nobody") == 1
    assert open(audit.audit_path(hub_dir)).read() == before


def test_append_only_and_private(hub_dir):
    first = open(audit.audit_path(hub_dir)).read()
    assert run(hub_dir, "access", "add", "everyone", "hub", "tcp/22") == 0
    now = open(audit.audit_path(hub_dir)).read()
    assert now.startswith(first) and now.count("\n") == first.count("\n") + 1
    mode = os.stat(audit.audit_path(hub_dir)).st_mode & 0o777
    assert mode == 0o600
    rule = audit.read(hub_dir)[-1]["changes"][0]
    assert rule["after"]["text"] == "everyone -> hub tcp/22"


def test_no_secret_in_the_log(hub_dir, tmp_path):
    conf = tmp_path / "bob.conf"
    assert run(hub_dir, "add-peer", "bob", "--psk", "-o", str(conf)) == 0
    text = open(audit.audit_path(hub_dir)).read()
    secrets = [line.split("=", 1)[1].strip() for line in conf.read_text().splitlines()
               if line.startswith(("PrivateKey", "PresharedKey"))]
    assert len(secrets) == 2
    for secret in secrets + [open(state.private_key_path(hub_dir)).read().strip()]:
        assert secret not in text
    assert audit.read(hub_dir)[-1]["changes"][0]["after"]["preshared_key"] is True


def test_since_and_json(hub_dir, capsys):
    assert run(hub_dir, "add-peer", "dave") == 0
    capsys.readouterr()
    assert run(hub_dir, "audit", "--since", "1h", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert run(hub_dir, "audit", "--since", "2099-01-01T00:00:00Z", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_an_edited_log_is_one_line_error(hub_dir, capsys):
    with open(audit.audit_path(hub_dir), "a") as f:
        f.write("tampered\n")
    capsys.readouterr()
    assert run(hub_dir, "audit") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not JSON" in err
