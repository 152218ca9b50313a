"""Invites without root: the registry's invites, `pytun-admin invite`, the hub's enroller and
`pytun-client enroll` against a hub whose Device and Enroller serve a UDP socket on 127.0.0.1
(no TUN, no firewall). tests/test_enroll_netns.py runs the real hub and client in namespaces.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import sqlite3
import stat
import threading
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.client import enroll as client_enroll
from pytun.client import main as client_main
from pytun.common import config, enroll, keys
from pytun.server import admin, state
from pytun.server.hub import Hub
from pytun.server.registry import (SCHEMA_VERSION, Invite, InviteRefused, Peer, RegistryError,
                                   SqliteRegistry, open_registry)

SUBNET = ipaddress.ip_network("10.77.0.0/24")
HUB_IPS = {ipaddress.ip_address("10.77.0.1")}


def pub(i: int) -> str:
    return keys.encode_key(keys.public_from_private(keys.generate_private(bytes([i]) * 32)))


def new_invite(name="alice", *, ttl=3600, secret=b"s" * 32, invite_id=b"12345678", **kw):
    return Invite(id=invite_id.hex(), name=name, verifier=enroll.verifier(invite_id, secret),
                  expires=int(time.time()) + ttl, **kw)


@pytest.fixture
def reg(registry_location):
    """Once for each backend (SQLite, PostgreSQL)."""
    r = open_registry(registry_location, create=True)
    yield r
    r.close()


@pytest.fixture
def sqlite_reg(tmp_path):
    r = SqliteRegistry(str(tmp_path / "registry.db"))
    yield r
    r.close()


def snapshot(reg) -> tuple:
    return ([(p.name, p.public_key, str(p.address)) for p in reg.list()],
            [(i.id, i.used, i.used_by, i.revoked) for i in reg.invites()])


# -- the registry -------------------------------------------------------------------------------


def test_invites_table_beside_any_schema_version(tmp_path):
    path = str(tmp_path / "registry.db")
    SqliteRegistry(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE invites")
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with SqliteRegistry(path) as r:  # an existing registry gets the table when opened
        r.add_invite(new_invite())
        assert [i.name for i in r.invites()] == ["alice"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_add_list_and_one_pending_invite_per_name(reg):
    reg.add_invite(new_invite(groups=["dev"], full_tunnel=True, peer_ttl=86400))
    (i,) = reg.invites()
    assert (i.name, i.groups, i.full_tunnel, i.peer_ttl, i.state(time.time())) == \
        ("alice", ["dev"], True, 86400, "pending")
    assert "verifier" not in repr(i)
    with pytest.raises(RegistryError, match="still pending"):
        reg.add_invite(new_invite("ALICE", invite_id=b"abcdefgh"))
    reg.add(Peer(name="bob", public_key=pub(1), address="10.77.0.2"))
    with pytest.raises(RegistryError, match="a peer named 'bob' already exists"):
        reg.add_invite(new_invite("Bob", invite_id=b"abcdefgh"))
    with pytest.raises(RegistryError, match="expiry time or a lifetime"):
        new_invite(peer_ttl=1, peer_expires=2)


def test_revoke_by_name_or_id_and_only_pending(reg):
    reg.add_invite(new_invite())
    with pytest.raises(RegistryError, match="no invite named or numbered 'carol'"):
        reg.revoke_invite("carol", time.time())
    (revoked,) = reg.revoke_invite("Alice", time.time())
    assert revoked.revoked and reg.invites()[0].state(time.time()) == "revoked"
    with pytest.raises(RegistryError, match="was revoked"):
        reg.revoke_invite(revoked.id, time.time())
    # a new invite for the same name, now that the old one is not pending
    reg.add_invite(new_invite(invite_id=b"abcdefgh"))
    assert [i.id for i in reg.revoke_invite(b"abcdefgh".hex().upper(), time.time())] == \
        [b"abcdefgh".hex()]


def test_enroll_adds_the_peer_and_uses_the_invite_in_one_transaction(reg):
    reg.add_invite(new_invite())
    peer = Peer(name="alice", public_key=pub(1), address="10.77.0.2")
    now = time.time()
    reg.enroll(b"12345678".hex(), peer, subnet=SUBNET, reserved=HUB_IPS, now=now)
    (i,) = reg.invites()
    assert (i.state(now), i.used, i.used_by) == ("used", int(now), pub(1))
    assert [p.name for p in reg.list()] == ["alice"]
    before = snapshot(reg)
    # used: a second enrollment (or a replay) changes nothing, even after the peer is removed
    for p in (Peer(name="alice", public_key=pub(2), address="10.77.0.3"), peer):
        with pytest.raises(InviteRefused, match="already used"):
            reg.enroll(i.id, p, subnet=SUBNET, reserved=HUB_IPS, now=now + 1)
        assert snapshot(reg) == before
    reg.remove("alice")
    with pytest.raises(InviteRefused, match="already used"):
        reg.enroll(i.id, peer, subnet=SUBNET, reserved=HUB_IPS, now=now + 1)
    assert reg.list() == []


@pytest.mark.parametrize("how", ["expired", "revoked"])
def test_enroll_refused_for_an_expired_or_revoked_invite(reg, how):
    reg.add_invite(new_invite(ttl=10))
    now = time.time()
    if how == "revoked":
        reg.revoke_invite("alice", now)
    else:
        now += 11
    before = snapshot(reg)
    with pytest.raises(InviteRefused, match=how):
        reg.enroll(b"12345678".hex(), Peer(name="alice", public_key=pub(1), address="10.77.0.2"),
                   now=now)
    assert snapshot(reg) == before


def test_a_failed_add_leaves_the_invite_pending(reg):
    reg.add(Peer(name="bob", public_key=pub(1), address="10.77.0.2"))
    reg.add_invite(new_invite())
    with pytest.raises(RegistryError, match="already belongs to peer 'bob'"):
        reg.enroll(b"12345678".hex(), Peer(name="alice", public_key=pub(1), address="10.77.0.3"),
                   now=time.time())
    assert reg.invites()[0].state(time.time()) == "pending"
    assert [p.name for p in reg.list()] == ["bob"]


def test_allocation_lock_is_let_go_after_the_block(reg, registry_location):
    with reg.allocation_lock():
        with open_registry(registry_location) as other:
            with pytest.raises(RegistryError, match="stayed locked"):
                other.hold_allocation_lock(timeout=0.05)
    with open_registry(registry_location) as other:
        other.hold_allocation_lock(timeout=0.05)


# -- pytun-admin invite ---------------------------------------------------------------------


@pytest.fixture
def hub_dir(tmp_path, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24,fd77::/64",
                       "--endpoint", "127.0.0.1:51999", "--dns", "10.77.0.1",
                       "--route", "192.168.10.0/24"]) == 0
    capsys.readouterr()
    return d


def run_admin(capsys, d, *argv) -> tuple[int, str, str]:
    rc = admin.main(["--state-dir", d, *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def registry_bytes(d) -> bytes:
    out = b""
    for suffix in ("", "-wal", "-shm"):
        path = state.registry_path(d) + suffix
        if os.path.exists(path):
            with open(path, "rb") as f:
                out += f.read()
    return out


def test_admin_invite_prints_a_token_and_stores_only_a_hash(hub_dir, capsys):
    d = hub_dir
    rc, out, err = run_admin(capsys, d, "invite", "alice", "--ttl", "2h", "--group", "dev",
                             "--full-tunnel", "--peer-ttl", "30d")
    assert rc == 0 and len(out.splitlines()) == 1, err
    token = enroll.parse_token(out)
    assert token.name == "alice" and token.endpoint == "127.0.0.1:51999"
    assert token.hub_public == keys.decode_key(state.public_key(d))
    assert err.startswith(f"invite {token.id_hex} for alice, valid once until ")
    assert err.splitlines()[1] == "hub not running; the token works once it runs"
    stored = registry_bytes(d)
    for secret in (token.secret, token.secret[:12], base64.b64encode(token.secret),
                   out.strip().encode(), out.strip()[7:40].encode()):
        assert secret not in stored
    assert enroll.verifier(token.invite_id, token.secret) in stored
    rc, out, _ = run_admin(capsys, d, "invite", "--list", "--json")
    (row,) = json.loads(out)
    assert row["id"] == token.id_hex and row["state"] == "pending" and row["groups"] == ["dev"]
    assert row["full_tunnel"] and row["peer_ttl"] == 30 * 86400 and row["used_by"] is None
    assert 7100 < row["expires"] - time.time() <= 7200
    rc, out, _ = run_admin(capsys, d, "invite", "--list")
    assert "pending" in out and "30d after enrolling" in out and "full-tunnel,dev" in out


@pytest.mark.parametrize("argv, says", [
    (["invite"], "give the NAME to invite"),
    (["invite", "alice", "--list"], "--list takes no NAME"),
    (["invite", "alice", "--revoke", "x"], "give --revoke NAME_OR_ID alone"),
    (["invite", "alice", "--ttl", "3x"], "bad duration"),
    (["invite", "alice", "--expires", "2020-01-01T00:00:00Z"], "comes before the invite's own end"),
    (["invite", "alice", "--expires", "2099-01-01T00:00:00Z", "--peer-ttl", "1d"], "not both"),
    (["invite", "al ice"], "bad peer name"),
    (["invite", "--revoke", "nobody"], "no invite named or numbered 'nobody'"),
])
def test_admin_invite_errors_are_one_line_and_store_nothing(hub_dir, capsys, argv, says):
    rc, out, err = run_admin(capsys, hub_dir, *argv)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and says in err, err
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        assert r.invites() == []


def test_admin_revoke_and_reinvite(hub_dir, capsys):
    d = hub_dir
    run_admin(capsys, d, "invite", "alice")
    rc, out, err = run_admin(capsys, d, "invite", "alice")
    assert rc == 1 and "still pending" in err
    rc, out, _ = run_admin(capsys, d, "invite", "--revoke", "alice")
    assert rc == 0 and out.startswith("revoked invite ")
    rc, out, _ = run_admin(capsys, d, "invite", "alice", "--qr")
    assert rc == 0 and out.splitlines()[-1].startswith("pytun1:") and len(out.splitlines()) > 10


def test_admin_invite_to_a_file_makes_it_private(hub_dir, tmp_path):
    import subprocess
    import sys
    path = tmp_path / "token.txt"
    path.write_text("")
    os.chmod(path, 0o644)
    with open(path, "w") as f:
        subprocess.run([sys.executable, "-m", "pytun.server.admin", "--state-dir", hub_dir,
                        "invite", "alice"], stdout=f, check=True, timeout=60)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    enroll.parse_token(path.read_text())


# -- the hub's enroller, and pytun-client enroll against it -------------------------------------


class MiniHub:
    """A Hub (not run: no TUN, no firewall) whose Device takes datagrams from a UDP socket on
    127.0.0.1 and whose Enroller runs, in trio, in a thread of its own."""

    def __init__(self, state_dir: str, sock: socket.socket):
        self.registry = SqliteRegistry(state.registry_path(state_dir))
        self.hub = Hub(state_dir, state.load_settings(state_dir),
                       state.load_private_key(state_dir), self.registry)
        self.hub.sync()
        self.sock = sock
        self.sock.setblocking(False)
        self._token = None
        self._cancel = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        assert self._ready.wait(10)

    @property
    def drops(self):
        return self.hub.device.drops

    async def _main(self):
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            await nursery.start(self.hub.enroller.run)
            nursery.start_soon(self._serve)
            self._ready.set()

    async def _serve(self):
        device = self.hub.device
        while True:
            with trio.move_on_after(0.01):
                await trio.lowlevel.wait_readable(self.sock)
            while True:
                try:
                    data, src = self.sock.recvfrom(2048)
                except BlockingIOError:
                    break
                device.receive(memoryview(data), src, time.monotonic())
            out, device.net_out = device.net_out, []
            for datagram, dst in out:
                self.sock.sendto(datagram, dst)

    def close(self):
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)
        self.sock.close()
        self.registry.close()


@pytest.fixture
def mini(tmp_path, capsys):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24,fd77::/64",
                       "--endpoint", f"127.0.0.1:{port}", "--dns", "10.77.0.1",
                       "--route", "192.168.10.0/24"]) == 0
    capsys.readouterr()
    m = MiniHub(d, sock)
    m.state_dir = d
    yield m
    m.close()


def invite(capsys, d, *argv) -> str:
    rc, out, err = run_admin(capsys, d, "invite", *argv)
    assert rc == 0, err
    return out.strip()


HUB_LINES = ("enrollment from", "enrolled with invite")
hub_log: list[str] = []


def run_client(capsys, *argv) -> tuple[int, str, str]:
    """rc, stdout, stderr of pytun-client; the MiniHub's log lines, which land on the same
    stderr in this one process (the client sets up the "pytun" logger), go to hub_log."""
    rc = client_main.main(list(argv))
    cap = capsys.readouterr()
    lines = cap.err.splitlines(keepends=True)
    hub_log.extend(line for line in lines if any(m in line for m in HUB_LINES))
    err = "".join(line for line in lines if not any(m in line for m in HUB_LINES))
    return rc, cap.out, err


def test_enroll_writes_a_config_the_hub_accepts(mini, capsys, tmp_path):
    token = invite(capsys, mini.state_dir, "alice", "--group", "dev", "--peer-ttl", "30d")
    path = tmp_path / "alice.conf"
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(path))
    assert rc == 0, err
    assert out.strip() == (f"enrolled as alice (10.77.0.2, fd77::2); config written to {path} "
                           f"(mode 0600); start it with: pytun-client up {path}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cfg = config.load(str(path))
    private = cfg.interface.private_key
    (hub_peer,) = cfg.peers
    assert hub_peer.public_key == keys.decode_key(state.public_key(mini.state_dir))
    assert hub_peer.endpoint == ("127.0.0.1", mini.sock.getsockname()[1])
    assert [str(a) for a in cfg.interface.addresses] == ["10.77.0.2/32", "fd77::2/128"]
    assert [str(n) for n in hub_peer.allowed_ips] == ["10.77.0.0/24", "fd77::/64",
                                                      "192.168.10.0/24"]
    assert [str(x) for x in cfg.interface.dns] == ["10.77.0.1"]
    assert hub_peer.persistent_keepalive == 25
    # the registry holds the laptop's public key, and never its private key
    peer = mini.registry.get("alice")
    assert peer.public_key == keys.encode_key(keys.public_from_private(private))
    assert peer.groups == ["dev"] and 30 * 86400 - 60 < peer.expires - time.time() <= 30 * 86400
    stored = registry_bytes(mini.state_dir)
    assert private not in stored and keys.encode_key(private).encode() not in stored
    # the running hub took the peer at once
    assert "alice" in mini.hub.peers
    (i,) = mini.registry.invites()
    assert i.state(time.time()) == "used" and i.used_by == peer.public_key
    assert mini.hub.enroller.enrolled == 1


def test_second_enroll_with_the_same_token_fails_and_changes_nothing(mini, capsys, tmp_path):
    token = invite(capsys, mini.state_dir, "alice")
    assert run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"))[0] == 0
    before = snapshot(mini.registry)
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "b.conf"))
    assert rc == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("pytun-client: error: the hub refused: invite ") and "already used" in err
    assert not (tmp_path / "b.conf").exists()
    assert snapshot(mini.registry) == before
    assert mini.drops["enroll_refused"] == 1


@pytest.mark.parametrize("how", ["revoke", "expire"])
def test_revoked_or_expired_token_fails(mini, capsys, tmp_path, how):
    token = invite(capsys, mini.state_dir, "alice", "--ttl", "1s" if how == "expire" else "1h")
    if how == "revoke":
        assert run_admin(capsys, mini.state_dir, "invite", "--revoke", "alice")[0] == 0
    else:
        time.sleep(1.1)  # the invite's one second runs out
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"))
    assert rc == 1 and len(err.splitlines()) == 1
    assert ("was revoked" if how == "revoke" else "expired at") in err
    assert mini.registry.list() == [] and not (tmp_path / "a.conf").exists()


def forged(token_text: str) -> str:
    """The same invite id with another secret, and a checksum that matches."""
    t = enroll.parse_token(token_text)
    return enroll.Token(t.hub_public, t.endpoint, t.invite_id, bytes(32), t.name).encode()


def test_a_wrong_secret_is_counted_answered_and_its_source_waits(mini, capsys, tmp_path):
    token = invite(capsys, mini.state_dir, "alice")
    hub_log.clear()
    rc, _, err = run_client(capsys, "enroll", forged(token), "-o", str(tmp_path / "a.conf"))
    assert rc == 1 and "knows no invite with this token's id and secret" in err
    assert mini.drops["enroll_bad_invite"] == 1
    # the next request from 127.0.0.1 (even the right token) waits its turn: no answer
    rc, _, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"),
                            "--timeout", "1.5")
    assert rc == 1 and "no answer from the hub" in err
    assert mini.drops["enroll_rate_limited"] >= 1 and mini.drops["enroll_bad_invite"] == 1
    assert mini.registry.list() == []
    (line,) = hub_log  # logged once
    assert "enrollment from 127.0.0.1:" in line and "wrong invite" in line


def test_the_output_file_is_checked_before_the_invite_is_spent(mini, capsys, tmp_path):
    token = invite(capsys, mini.state_dir, "alice")
    path = tmp_path / "alice.conf"
    path.write_text("mine\n")
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(path))
    assert rc == 1 and "exists; give another -o FILE, or --force" in err
    assert path.read_text() == "mine\n" and mini.registry.invites()[0].used is None
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(path), "--force")
    assert rc == 0 and config.load(str(path)).interface.addresses


def test_default_output_is_named_after_the_invite(mini, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = invite(capsys, mini.state_dir, "dave@corp.example.com")
    assert client_enroll.default_output("dave@corp.example.com") == "dave-corp.examp.conf"
    assert run_client(capsys, "enroll", token)[0] == 0
    assert config.load(str(tmp_path / "dave-corp.examp.conf")).interface.private_key


def test_token_from_stdin(mini, capsys, tmp_path, monkeypatch):
    import io
    token = invite(capsys, mini.state_dir, "alice")
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert run_client(capsys, "enroll", "-", "-o", str(tmp_path / "a.conf"))[0] == 0


@pytest.mark.parametrize("token, says", [
    ("nonsense", "not a pytun invite token"),
    ("pytun1:AAAA", "too short"),
])
def test_client_token_errors_are_one_line(capsys, tmp_path, token, says):
    rc, out, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"))
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and says in err
    assert not (tmp_path / "a.conf").exists()


def test_no_hub_listening_is_one_line_after_the_timeout(capsys, tmp_path):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: ICMP port unreachable
    token = enroll.Token(keys.public_from_private(keys.generate_private()),
                         f"127.0.0.1:{port}", bytes(8), bytes(32), "alice").encode()
    start = time.monotonic()
    rc, _, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"),
                            "--timeout", "1.2")
    assert 1.1 < time.monotonic() - start < 5
    assert rc == 1 and len(err.splitlines()) == 1 and "nothing listens on that UDP port" in err
    assert not (tmp_path / "a.conf").exists()


# -- the enroller's data-path side --------------------------------------------------------------


def request_for(token_text: str, laptop: bytes | None = None, e: bytes | None = None):
    laptop = laptop or keys.generate_private()
    return enroll.create_request(enroll.parse_token(token_text), laptop, e or os.urandom(32))


def test_wireguard_types_are_untouched_and_other_junk_still_counted(hub_dir):
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        hub = Hub(hub_dir, state.load_settings(hub_dir), state.load_private_key(hub_dir), r)
        seen = []
        hub.device.other_handler = lambda *a: seen.append(a) or False
        hub.device.receive(b"\x01" + bytes(147), ("198.51.100.2", 1), 0.0)  # initiation
        hub.device.receive(b"\x04" + bytes(40), ("198.51.100.2", 1), 0.0)  # transport
        assert seen == [] and hub.device.drops["bad_mac1"] == 1
        hub.device.receive(b"\x07\0\0\0" + bytes(40), ("198.51.100.2", 1), 0.0)
        assert len(seen) == 1 and hub.device.drops["bad_type"] == 1


def test_enroller_on_the_data_path(hub_dir, capsys):
    token = invite(capsys, hub_dir, "alice")
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        hub = Hub(hub_dir, state.load_settings(hub_dir), state.load_private_key(hub_dir), r)
        device, enroller, src = hub.device, hub.enroller, ("198.51.100.2", 40000)
        data, pending = request_for(token)
        # not running yet: counted as busy, nothing queued
        device.receive(data, src, 0.0)
        assert device.drops["enroll_busy"] == 1 and not enroller._pending
        # wrong length, wrong mac1 (another hub's token): counted before any X25519
        device.receive(data[:-1], src, 0.0)
        device.receive(data[:-16] + bytes(16), src, 0.0)
        assert device.drops["enroll_bad_length"] == 1 and device.drops["enroll_bad_mac1"] == 1
        outcome = enroller.handle(data, time.time())
        assert outcome.enrolled is not None and outcome.drop is None
        ok, text = enroll.open_reply_untrusted(pending, outcome.reply)
        assert ok and "Address = 10.77.0.2/32, fd77::2/128" in text and "PrivateKey" not in text
        # the same bytes again (a replay, or a retry whose reply was lost): nothing changes
        before = snapshot(r)
        again = enroller.handle(data, time.time())
        assert again.enrolled is None and again.drop == "enroll_refused"
        assert snapshot(r) == before
        ok, text = enroll.open_reply_untrusted(pending, again.reply)
        assert not ok and "already used" in text
        # an unreadable request is counted and not answered
        junk = bytes([enroll.MSG_REQUEST, 0, 0, 0]) + os.urandom(enroll.REQUEST_LEN - 20)
        junk += enroll.mac1_key(device.public_key)[:0]
        from pytun.common.crypto import MAC
        junk += MAC(enroll.mac1_key(device.public_key), junk)
        bad = enroller.handle(junk, time.time())
        assert bad.reply is None and bad.drop == "enroll_bad_request"


def test_a_lost_reply_is_answered_again_from_memory(hub_dir, capsys):
    """Through trio: the first request enrolls; its exact repeat gets the same reply bytes."""
    token = invite(capsys, hub_dir, "alice")
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        hub = Hub(hub_dir, state.load_settings(hub_dir), state.load_private_key(hub_dir), r)
        device, src = hub.device, ("198.51.100.2", 40000)
        data, pending = request_for(token)

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.enroller.run)
                device.receive(data, src, time.monotonic())
                device.receive(data, src, time.monotonic())  # a retransmission, in progress
                while not device.net_out:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

        trio.run(main)
        ((reply, dst),) = device.net_out
        assert dst == src and enroll.open_reply_untrusted(pending, reply)[0]
        device.net_out.clear()
        before = snapshot(r)
        device.receive(data, ("198.51.100.9", 5), time.monotonic())  # the reply was lost
        assert device.net_out == [(reply, ("198.51.100.9", 5))]
        assert snapshot(r) == before and hub.enroller.enrolled == 1
        assert "alice" in hub.peers


def test_failed_enrollments_are_logged_once_per_source_per_few_seconds(hub_dir):
    import logging
    from pytun.server import invites

    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("pytun")
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        hub = Hub(hub_dir, state.load_settings(hub_dir), state.load_private_key(hub_dir), r)
        clock = [100.0]
        hub.enroller.monotonic = lambda: clock[0]
        logger.addHandler(handler)
        try:
            for t in (100.0, 101.0, 103.0, 100.0 + invites.LOG_EVERY + 0.1):
                clock[0] = t
                hub.enroller._log_limited(("198.51.100.2", 1000 + int(t)), "wrong", "wrong invite")
            hub.enroller._log_limited(("198.51.100.3", 1), "wrong", "wrong invite")
            hub.enroller._log_limited(("198.51.100.2", 1), "refused", "invite used")
        finally:
            logger.removeHandler(handler)
    assert lines == [
        "enrollment from 198.51.100.2:1100 refused: wrong invite",
        "enrollment from 198.51.100.2:1105 refused: wrong invite (2 more from there not logged)",
        "enrollment from 198.51.100.3:1 refused: wrong invite",
        "enrollment from 198.51.100.2:1 refused: invite used"]


def test_a_lock_file_of_another_user_does_not_stop_enrollment(sqlite_reg, tmp_path, monkeypatch):
    """pytun-admin (root) made registry.db.lock, 0600, and the hub runs as its own user, which
    cannot open it: the hub enrolls all the same, and add() still refuses a taken address."""
    from pytun.server import registry as registry_module
    with SqliteRegistry(str(tmp_path / "registry.db")) as admin_side:
        admin_side.hold_allocation_lock()  # the file exists now
    lock = str(tmp_path / "registry.db.lock")
    real_access = os.access
    monkeypatch.setattr(registry_module.os, "access",
                        lambda p, mode: False if p == lock else real_access(p, mode))
    with sqlite_reg.allocation_lock(timeout=0.1):
        address = sqlite_reg.allocate_address(SUBNET, HUB_IPS)
        with SqliteRegistry(str(tmp_path / "registry.db")) as other:  # a concurrent add-peer
            other.hold_allocation_lock(timeout=0.05)  # free: the hub could not take it
            other.add(Peer(name="bob", public_key=pub(2), address=address))
        with pytest.raises(RegistryError, match="already used by peer 'bob'"):
            sqlite_reg.add(Peer(name="alice", public_key=pub(1), address=address))
    assert [p.name for p in sqlite_reg.list()] == ["bob"]


def test_enroll_over_an_ipv6_underlay(tmp_path, capsys):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.bind(("::1", 0))
    except OSError:
        sock.close()
        pytest.skip("no IPv6 loopback here")
    port = sock.getsockname()[1]
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24",
                       "--endpoint", f"[::1]:{port}"]) == 0
    capsys.readouterr()
    m = MiniHub(d, sock)
    try:
        token = invite(capsys, d, "alice")
        assert enroll.parse_token(token).endpoint == f"[::1]:{port}"
        rc, out, err = run_client(capsys, "enroll", token, "-o", str(tmp_path / "a.conf"))
        assert rc == 0, err
        assert config.load(str(tmp_path / "a.conf")).peers[0].endpoint == ("::1", port)
        assert m.registry.get("alice").address == ipaddress.ip_interface("10.77.0.2/32")
    finally:
        m.close()


# -- single use, expiry and revocation against a model ----------------------------------------

INVITES = {"a": 10, "b": 20, "c": 30}  # name -> the invite's expiry (seconds)
ACTIONS = st.lists(st.one_of(
    st.tuples(st.just("enroll"), st.sampled_from(sorted(INVITES)), st.integers(1, 4),
              st.integers(0, 35)),
    st.tuples(st.just("revoke"), st.sampled_from(sorted(INVITES)), st.just(0),
              st.integers(0, 35)),
    st.tuples(st.just("remove"), st.sampled_from(sorted(INVITES)), st.just(0), st.just(0)),
), max_size=10)


@settings(max_examples=40, deadline=None)
@given(ACTIONS)
def test_invites_follow_the_model(actions):
    """Whatever the order of enrollments (with any of four laptop keys), revocations, peer
    removals and times: an invite enrolls once at most, never after its expiry or revocation,
    and a refused enrollment changes nothing."""
    import tempfile
    with tempfile.TemporaryDirectory() as d, SqliteRegistry(os.path.join(d, "r.db")) as r:
        ids = {}
        for n, (name, expires) in enumerate(sorted(INVITES.items())):
            ids[name] = bytes([n]) * 8
            r.add_invite(Invite(id=ids[name].hex(), name=name, verifier=bytes(32),
                                expires=expires, created=0))
        used, revoked, peers = set(), set(), {}  # the model: invites used, revoked; name -> key
        for what, name, key, t in actions:
            before = snapshot(r)
            if what == "enroll":
                ok = (name not in used and name not in revoked and t < INVITES[name]
                      and name not in peers and pub(key) not in peers.values())
                peer = Peer(name=name, public_key=pub(key),
                            address=r.allocate_address(SUBNET, HUB_IPS))
                try:
                    r.enroll(ids[name].hex(), peer, subnet=SUBNET, reserved=HUB_IPS, now=t)
                    done = True
                except RegistryError:
                    done = False
                assert done == ok, (what, name, key, t)
                if ok:
                    used.add(name)
                    peers[name] = pub(key)
            elif what == "revoke":
                ok = name not in used and name not in revoked and t < INVITES[name]
                try:
                    r.revoke_invite(name, t)
                    done = True
                except RegistryError:
                    done = False
                assert done == ok, (what, name, t)
                if ok:
                    revoked.add(name)
            elif name in peers:
                r.remove(name)
                del peers[name]
            if what != "remove" and not ok:
                assert snapshot(r) == before
            assert {p.name: p.public_key for p in r.list()} == peers
            assert {i.name for i in r.invites() if i.used is not None} == used
            assert {i.name for i in r.invites() if i.revoked is not None} == revoked


def test_a_flood_from_many_sources_gets_a_bounded_rate_to_the_x25519_work(hub_dir, capsys):
    from pytun.server import invites
    token = invite(capsys, hub_dir, "alice")
    with SqliteRegistry(state.registry_path(hub_dir)) as r:
        hub = Hub(hub_dir, state.load_settings(hub_dir), state.load_private_key(hub_dir), r)
        enroller, device = hub.enroller, hub.device
        enroller._token = type("Token", (), {"run_sync_soon": lambda self, fn: None})()
        enroller._wake = None
        data = [request_for(token, e=bytes([i]) * 32)[0] for i in range(60)]
        # 60 sources (each within its own rate) in the same second: a burst of MAX_BURST
        # gets queued (MAX_PENDING bounds the queue too), the rest is busy
        for i, d in enumerate(data):
            device.receive(d, (f"198.51.100.{i + 1}", 1000), 50.0)
        queued = len(enroller._pending)
        assert queued == min(invites.MAX_BURST, invites.MAX_PENDING)
        assert device.drops["enroll_busy"] == 60 - queued
        enroller._pending.clear()
        # a second later, MAX_RATE more
        more = [request_for(token, e=bytes([100 + i]) * 32)[0] for i in range(30)]
        for i, d in enumerate(more):
            device.receive(d, (f"203.0.113.{i + 1}", 1000), 51.0)
        assert len(enroller._pending) == invites.MAX_RATE
