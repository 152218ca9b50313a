"""The hub's Prometheus metrics without root: the collector over a real sans-IO Device, the
exporter-compatible names and labels, the bearer token, and the settings that turn it on."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pytun.common import keys
from pytun.common.device import Device
from pytun.server import metrics, ops, state
from pytun.server.registry import Peer as Record
from pytun.common.peer import Event
from tests.enginenet import static_key


def _hub(now: float = 1000.0):
    """A stand-in hub: a real Device with three peers in three states."""
    private, _ = static_key("metrics-hub")
    device = Device(private)
    hub = SimpleNamespace(device=device, settings=SimpleNamespace(interface="pytun0"),
                          peers={}, records=[])
    for i, name in enumerate(("alice", "bob", "carol")):
        _, public = static_key(f"metrics-{name}")
        p = device.add_peer(public, allowed_ips=[], name=name)
        spec = (keys.encode_key(public), f"10.77.0.{i + 2}/32",
                ("192.168.5.0/24",) if name == "bob" else (), None, 25)
        hub.peers[name] = (spec, p)
        hub.records.append(Record(name=name, public_key=spec[0], address=spec[1],
                                  groups=["ops"] if name == "alice" else [],
                                  disabled=False))
    alice, bob = hub.peers["alice"][1], hub.peers["bob"][1]
    alice.rx_bytes, alice.tx_bytes = 1234, 5678
    alice.last_handshake, alice.last_handshake_wall = now - 10, 1_700_000_000.5
    bob.last_handshake, bob.last_handshake_wall = now - 500, 1_699_999_000.0  # idle
    hub.records.append(Record(name="dave", public_key=keys.encode_key(static_key("d")[1]),
                              address="10.77.0.9/32", disabled=True))
    device.drops.update({"peer_to_peer": 3, "bad_mac1": 2, "udp_send_error": 4})
    device.handshakes_completed, device.handshakes_gave_up = 7, 1
    return hub, device


def _scrape(hub, now=1000.0) -> dict:
    """name -> list of (labels, value), through the text format Prometheus reads."""
    text = metrics.Exposition(hub, clock=lambda: now).render().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out, text


def _one(samples, **labels):
    found = [v for lab, v in samples if all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (labels, samples)
    return found[0]


def test_exporter_compatible_names_and_labels():
    hub, _ = _hub()
    got, _ = _scrape(hub)
    alice_key = hub.peers["alice"][0][0]
    labels = {"interface": "pytun0", "public_key": alice_key, "allowed_ips": "10.77.0.2/32",
              "friendly_name": "alice"}
    assert _one(got["wireguard_sent_bytes_total"], **labels) == 5678
    assert _one(got["wireguard_received_bytes_total"], **labels) == 1234
    assert _one(got["wireguard_latest_handshake_seconds"], **labels) == 1_700_000_000
    # A peer with a site routed to it lists every allowed IP, as the exporter does.
    assert _one(got["wireguard_sent_bytes_total"], friendly_name="bob",
                allowed_ips="10.77.0.3/32,192.168.5.0/24") == 0
    # The exporter says 0 for never; so do we in its family.
    assert _one(got["wireguard_latest_handshake_seconds"], friendly_name="carol") == 0


def test_pytun_family_by_conventions():
    hub, _ = _hub()
    got, text = _scrape(hub)
    assert _one(got["pytun_peer_sent_bytes_total"], peer="alice") == 5678
    assert _one(got["pytun_peer_received_bytes_total"], peer="alice") == 1234
    assert _one(got["pytun_peer_last_handshake_timestamp_seconds"], peer="alice") == 1_700_000_000.5
    # Absent when never.
    assert [lab for lab, _ in got["pytun_peer_last_handshake_timestamp_seconds"]
            if lab["peer"] == "carol"] == []
    # Byte counters carry the name only; mutable attributes live in the info metric.
    assert {tuple(lab) for lab, _ in got["pytun_peer_sent_bytes_total"]} == {("peer",)}
    info = {lab["peer"]: lab for lab, _ in got["pytun_peer_info"]}
    assert info["alice"]["groups"] == "ops" and info["alice"]["enabled"] == "true"
    assert info["dave"]["enabled"] == "false"
    assert info["alice"]["public_key"] == hub.peers["alice"][0][0]
    states = {lab["state"]: v for lab, v in got["pytun_peers"]}
    assert states == {"connected": 1, "idle": 1, "never": 1, "disabled": 1}
    assert _one(got["pytun_drops_total"], reason="peer_to_peer") == 3
    assert [lab for lab, _ in got["pytun_drops_total"] if lab["reason"] == "udp_send_error"] == []
    assert _one(got["pytun_io_errors_total"], kind="udp_send_error") == 4
    assert _one(got["pytun_io_errors_total"], kind="tun_write_error") == 0
    assert _one(got["pytun_handshakes_total"], result="completed") == 7
    assert _one(got["pytun_handshakes_total"], result="gave_up") == 1
    assert _one(got["pytun_handshakes_total"], result="bad_mac1") == 2
    assert got["pytun_under_load"] == [({}, 0.0)]
    assert got["pytun_sessions"] == [({}, 0.0)]  # alice has a handshake but no keypair here
    assert "# TYPE pytun_peer_sent_bytes_total counter" in text


def test_no_private_or_preshared_key_in_the_scrape():
    hub, device = _hub()
    _, text = _scrape(hub)
    secret = base64.b64encode(device.private_key).decode()
    assert secret not in text and secret[:20] not in text
    assert "preshared" not in text


def test_under_load_flag_follows_the_device():
    hub, device = _hub()
    device._under_load_until = 1001.0
    got, _ = _scrape(hub, now=1000.0)
    assert got["pytun_under_load"] == [({}, 1.0)]


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9586", ("127.0.0.1", 9586)), ("127.0.0.1", ("127.0.0.1", 9586)),
    ("[::1]:9100", ("::1", 9100)), ("10.77.0.1:80", ("10.77.0.1", 80))])
def test_parse_listen(text, expected):
    assert metrics.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost:9586", "127.0.0.1:0", "127.0.0.1:x", "[::1]:99999"])
def test_parse_listen_refuses(text):
    with pytest.raises(metrics.MetricsError):
        metrics.parse_listen(text)


def test_token_file_must_be_private(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret\n")
    os.chmod(path, 0o644)
    with pytest.raises(metrics.MetricsError, match="chmod 600"):
        metrics.read_token(str(path))
    os.chmod(path, 0o600)
    assert metrics.read_token(str(path)) == "s3cret"


def _get(url, token=None):
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_server_requires_the_token_and_serves_both_families(tmp_path):
    hub, _ = _hub()
    token = tmp_path / "token"
    token.write_text("t0ken-xyz\n")
    os.chmod(token, 0o600)
    server = metrics.MetricsServer(hub, "127.0.0.1:65535", str(token))
    server.port = 0  # any free port (tests run in parallel on this machine)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert _get(url)[0] == 401
        assert _get(url, "wrong")[0] == 401
        status, body = _get(url, "t0ken-xyz")
        assert status == 200
        assert 'wireguard_sent_bytes_total{' in body and "pytun_peers{" in body
        assert "process_cpu_seconds_total" in body  # the process's own metrics
        assert "t0ken-xyz" not in body
    finally:
        server.stop()


def test_settings_without_metrics_load_and_with_them_round_trip(tmp_path):
    base = {"subnet": "10.77.0.0/24", "endpoint": "vpn.example.com"}
    plain = state.HubSettings.from_json(json.dumps(base))
    assert plain.metrics is None and "metrics" not in json.loads(plain.to_json())
    on = state.HubSettings.from_json(json.dumps({**base, "metrics": "127.0.0.1:9586",
                                                 "metrics_token_file": "/etc/pytun/token"}))
    again = state.HubSettings.from_json(on.to_json())
    assert (again.metrics, again.metrics_token_file) == ("127.0.0.1:9586", "/etc/pytun/token")
    with pytest.raises(state.StateError, match="metrics address"):
        state.HubSettings.from_json(json.dumps({**base, "metrics": "anywhere"}))


def test_admin_metrics_changes_the_setting(tmp_path, capsys):
    from pytun.server import admin
    d = str(tmp_path / "s")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24", "--endpoint",
                       "vpn.example.com", "--interface", "ptmetric0", "--metrics",
                       "127.0.0.1:9586"]) == 0
    assert state.load_settings(d).metrics == "127.0.0.1:9586"
    assert admin.main(["--state-dir", d, "metrics", "--listen", "[::1]:9100"]) == 0
    assert state.load_settings(d).metrics == "[::1]:9100"
    assert admin.main(["--state-dir", d, "metrics", "--off"]) == 0
    assert state.load_settings(d).metrics is None
    capsys.readouterr()
    assert admin.main(["--state-dir", d, "metrics", "--listen", "nowhere"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_hub_operations_wire_the_watchdog_into_the_driver():
    from pytun.common.sdnotify import Notifier
    hub, _ = _hub()
    hub.settings.metrics = None
    o = ops.Operations(hub, Notifier(None, watchdog_usec=20_000_000))
    seen = []
    driver = SimpleNamespace(heartbeat=None, heartbeat_interval=0.0,
                             on_event=lambda *e: seen.append(e))
    o.prepare(driver)
    assert driver.heartbeat_interval == 10.0 and driver.heartbeat == o.notifier.watchdog
    # The session log sees each event before the hub's own handler does.
    peer = hub.peers["alice"][1]
    driver.on_event(Event.HANDSHAKE, peer, None)
    assert seen == [("handshake", peer, None)] and "alice" in o.sessions.active


def test_a_second_scrape_formats_only_the_peers_that_moved(monkeypatch):
    hub, _ = _hub()
    exposition = metrics.Exposition(hub, clock=lambda: 1000.0)
    exposition.render()
    formatted = []
    original = metrics.PeerFamilies._format
    monkeypatch.setattr(metrics.PeerFamilies, "_format", staticmethod(
        lambda *a: formatted.append(a[1]) or original(*a)))
    hub.peers["bob"][1].rx_bytes += 100
    text = exposition.render().decode()
    assert formatted == ["bob"]
    assert 'pytun_peer_received_bytes_total{peer="bob"} 100' in text
    del hub.peers["carol"]
    text = exposition.render().decode()
    assert 'friendly_name="carol"' not in text


def test_label_values_are_escaped():
    hub, _ = _hub()
    hub.records[0].groups = ['we"ird\\grp']
    got, _ = _scrape(hub)
    info = {lab["peer"]: lab for lab, _ in got["pytun_peer_info"]}
    assert info["alice"]["groups"] == 'we"ird\\grp'


def test_expiry_times_when_peers_carry_them():
    hub, _ = _hub()
    got, _ = _scrape(hub)
    assert "pytun_peer_expiry_timestamp_seconds" not in got  # no peer expires
    hub.records[0].expires = 1_800_000_000
    got, _ = _scrape(hub)
    assert got["pytun_peer_expiry_timestamp_seconds"] == [({"peer": "alice"}, 1.8e9)]
