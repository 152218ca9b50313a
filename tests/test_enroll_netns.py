"""Enrollment by invite end to end: the real hub, `pytun-client enroll` and `up` in namespaces.

    laptop namespaces --- hub (192.0.2.1, UDP 51820; pytun0 10.77.0.1/24) --- inet
    (tests/hubnet.py draws it)

The token goes to the laptop; the laptop's request and the hub's reply cross the hub's one UDP
port, the one WireGuard uses; the config the laptop writes brings a tunnel up.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess

import pytest

from pytun.common import config, enroll, keys

from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, WgGoLaptop
from .netns import ping, topology, unique, wait_until  # noqa: F401 (fixture)

pytestmark = pytest.mark.netns


def enroll_in(ns, token: str, path, *extra):
    return ns.run([PY, "-m", "pytun.client.main", "enroll", token, "-o", str(path), *extra],
                  check=False, timeout=60)


def registry_and_log(hub: Hub) -> bytes:
    out = hub.log().encode()
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(hub.state_dir, "registry.db" + suffix)
        if os.path.exists(path):
            with open(path, "rb") as f:
                out += f.read()
    return out


def invites(hub: Hub) -> dict:
    return {i["name"]: i for i in json.loads(hub.admin("invite", "--list", "--json").stdout)}


class UpLaptop:
    """`pytun-client up FILE` on the file enroll wrote, in the foreground, in `ns`."""

    def __init__(self, ns, tmp_path, path):
        self.ns, self.ifname = ns, path.stem
        env = {**os.environ, "PYTUN_RUN_DIR": str(tmp_path / f"run-{self.ifname}")}
        self.log_path = tmp_path / f"{self.ifname}.log"
        with open(self.log_path, "a") as log:
            self.proc = ns.popen([PY, "-m", "pytun.client.main", "up", str(path)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        wait_until(self._up, timeout=15, what=f"{self.ifname} up ({self.log_path})")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"client exited {self.proc.returncode}:\n"
                                 f"{self.log_path.read_text()}")
        return self.ifname in self.ns.run("ip", "-o", "link", "show", "up").stdout


def test_enroll_up_ping_and_the_token_is_spent(topology, tmp_path):
    require_tools("ping")
    hub = Hub(topology, tmp_path)
    hub.start()
    token = hub.admin("invite", "alice").stdout.strip()
    lap, _ = hub.connect_laptop()
    path = tmp_path / f"{unique('pc')}.conf"
    done = enroll_in(lap, token, path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("enrolled as alice (10.77.0.2); config written to ")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cfg = config.load(str(path))
    assert cfg.peers[0].endpoint == ("192.0.2.1", 51820)

    UpLaptop(lap, tmp_path, path)
    assert wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=10,
                      what="the enrolled laptop's tunnel")
    assert ping(lap, HUB_INNER, count=3)
    assert hub.show()["alice"]["latest_handshake"] > 0

    # The same token again, from another laptop: one line, exit 1, nothing changes.
    peers_before = hub.admin("list-peers", "--json").stdout
    invites_before = invites(hub)
    other, _ = hub.connect_laptop()
    again = tmp_path / "again.conf"
    done = enroll_in(other, token, again)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "already used" in done.stderr, done.stderr
    assert not again.exists()
    assert hub.admin("list-peers", "--json").stdout == peers_before
    assert invites(hub) == invites_before and invites_before["alice"]["state"] == "used"
    assert hub.drops().get("enroll_refused") == 1
    assert ping(lap, HUB_INNER)  # alice's tunnel did not notice

    # The hub holds alice's public key and never her private key: not in the registry's
    # files, not in its log.
    private = cfg.interface.private_key
    public = keys.encode_key(keys.public_from_private(private))
    (row,) = json.loads(peers_before)
    assert row["public_key"] == public and invites_before["alice"]["used_by"] == public
    seen = registry_and_log(hub)
    assert public.encode() in seen
    for secret in (private, keys.encode_key(private).encode(), private.hex().encode(),
                   base64.urlsafe_b64encode(private).rstrip(b"=")):
        assert secret not in seen
    parsed = enroll.parse_token(token)
    assert parsed.secret not in seen and token.encode() not in seen


def test_refused_tokens_and_a_guessing_source(topology, tmp_path):
    require_tools("ping", "wireguard-go", "wg")
    hub = Hub(topology, tmp_path)
    hub.start()
    revoked = hub.admin("invite", "bob").stdout.strip()
    hub.admin("invite", "--revoke", "bob")
    expired = hub.admin("invite", "carol", "--ttl", "1s").stdout.strip()
    right = hub.admin("invite", "dave").stdout.strip()
    t = enroll.parse_token(right)
    wrong = enroll.Token(t.hub_public, t.endpoint, t.invite_id, bytes(32), t.name).encode()
    wait_until(lambda: invites(hub)["carol"]["state"] == "expired", timeout=5,
               what="carol's invite to expire")
    lap, _ = hub.connect_laptop()

    for token, says in ((revoked, "was revoked at"), (expired, "expired at")):
        done = enroll_in(lap, token, tmp_path / "x.conf")
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert says in done.stderr and not (tmp_path / "x.conf").exists()
    assert hub.drops().get("enroll_refused") == 2

    # A wrong secret: answered, counted, logged; then that source waits (even with the right
    # token), while another source is served at once.
    done = enroll_in(lap, wrong, tmp_path / "x.conf")
    assert done.returncode == 1 and "knows no invite with this token's id" in done.stderr
    done = enroll_in(lap, right, tmp_path / "x.conf", "--timeout", "2")
    assert done.returncode == 1 and "no answer from the hub at 192.0.2.1:51820" in done.stderr
    drops = hub.drops()
    assert drops.get("enroll_bad_invite") == 1 and drops.get("enroll_rate_limited", 0) >= 1
    wrong_lines = [line for line in hub.log().splitlines()
                   if "enrollment from 198.51.100." in line and "wrong invite" in line]
    assert len(wrong_lines) == 1, hub.log()
    assert json.loads(hub.admin("list-peers", "--json").stdout) == []

    other, _ = hub.connect_laptop()
    path = tmp_path / "dave.conf"
    done = enroll_in(other, right, path)
    assert done.returncode == 0, done.stderr
    # the file is an ordinary wg-quick config: stock wireguard-go runs it
    WgGoLaptop(other, tmp_path, path.read_text(), ipv6=False)
    assert ping(other, HUB_INNER, count=2)
    assert [p["name"] for p in json.loads(hub.admin("list-peers", "--json").stdout)] == ["dave"]


def test_enroll_with_the_hub_in_its_units_sandbox_as_its_own_user(topology, tmp_path):
    """As the systemd unit runs it: User= (a free uid), its capabilities, its system call
    filter, a read-only system. Root's pytun-admin makes the allocation lock file after the hub
    started, which the hub's user then cannot open; the laptop enrolls all the same."""
    import pathlib
    import shutil
    import tempfile

    from . import sandbox
    from .test_deploy import SERVER_UNIT, parse_unit, values, words

    require_tools("unshare", "setpriv", "iptables-legacy-save", "ping")
    unit = parse_unit(SERVER_UNIT)
    caps = sandbox.unit_caps(words(unit, "Service", "CapabilityBoundingSet"))
    rw = sorted(p.lstrip("-") for p in words(unit, "Service", "ReadWritePaths"))
    syscalls = sandbox.syscall_filter(values(unit, "Service", "SystemCallFilter"))
    uid = sandbox.free_uid()
    base = pathlib.Path(tempfile.mkdtemp(prefix="pytun-hub-", dir="/tmp"))
    os.chmod(base, 0o755)

    class SandboxedHub(Hub):
        def start(self) -> None:
            for path in [self.state_dir, *(os.path.join(self.state_dir, f)
                                           for f in os.listdir(self.state_dir))]:
                os.chown(path, uid, uid)  # what StateDirectory= with User= does
            with open(self.log_path, "a") as log:
                self.proc = self.ns.popen(
                    sandbox.command(base, caps, rw, uid, [PY, "-m", "pytun.server.main",
                                                          "--state-dir", self.state_dir],
                                    syscalls=syscalls),
                    env=sandbox.sandbox_env(), stdout=log, stderr=subprocess.STDOUT)
            wait_until(self.running, timeout=15, what=f"the hub to answer ({self.log_path})")

    try:
        hub = SandboxedHub(topology, base)
        hub.start()
        hub.add_peer("carol")  # root's pytun-admin, while the hub runs: it makes the lock file
        lock = os.stat(os.path.join(hub.state_dir, "registry.db.lock"))
        assert (lock.st_uid, lock.st_mode & 0o777) == (0, 0o600)
        token = hub.admin("invite", "alice").stdout.strip()
        lap, _ = hub.connect_laptop()
        path = base / f"{unique('pc')}.conf"
        done = enroll_in(lap, token, path)
        assert done.returncode == 0, done.stderr + hub.log()
        assert "(10.77.0.3)" in done.stdout  # carol has .2
        UpLaptop(lap, base, path)
        assert wait_until(lambda: ping(lap, HUB_INNER, timeout=1), timeout=10,
                          what="the enrolled laptop's tunnel")
        assert "error" not in hub.log().lower(), hub.log()
        assert hub.stop() == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)
