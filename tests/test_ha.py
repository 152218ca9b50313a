"""Hot standby without a kernel: the role switch of a Device and of a Hub.

- a standby device drops and counts every datagram and tunnel packet, ends its sessions at
  once and sends nothing, timers included;
- a standby hub answers no laptop; told `ha=master`, it takes the endpoint the other hub wrote
  to the registry and calls the laptop back from the service address (a real socket on
  loopback: the laptop sees the datagram come from 127.0.0.2, not the route's 127.0.0.1);
  told `ha=backup`, it drops the session and answers nothing again;
- the settings: `ha` is checked, and the hub key may be a shared 0600 file outside the state
  directory (refused when group or others may read it).
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from pytun.common import control, keys, wire
from pytun.common.device import Device
from pytun.common.driver import Driver, open_udp
from pytun.server import state
from pytun.server.hub import Hub
from pytun.server.registry import Peer, SqliteRegistry

from .enginenet import WALL0, ipv4, seeded_rng, static_key, two, up

SERVICE = "127.0.0.2"


# ---------------------------------------------------------------------------------- device


def test_a_standby_device_ends_its_sessions_and_sends_nothing():
    net, a, b = two()
    up(net, a, b)
    assert b.device.keypairs
    b.device.set_standby(True)
    assert not b.device.keypairs and not b.device.handshakes
    before = len(net.sent_by("b"))
    for _ in range(5):  # data both ways, then every timer has its chance (rekey, keepalive)
        a.device.send(a.packet_to(b, b"to the standby"), net.now)
        b.device.send(b.packet_to(a, b"from the standby"), net.now)
        net.run(60.0, step=1.0)
    assert net.sent_by("b")[before:] == []
    assert b.received[-1] == a.packet_to(b, b"first")  # nothing new reached its tunnel
    assert b.device.drops["standby"] >= 10  # a's datagrams and b's own tunnel packets
    # Active again: the next initiation goes out at once, and the tunnel works.
    b.device.set_standby(False)
    b.device.initiate(b.peer(a), net.now)
    net.deliver()
    assert [s.type for s in net.sent_by("b")[before:]][:1] == [wire.MSG_INITIATION]
    b.device.send(b.packet_to(a, b"back"), net.now)
    net.deliver()
    assert a.received[-1] == b.packet_to(a, b"back")


def test_a_standby_device_drops_an_initiation_before_any_work():
    net, a, b = two()
    b.device.set_standby(True)
    a.device.initiate(a.peer(b), net.now)
    net.deliver()
    assert b.device.drops == {"standby": 1}
    assert net.sent_by("b") == []


# ---------------------------------------------------------------------------------- hub


class Pair:
    """A hub with `ha` (standby at start), its real UDP socket and a driver that is not
    running (the test carries out what the device asked for), and a sans-IO laptop behind a
    UDP socket on 127.0.0.1."""

    def __init__(self, tmp_path, start_as="standby"):
        self.settings = state.HubSettings(
            subnet="10.77.0.0/24", endpoint=f"{SERVICE}:51820",
            ha={"service_address": SERVICE, "start_as": start_as})
        hub_private, self.hub_public = static_key("hub")
        self.laptop_private, laptop_public = static_key("laptop")
        self.registry = SqliteRegistry(str(tmp_path / "registry.db"))
        self.registry.add(Peer(name="alice", public_key=keys.encode_key(laptop_public),
                               address="10.77.0.2"))
        self.hub = Hub(str(tmp_path), self.settings, hub_private, self.registry)
        self.hub.device.rng = seeded_rng("hub")
        self.sock = open_udp(0)
        self.port = self.sock.getsockname()[1]
        self.hub.sock = self.sock
        self.driver = Driver(self.hub.device, -1, self.sock, sticky=True)
        self.laptop_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.laptop_sock.bind(("127.0.0.1", 0))
        self.laptop_sock.settimeout(5)
        self.laptop_ep = ("::ffff:127.0.0.1", self.laptop_sock.getsockname()[1], 0, 0)
        self.laptop = Device(self.laptop_private, rng=seeded_rng("laptop"),
                             wallclock=lambda: WALL0 + time.monotonic())
        self.hub_peer = self.laptop.add_peer(self.hub_public, endpoint=(SERVICE, self.port),
                                             allowed_ips=["10.77.0.0/24"])

    def close(self):
        self.sock.close()
        self.laptop_sock.close()
        self.registry.close()

    def hub_sends(self) -> list[tuple[bytes, str]]:
        """Carry out what the hub asked for; (datagram, source address) the laptop got."""
        queued = len(self.hub.device.net_out)
        assert self.driver.flush_nowait() is False
        return [(lambda d, a: (d, a[0]))(*self.laptop_sock.recvfrom(2048)) for _ in range(queued)]

    def to_hub(self, now: float) -> None:
        for datagram, _ in self.laptop.net_out:
            self.hub.device.receive(datagram, self.laptop_ep, now)
        self.laptop.net_out.clear()


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_a_standby_hub_answers_no_laptop(pair):
    pair.hub.sync()
    pair.hub.driver = pair.driver
    now = time.monotonic()
    pair.laptop.initiate(pair.hub_peer, now)
    pair.to_hub(now)
    assert pair.hub.device.net_out == [] and pair.hub.device.drops["standby"] == 1
    assert dict(pair.hub.handle_control([("ha", "status")])) == {
        "role": "standby", "service_address": SERVICE, "standby_drops": "1"}


def test_becoming_master_calls_the_laptop_back_from_the_service_address(pair):
    # The other hub saw alice half a minute ago and wrote it to the shared registry.
    pair.hub.sync()
    pair.hub.driver = pair.driver
    pair.registry.record_endpoints([("alice", f"127.0.0.1:{pair.laptop_ep[1]}",
                                     int(time.time()) - 30)])
    assert pair.hub.device.net_out == []  # standby: no call back at start
    answer = dict(pair.hub.handle_control([("ha", "master")]))
    assert answer["role"] == "active"
    (initiation, source), = pair.hub_sends()
    assert wire.message_type(initiation) == wire.MSG_INITIATION
    assert source == SERVICE  # not the route's choice, 127.0.0.1
    # The laptop answers; the session is up, and the hub's reply leaves from there too.
    now = time.monotonic()
    pair.laptop.receive(initiation, (SERVICE, pair.port), now)
    pair.to_hub(now)
    assert pair.hub.peers["alice"][1].current is not None
    sent = pair.hub_sends()  # the keepalive that confirms the session
    assert sent and {source for _, source in sent} == {SERVICE}
    for datagram, _ in sent:
        pair.laptop.receive(datagram, (SERVICE, pair.port), now)
    # Backup again: the session ends at once, the laptop's data is dropped, nothing answers.
    pair.hub.handle_control([("ha", "backup")])
    assert not pair.hub.device.keypairs and pair.driver._reply_from == {}
    pair.laptop.send(ipv4("10.77.0.2", "10.77.0.1", b"hello?"), now)
    assert pair.laptop.net_out, "the laptop sends its data"
    pair.to_hub(now)
    assert pair.hub.device.net_out == [] and pair.hub.device.tun_out == []
    assert pair.hub.device.drops["standby"] >= 1
    assert pair.hub.role == "standby"


def test_a_laptop_not_seen_lately_is_not_called(pair):
    pair.hub.sync()
    pair.registry.record_endpoints([("alice", f"127.0.0.1:{pair.laptop_ep[1]}",
                                     int(time.time()) - 3600)])
    pair.hub.set_role("active")
    assert pair.hub.device.net_out == []


def test_ha_requests_need_the_setting_and_a_known_state(tmp_path, pair):
    with pytest.raises(control.ControlError, match="give master, backup, fault"):
        pair.hub.handle_control([("ha", "reboot")])
    for state_name, role in (("fault", "standby"), ("master", "active"), ("stop", "standby")):
        assert dict(pair.hub.handle_control([("ha", state_name)]))["role"] == role
    settings = state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1")
    private, _ = static_key("other")
    plain = Hub(str(tmp_path), settings, private, pair.registry)
    assert plain.role == "active"
    with pytest.raises(control.ControlError, match="no ha setting"):
        plain.handle_control([("ha", "master")])


# ---------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("ha, message", [
    ("192.0.2.1", "ha must be an object"),
    ({"start_as": "standby"}, "missing setting 'service_address'"),
    ({"service_address": "vpn.example.com"}, "bad service address"),
    ({"service_address": "192.0.2.1", "start_as": "master"}, "start_as must be"),
    ({"service_address": "192.0.2.1", "vrid": 51}, "unknown setting 'vrid'"),
])
def test_bad_ha_settings_are_refused_in_one_line(ha, message):
    with pytest.raises(state.StateError, match=message):
        state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1", ha=ha)


def test_ha_settings_round_trip_with_standby_by_default():
    s = state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1",
                          ha={"service_address": "192.0.2.1"})
    assert s.ha == {"service_address": "192.0.2.1", "start_as": "standby"}
    assert state.HubSettings.from_json(s.to_json()).ha == s.ha
    assert "ha" not in state.HubSettings(subnet="10.77.0.0/24", endpoint="x").to_json()


def test_two_state_dirs_share_one_key_file(tmp_path):
    private = keys.generate_private()
    key_file = tmp_path / "hub.key"
    keys.write_secret_file(str(key_file), keys.encode_key(private) + "\n")
    publics = []
    for name in ("a", "b"):
        settings = state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1",
                                     private_key_file=str(key_file))
        publics.append(state.init_state(str(tmp_path / name), settings))
        assert not os.path.exists(state.private_key_path(str(tmp_path / name)))
        assert state.load_private_key(str(tmp_path / name)) == private
    assert publics[0] == publics[1] == keys.encode_key(keys.public_from_private(private))
    os.chmod(key_file, 0o640)
    with pytest.raises(state.StateError, match="readable by others.*chmod 600"):
        state.load_private_key(str(tmp_path / "a"))
    with pytest.raises(state.StateError, match="readable by others"):
        state.init_state(str(tmp_path / "c"), state.HubSettings(
            subnet="10.77.0.0/24", endpoint="192.0.2.1", private_key_file=str(key_file)))
    with pytest.raises(state.StateError, match="give an absolute path"):
        state.HubSettings(subnet="10.77.0.0/24", endpoint="x", private_key_file="hub.key")
