"""pytun-client without root: the command line, one-line errors, route plans, DNS calls,
runtime files, and the re-resolution logic with a fake resolver. test_client_netns.py runs it
against a real hub."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing

from pytun.common import __version__, config, keys
from pytun.common.device import Device
from pytun.common.driver import open_udp
from pytun.client import dns, hooks, main as cli, resolve, routes, runtime, tunnel
from pytun.client.routes import MAIN_TABLE, Route, Rule
from pytun.common.peer import Event

N = ipaddress.ip_network
PRIV = keys.generate_private(bytes(range(32)))
HUB_PRIV = keys.generate_private(bytes(range(1, 33)))
HUB = keys.public_from_private(HUB_PRIV)
B = keys.encode_key


def conf(endpoint="192.0.2.1:51820", allowed="10.77.0.0/24, 203.0.113.0/24", extra="",
         peer_extra="") -> str:
    return (f"[Interface]\nPrivateKey = {B(PRIV)}\nAddress = 10.77.0.2/32\n{extra}"
            f"\n[Peer]\nPublicKey = {B(HUB)}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n"
            f"PersistentKeepalive = 25\n{peer_extra}")


@pytest.fixture(autouse=True)
def private_files():
    """Config files written here are 0600, as add-peer writes them: no readability warning."""
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("PYTUN_RUN_DIR", str(d))
    return d


@pytest.fixture
def messages():
    """What the client logged, as text lines (main() turns propagation off)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(f"{record.levelname}: {record.getMessage()}")

    logger = logging.getLogger("pytun")
    saved = logger.handlers[:], logger.level
    logger.handlers[:] = [Keep()]
    logger.setLevel(logging.DEBUG)
    yield lines
    logger.handlers[:], level = saved
    logger.setLevel(level)


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pytun-client: error: "), err
    return err[len("pytun-client: error: "):].rstrip("\n")


# ---------------------------------------------------------------------------------- CLI


def test_version_and_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pytun-client {__version__}\n"
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("up", "down", "status"))
    assert cli.main(["up", "--help"]) == 0
    assert "--interface NAME" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["up"]) == 2
    assert cli.main(["launch"]) == 2
    assert "usage: pytun-client" in capsys.readouterr().err


def test_the_installed_script_runs():
    done = subprocess.run([sys.executable, "-m", "pytun.client.main", "--version"],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"pytun-client {__version__}\n")


@pytest.mark.parametrize("path, name", [
    ("alice.conf", "alice"), ("/etc/wireguard/wg0.conf", "wg0"),
    ("a.b_c=d+e-f.conf", "a.b_c=d+e-f"),
    ("./123456789012345.conf", "123456789012345"),
])
def test_interface_from_the_file_name(path, name):
    assert cli.interface_from_path(path) == name


@pytest.mark.parametrize("path", ["alice", "alice.txt", "a b.conf", "x" * 16 + ".conf",
                                  ".conf", "dir/al:ce.conf"])
def test_interface_name_refused(path):
    with pytest.raises(cli.ClientError, match="cannot name the interface .*--interface NAME"):
        cli.interface_from_path(path)


def test_bad_interface_option_is_one_line(tmp_path, capsys):
    path = tmp_path / "alice.conf"
    path.write_text(conf())
    assert cli.main(["up", str(path), "--interface", "way-too-long-name"]) == 1
    assert one_error(capsys).startswith("bad interface name 'way-too-long-name'")


@pytest.mark.parametrize("text, expected", [
    (conf(extra="Colour = blue\n"), ":4: unknown key 'Colour' in [Interface]"),
    (conf(extra="just words\n"), ":4: expected `Key = value`, got 'just words'"),
    (conf().replace(f"PrivateKey = {B(PRIV)}", f"PrivateKey {B(PRIV)}"),
     ":2: unknown key 'PrivateKey <redacted>' in [Interface]"),
    (conf().replace(B(HUB), "c2hvcnQ="), ":6: PublicKey must be 44 characters of base64"),
    (conf().replace(B(PRIV), "<the private key that goes with xyz>"),
     ":2: PrivateKey is a placeholder"),
    (conf(endpoint="no port here"), ":7: endpoint 'no port here' must look like host:port"),
    (conf(peer_extra=f"\n[Peer]\nPublicKey = {B(keys.public_from_private(PRIV))}\n"),
     ":11: a second [Peer]; pytun-client supports exactly one peer (the hub)"),
    ("[Interface]\nPrivateKey = " + B(PRIV) + "\n",
     ": no [Peer] section; pytun-client needs exactly one (the hub)"),
    (conf(extra="Table = vpn\n"),
     ":4: Table = vpn: pytun-client accepts auto, off, main or a table number"),
])
def test_bad_config_is_one_line_with_its_place(tmp_path, capsys, text, expected):
    path = tmp_path / "alice.conf"
    path.write_text(text)
    assert cli.main(["up", str(path)]) == 1
    message = one_error(capsys)
    assert message.startswith(str(path) + expected), message
    assert B(PRIV) not in message


def test_missing_config_file(tmp_path, capsys):
    assert cli.main(["up", str(tmp_path / "nope.conf")]) == 1
    assert one_error(capsys) == (f"{tmp_path / 'nope.conf'}: cannot read: "
                                 "No such file or directory")


def test_no_tun_device_or_no_privilege(tmp_path, capsys, monkeypatch):
    path = tmp_path / "alice.conf"
    path.write_text(conf())
    monkeypatch.setattr(cli, "TUN_DEVICE", str(tmp_path / "no-tun"))
    assert cli.main(["up", str(path)]) == 1
    assert one_error(capsys) == (f"no {tmp_path / 'no-tun'}: the tun module is not loaded "
                                 "(modprobe tun)")
    monkeypatch.setattr(cli, "TUN_DEVICE", str(path))
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(cli, "_has_cap_net_admin", lambda: False)
    assert cli.main(["up", str(path)]) == 1
    assert one_error(capsys) == "pytun-client up needs root (or CAP_NET_ADMIN)"


# ---------------------------------------------------------------------------------- down / status


def test_status_and_down_with_nothing_up(run_dir, capsys):
    assert cli.main(["status"]) == 0
    assert capsys.readouterr().err == "pytun-client: no tunnels are up\n"
    assert cli.main(["status", "--json"]) == 0
    assert capsys.readouterr().out == "[]\n"
    assert cli.main(["status", "alice"]) == 1
    assert one_error(capsys) == "alice is not up"
    assert cli.main(["down", "alice"]) == 1
    assert one_error(capsys) == f"alice is not up (nothing in {run_dir})"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_down_cleans_up_after_a_dead_client(run_dir, capsys, tmp_path):
    run_dir.mkdir()
    config_path = tmp_path / "alice.conf"
    config_path.write_text(conf())
    state = {"version": 1, "pid": dead_pid(), "start_time": "1", "interface": "alice",
             "config": str(config_path), "link": False, "plan": None, "dns": None}
    runtime.write_state(str(run_dir / "alice.json"), state)
    assert cli.main(["status", "alice"]) == 1
    assert "is not running" in one_error(capsys)
    assert cli.main(["status"]) == 0  # all tunnels: a dead one is a line, not a failure
    assert capsys.readouterr().out.startswith("interface: alice (alice is not running (pid ")
    assert cli.main(["down", str(config_path)]) == 0  # found by its config file
    err = capsys.readouterr().err
    assert "was not stopped cleanly" in err and err.endswith("pytun-client: alice is down\n")
    assert os.listdir(run_dir) == []


def test_state_files(tmp_path):
    path = str(tmp_path / "x.json")
    me = {"version": 1, "pid": os.getpid(), "start_time": runtime.process_start_time(os.getpid())}
    runtime.write_state(path, me)
    assert runtime.read_state(path) == me
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert runtime.is_running(me)
    assert not runtime.is_running({**me, "start_time": "12"})  # a recycled PID
    assert not runtime.is_running({**me, "pid": dead_pid()})
    assert runtime.read_state(str(tmp_path / "none.json")) is None
    (tmp_path / "bad.json").write_text('{"version": 9}')
    with pytest.raises(runtime.TunnelError, match="not a pytun-client state file"):
        runtime.read_state(str(tmp_path / "bad.json"))


def test_status_text():
    text = cli.format_status({
        "interface": "alice", "pid": 7, "state": "up", "public_key": "PUB",
        "address": "10.77.0.2/32",
        "hub": "vpn.example.com:51820", "endpoint": "192.0.2.1:51820", "latest_handshake": 1000,
        "rx_bytes": 2048, "tx_bytes": 100, "persistent_keepalive": 25, "full_tunnel": 1}, now=1065)
    assert text == (
        "interface: alice (pid 7, up)\n"
        "  public key: PUB\n"
        "  address: 10.77.0.2/32\n"
        "hub: vpn.example.com:51820\n"
        "  endpoint: 192.0.2.1:51820\n"
        "  latest handshake: 1 minute, 5 seconds ago\n"
        "  transfer: 2.00 KiB received, 100 B sent\n"
        "  persistent keepalive: every 25 seconds\n"
        "  routing: full tunnel\n")


# ---------------------------------------------------------------------------------- route plans


def test_split_tunnel_plan():
    plan = routes.plan_routes([N("10.77.0.0/24"), N("203.0.113.0/24"), N("10.77.0.0/24")],
                              ["10.77.0.2/32"])
    assert plan.routes == [Route(N("10.77.0.0/24")), Route(N("203.0.113.0/24"))]
    assert (plan.rules, plan.fwmark, plan.full_tunnel, plan.src_valid_mark) == ([], 0, (), False)


def test_the_address_prefix_route_is_not_added_twice():
    plan = routes.plan_routes([N("10.77.0.0/24"), N("10.0.0.0/8"), N("fd77::/64")],
                              ["10.77.0.2/24", "fd77::2/64"])
    assert plan.routes == [Route(N("10.0.0.0/8"))]


def test_full_tunnel_plan_is_wg_quicks_and_fails_closed():
    plan = routes.plan_routes([N("0.0.0.0/0"), N("::/0"), N("10.77.0.0/24")],
                              ["10.77.0.2/32", "fd77::2/128"])
    # wg-quick's routes, each default followed by an unreachable one behind it, which stays
    # when the TUN device (and the route through it) is gone.
    assert plan.routes == [Route(N("10.77.0.0/24")), Route(N("0.0.0.0/0"), 51820),
                           Route(N("0.0.0.0/0"), 51820, unreachable=True),
                           Route(N("::/0"), 51820), Route(N("::/0"), 51820, unreachable=True)]
    assert str(plan.routes[2]) == "unreachable 0.0.0.0/0 table 51820 metric 4294967295"
    assert plan.rules == [
        Rule(4, 51820, 32765, fwmark=51820, invert=True),
        Rule(4, MAIN_TABLE, 32764, suppress_prefixlength=0),
        Rule(6, 51820, 32765, fwmark=51820, invert=True),
        Rule(6, MAIN_TABLE, 32764, suppress_prefixlength=0),
    ]
    assert [str(r) for r in plan.rules[:2]] == [
        "-4 pref 32765 not fwmark 51820 table 51820",
        "-4 pref 32764 table main suppress_prefixlength 0"]
    assert (plan.fwmark, plan.full_tunnel, plan.guard) == (51820, (4, 6),
                                                           ("10.77.0.2", "fd77::2"))
    assert plan.src_valid_mark and plan.blocked == ()


def test_full_tunnel_takes_a_free_table_or_the_configured_fwmark():
    plan = routes.plan_routes(["0.0.0.0/0"], used_tables={51820, 51821, 254},
                              lowest_priority={4: 1000}, src_valid_mark="1", ipv6=False)
    assert plan.routes == [Route(N("0.0.0.0/0"), 51822),
                           Route(N("0.0.0.0/0"), 51822, unreachable=True)]
    assert plan.rules == [Rule(4, 51822, 999, fwmark=51822, invert=True),
                          Rule(4, MAIN_TABLE, 998, suppress_prefixlength=0)]
    assert plan.fwmark == 51822 and not plan.src_valid_mark and plan.full_tunnel == (4,)
    plan = routes.plan_routes(["::/0"], fwmark=0x1234, used_tables={0x1234})
    assert plan.routes == [Route(N("::/0"), 0x1234), Route(N("::/0"), 0x1234, unreachable=True)]
    assert plan.fwmark == 0x1234
    assert plan.rules[0] == Rule(6, 0x1234, 32765, fwmark=0x1234, invert=True)
    assert plan.guard == () and not plan.src_valid_mark  # IPv4 only


def test_an_ipv4_only_full_tunnel_refuses_ipv6_rather_than_leak_it():
    plan = routes.plan_routes(["0.0.0.0/0"], ["10.77.0.2/32"], lowest_priority={6: 1000})
    assert plan.full_tunnel == (4,) and plan.blocked == (6,)
    assert plan.routes == [Route(N("0.0.0.0/0"), 51820),
                           Route(N("0.0.0.0/0"), 51820, unreachable=True),
                           Route(N("::/0"), 51820, unreachable=True)]  # no IPv6 via the tunnel
    assert plan.rules[2:] == [Rule(6, 51820, 999, fwmark=51820, invert=True),
                              Rule(6, MAIN_TABLE, 998, suppress_prefixlength=0)]
    assert "ip6" not in routes.nft_script(plan, "alice")
    assert routes.plan_routes(["0.0.0.0/0"], ipv6=False).blocked == ()
    assert routes.plan_routes(["0.0.0.0/0", "10.0.0.0/8"], table="off").blocked == ()


def test_a_full_tunnel_without_dns_is_warned_about():
    full = routes.plan_routes(["0.0.0.0/0", "::/0"], ["10.77.0.2/32"])
    assert "full tunnel without DNS" in routes.dns_warning(full, [])
    assert routes.dns_warning(full, [ipaddress.ip_address("10.77.0.1")]) is None
    assert routes.dns_warning(routes.plan_routes(["10.77.0.0/24"]), []) is None


def test_table_setting():
    nets = ["0.0.0.0/0", "10.77.0.0/24"]
    assert routes.plan_routes(nets, table="off").routes == []
    plan = routes.plan_routes(nets, table="1234", fwmark=7)
    assert plan.routes == [Route(N("10.77.0.0/24"), 1234), Route(N("0.0.0.0/0"), 1234)]
    assert (plan.rules, plan.fwmark) == ([], 7)
    assert routes.plan_routes(nets, table="main").routes[1] == Route(N("0.0.0.0/0"), 254)
    assert routes.plan_routes(nets, table="auto").rules
    with pytest.raises(routes.PlanError):
        routes.plan_routes(nets, table="vpn")


def test_plan_survives_the_state_file():
    plan = routes.plan_routes(["0.0.0.0/0", "::/0", "10.1.0.0/16"], ["10.77.0.2/32"])
    again = routes.Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and any(r.unreachable for r in again.routes)
    # A state file written before the unreachable routes existed still reads.
    old = plan.to_json()
    for r in old["routes"]:
        del r["unreachable"]
    assert routes.Plan.from_json(old).routes[1] == Route(N("0.0.0.0/0"), 51820)


def test_nft_rules_for_a_full_tunnel():
    plan = routes.plan_routes(["0.0.0.0/0"], ["10.77.0.2/32"])
    script = routes.nft_script(plan, "alice")
    assert script.splitlines() == [
        "add table ip pytun-alice",
        "add chain ip pytun-alice preraw { type filter hook prerouting priority -300; }",
        "add chain ip pytun-alice premangle { type filter hook prerouting priority -150; }",
        "add chain ip pytun-alice postmangle { type filter hook postrouting priority -150; }",
        'add rule ip pytun-alice preraw iifname != "alice" ip daddr 10.77.0.2 fib saddr type '
        "!= local drop",
        "add rule ip pytun-alice postmangle meta l4proto udp mark 51820 ct mark set mark",
        "add rule ip pytun-alice premangle meta l4proto udp meta mark set ct mark",
    ]
    assert routes.nft_script(routes.plan_routes(["10.0.0.0/8"]), "alice") == ""
    # IPv6 tunnel addresses are guarded the same way.
    plan = routes.plan_routes(["0.0.0.0/0", "::/0"], ["10.77.0.2/32", "fd77::2/128"])
    guards = [line for line in routes.nft_script(plan, "alice").splitlines() if "drop" in line]
    assert guards == [
        'add rule ip pytun-alice preraw iifname != "alice" ip daddr 10.77.0.2 fib saddr type '
        "!= local drop",
        'add rule ip6 pytun-alice preraw iifname != "alice" ip6 daddr fd77::2 fib saddr type '
        "!= local drop"]


def test_hub_inside_allowed_ips_is_found():
    nets = [N("10.0.0.0/8"), N("192.0.2.0/24")]
    assert routes.covering(nets, "::ffff:192.0.2.1") == N("192.0.2.0/24")
    assert routes.covering(nets, "198.51.100.1") is None


# ---------------------------------------------------------------------------------- DNS


class Runner:
    def __init__(self, returncode=0):
        self.calls = []
        self.returncode = returncode

    def __call__(self, argv, input=None, **kw):
        self.calls.append((argv, input))
        return subprocess.CompletedProcess(argv, self.returncode, "", "it broke\n")


def which_only(*tools):
    return lambda name: f"/usr/bin/{name}" if name in tools else None


def test_dns_through_resolvconf(tmp_path):
    run = Runner()
    order = tmp_path / "interface-order"
    order.write_text("lo.inet*\ntun*\neth*\n")
    record, warning = dns.apply("alice", [ipaddress.ip_address("10.77.0.1")], ["corp.example"],
                                run=run, which=which_only("resolvconf", "resolvectl"),
                                interface_order=str(order))
    assert (record, warning) == ({"method": "resolvconf", "name": "tun.alice"}, None)
    assert run.calls == [(["resolvconf", "-a", "tun.alice", "-m", "0", "-x"],
                          "nameserver 10.77.0.1\nsearch corp.example\n")]
    assert dns.undo(record, run=run, which=which_only("resolvconf")) is None
    assert run.calls[-1] == (["resolvconf", "-d", "tun.alice", "-f"], None)


def test_dns_through_resolvectl():
    run = Runner()
    record, warning = dns.apply("alice", ["10.77.0.1", "2001:db8::53"], [], full_tunnel=True,
                                run=run, which=which_only("resolvectl"))
    assert (record, warning) == ({"method": "resolvectl", "name": "alice"}, None)
    assert [argv for argv, _ in run.calls] == [
        ["resolvectl", "dns", "alice", "10.77.0.1", "2001:db8::53"],
        ["resolvectl", "domain", "alice", "~."]]
    dns.undo(record, run=run, which=which_only("resolvectl"))
    assert run.calls[-1][0] == ["resolvectl", "revert", "alice"]


def test_dns_without_tools_or_servers():
    run = Runner()
    record, warning = dns.apply("alice", ["10.77.0.1"], ["corp.example"], run=run,
                                which=which_only())
    assert record is None and run.calls == []
    assert warning == ("neither resolvconf nor resolvectl is installed: DNS 10.77.0.1, "
                       "corp.example from the config is not set; the tunnel works, name "
                       "resolution stays as it was")
    assert dns.apply("alice", [], [], run=run, which=which_only("resolvconf")) == (None, None)
    record, warning = dns.apply("alice", ["10.77.0.1"], run=Runner(1),
                                which=which_only("resolvconf"))
    assert record == {"method": "resolvconf", "name": "alice"}
    assert warning == "resolvconf refused the DNS servers: it broke"


# ---------------------------------------------------------------------------------- resolution


def test_next_address_rotates_only_after_a_failure():
    assert resolve.next_address(["a", "b", "c"], None) == "a"
    assert resolve.next_address(["a", "b", "c"], "a") == "b"
    assert resolve.next_address(["a", "b", "c"], "c") == "a"
    assert resolve.next_address(["a"], "a") == "a"
    assert resolve.next_address(["b"], "a") == "b"
    assert resolve.is_ip("192.0.2.1") and resolve.is_ip("[2001:db8::1]")
    assert not resolve.is_ip("vpn.example.com")


class FakeDriver:
    """Counts the changes the tunnel makes to its device; runs on trio's (mock) clock."""

    def __init__(self, device):
        self.device = device
        self.changes = 0

    def now(self) -> float:
        return trio.current_time()

    @contextlib.contextmanager
    def locked(self):
        yield self.device
        self.changes += 1


def make_tunnel(endpoint: str, lookup, peer_extra: str = "") -> tunnel.Tunnel:
    """A Tunnel with its engine and socket but no TUN device or routes (no root needed)."""
    cfg = config.parse(conf(endpoint=endpoint, peer_extra=peer_extra))
    t = tunnel.Tunnel(cfg, "alice", "alice.conf", "/nonexistent", lookup=lookup,
                      resolve_retry=0.01)
    t.sock = open_udp(0)
    t.device = Device(PRIV)
    t.peer = t.device.add_peer(HUB, allowed_ips=cfg.peers[0].allowed_ips,
                               persistent_keepalive=25, name="hub")
    t.driver = FakeDriver(t.device)
    host, port = cfg.peers[0].endpoint
    t.hub_label = f"{host}:{port}"
    return t


def v4(sockaddr) -> str:
    return sockaddr[0].removeprefix("::ffff:")


def test_an_unresolvable_hub_is_retried_and_said_once_per_try(messages):
    answers = [socket.gaierror(-2, "Name or service not known")] * 2 + [["192.0.2.7"]]

    def lookup(host, port, family):
        assert (host, port) == ("vpn.example.com", 51820)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    t = make_tunnel("vpn.example.com:51820", lookup)
    try:
        trio.run(t._resolve_first)
    finally:
        t.sock.close()
    assert v4(t.peer.endpoint) == "192.0.2.7" and t.peer.endpoint[1] == 51820
    assert messages == [
        "WARNING: cannot resolve vpn.example.com: Name or service not known; trying again in "
        "0.01 s"] * 2 + ["INFO: hub at vpn.example.com:51820 (192.0.2.7:51820)"]


def test_unanswered_handshakes_look_the_name_up_again_and_move_on(messages):
    t = make_tunnel("vpn.example.com:51820", lambda host, port, family: ["192.0.2.7", "192.0.2.8"])
    clock = trio.testing.MockClock()

    def check_after(seconds: float) -> bool:
        clock.jump(seconds)
        return t.check(trio.current_time())

    async def scenario():
        await t._resolve_first()
        t.device.initiate(t.peer, trio.current_time())
        t.device.net_out.clear()
        assert not check_after(1)  # one second without an answer is normal
        assert not check_after(9)
        t.peer.last_sent_handshake = trio.current_time() + 5  # the engine is still retrying
        assert check_after(5.5)  # 15.5 s: look again
        assert any("has not answered a handshake for 15 s" in m for m in messages)
        await t._re_resolve()
        assert v4(t.peer.endpoint) == "192.0.2.8"  # the next address the name has
        assert t.driver.changes == 2  # set at first, then moved with a new initiation
        assert not check_after(1)  # just looked: wait another 15 s
        t.on_event(Event.HANDSHAKE, t.peer, None)
        t.peer.last_handshake = trio.current_time()
        assert not check_after(30) and t.failing_since is None

    try:
        trio.run(scenario, clock=clock)
    finally:
        t.sock.close()
    assert "INFO: hub vpn.example.com:51820: trying 192.0.2.8:51820 (was 192.0.2.7:51820)" \
        in messages
    assert "INFO: handshake with hub 192.0.2.8:51820" in messages


def test_unanswered_handshakes_move_on_to_the_next_pytun_endpoint_and_round_again(messages):
    """A hub at an IP address with two more in `# pytun-endpoint` lines (a second hub with
    the same key, or another way in): the client goes through them in order."""
    looked_up = []

    def lookup(host, port, family):
        looked_up.append(host)
        return ["192.0.2.20", "192.0.2.21"]

    t = make_tunnel("192.0.2.7:51820", lookup, "# pytun-endpoint = 192.0.2.9:51821\n"
                    "#pytun-endpoint=hub-b.example.com:51822\n")
    clock = trio.testing.MockClock()
    seen = []

    async def scenario():
        await t._resolve_first()
        seen.append(t.peer.endpoint)
        for _ in range(4):
            t.device.initiate(t.peer, trio.current_time())
            clock.jump(15.5)
            t.peer.last_sent_handshake = trio.current_time()  # still retrying
            assert t.check(trio.current_time())
            await t._re_resolve()
            seen.append(t.peer.endpoint)

    try:
        trio.run(scenario, clock=clock)
    finally:
        t.sock.close()
    assert [(v4(e), e[1]) for e in seen] == [("192.0.2.7", 51820), ("192.0.2.9", 51821),
                                             ("192.0.2.20", 51822), ("192.0.2.21", 51822),
                                             ("192.0.2.7", 51820)]
    assert looked_up == ["hub-b.example.com"] * 4  # the IP addresses are never looked up
    assert t.driver.changes == 5


def test_pytun_endpoint_lines_are_read_and_written_and_stock_tools_ignore_them():
    text = conf(peer_extra="# pytun-endpoint = [2001:db8::9]:51820\n")
    parsed = config.parse(text)
    assert parsed.peers[0].alternate_endpoints == [("2001:db8::9", 51820)]
    assert "# pytun-endpoint = [2001:db8::9]:51820" in config.render(parsed)
    assert "pytun-endpoint" not in config.strip(text)  # what `wg setconf` gets
    with pytest.raises(config.ConfigError, match=r":3: pytun-endpoint belongs in a \[Peer\]"):
        config.parse(f"[Interface]\nPrivateKey = {B(PRIV)}\n# pytun-endpoint = h:1\n")
    with pytest.raises(config.ConfigError, match="pytun-endpoint: "):
        config.parse(conf(peer_extra="# pytun-endpoint = nonsense\n"))


def test_an_ip_endpoint_is_never_looked_up():
    def lookup(*args):
        raise AssertionError("looked up an IP address")

    t = make_tunnel("192.0.2.1:51820", lookup)
    try:
        trio.run(t._resolve_first)
        t.device.initiate(t.peer, 100.0)
        assert not t.check(130.0)
    finally:
        t.sock.close()
    assert v4(t.peer.endpoint) == "192.0.2.1"


def test_status_never_shows_a_private_key():
    t = make_tunnel("192.0.2.1:51820", None)
    try:
        s = t.status()
    finally:
        t.sock.close()
    assert s["public_key"] == B(keys.public_from_private(PRIV))
    assert B(PRIV) not in json.dumps(s) and s["state"] == "starting"
    pairs = t.handle_control([("get", "1")])
    assert dict(pairs)["hub_public_key"] == B(HUB)


def test_ipv6_networks_are_left_out_when_ipv6_is_off():
    plan = routes.plan_routes(["0.0.0.0/0", "::/0", "fd77::/64"], ["10.77.0.2/32"], ipv6=False)
    assert plan.routes == [Route(N("0.0.0.0/0"), 51820),
                           Route(N("0.0.0.0/0"), 51820, unreachable=True)]
    assert plan.full_tunnel == (4,) and plan.blocked == ()
    assert [r.family for r in plan.rules] == [4, 4]
    assert plan.skipped == ("::/0", "fd77::/64")


def test_dns_method_is_known_before_it_is_used():
    assert dns.choose("alice", which=which_only("resolvectl")) == {"method": "resolvectl",
                                                                  "name": "alice"}
    assert dns.choose("alice", which=which_only()) is None


def test_hooks_run_in_order_with_the_interface_name_and_report_failures(tmp_path, monkeypatch):
    out = tmp_path / "out"
    ok = hooks.run_hooks("PostUp", [f"echo one %i >> {out}", f"echo two %i%i >> {out}"], "wg7")
    assert ok == [] and out.read_text() == "one wg7\ntwo wg7wg7\n"

    failing = ["exit 3", f"echo after >> {out}"]
    assert hooks.run_hooks("PreDown", failing, "wg7") == ["PreDown command failed (exit 3): exit 3"]
    assert out.read_text().endswith("after\n")  # down hooks go on after a failure
    out.write_text("")
    assert hooks.run_hooks("PreUp", failing, "wg7", stop_at_failure=True) == [
        "PreUp command failed (exit 3): exit 3"]
    assert out.read_text() == ""  # up hooks stop at the first failure

    monkeypatch.setattr(hooks, "HOOK_TIMEOUT", 0.2)
    assert hooks.run_hooks("PostUp", ["sleep 5"], "wg7") == [
        "PostUp command failed (still running after 0.2 s): sleep 5"]


# ---------------------------------------------------------------------------------- file checks


def fake_stat(mode: int, uid: int = 0, gid: int = 0):
    return os.stat_result((mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_a_config_others_can_read_is_warned_about(tmp_path, capsys, run_dir):
    path = tmp_path / "alice.conf"
    path.write_text(conf())
    os.chmod(path, 0o644)
    cli.main(["up", str(path), "--interface", "bad name"])  # stops after reading the file
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"pytun-client: warning: {path} is readable by group or others "
                                   f"(mode 0644) and holds the private key; chmod 600 {path}")
    os.chmod(path, 0o600)
    cli.main(["up", str(path), "--interface", "bad name"])
    assert "warning" not in capsys.readouterr().err
    assert cli.file_warnings("x", fake_stat(0o100640)) and not cli.file_warnings("x", fake_stat(0o100600))


def test_hooks_from_a_file_others_may_write_are_refused(tmp_path, capsys, monkeypatch):
    path = tmp_path / "alice.conf"
    path.write_text(conf(extra="PostUp = touch /tmp/owned\n"))
    os.chmod(path, 0o602)
    monkeypatch.setattr(cli, "check_privileges", lambda: pytest.fail("got past the file check"))
    assert cli.main(["up", str(path)]) == 1
    assert one_error(capsys) == (f"{path}: refusing its PreUp/PostUp/PreDown/PostDown commands: "
                                 f"the file is writable by others; they would run as this user "
                                 f"(uid {os.geteuid()})")
    os.chmod(path, 0o600)  # the same file without hooks would only be warned about
    path.write_text(conf())
    os.chmod(path, 0o602)
    with pytest.raises(BaseException, match="got past the file check"):
        cli.main(["up", str(path)])


@pytest.mark.parametrize("mode, uid, gid, dir_mode, dir_uid, dir_gid, reason", [
    (0o100600, 0, 0, 0o40700, 0, 0, None),
    (0o100644, 0, 0, 0o40755, 0, 0, None),               # readable: a warning, not a refusal
    (0o100600, 1000, 1000, 0o40755, 0, 0, None),         # the user running it owns it
    (0o100600, 1001, 0, 0o40755, 0, 0, "owned by uid 1001"),
    (0o100602, 0, 0, 0o40755, 0, 0, "writable by others"),
    (0o100620, 0, 100, 0o40755, 0, 0, "writable by group 100"),
    (0o100620, 0, 0, 0o40755, 0, 0, None),               # group root
    (0o100600, 0, 0, 0o40777, 0, 0, "in a directory others may write to"),
    (0o100600, 0, 0, 0o41777, 0, 0, None),               # sticky, like /tmp
    (0o100600, 0, 0, 0o40775, 0, 100, "in a directory others may write to"),
    (0o100600, 0, 0, 0o40700, 1001, 0, "in a directory owned by uid 1001"),
])
def test_who_may_have_written_the_hooks(mode, uid, gid, dir_mode, dir_uid, dir_gid, reason):
    assert cli.hook_refusal(fake_stat(mode, uid, gid), fake_stat(dir_mode, dir_uid, dir_gid),
                            euid=1000) == reason


def test_down_after_a_failure_under_systemd_keeps_a_full_tunnel_closed(run_dir, capsys,
                                                                        monkeypatch):
    run_dir.mkdir()
    undone = []
    monkeypatch.setattr(runtime, "undo_recorded", lambda state: undone.append(state) or [])
    plan = routes.plan_routes(["0.0.0.0/0", "::/0"], ["10.77.0.2/32"]).to_json()
    state = {"version": 1, "pid": dead_pid(), "start_time": "1", "interface": "alice",
             "config": "/etc/pytun/alice.conf", "link": True, "plan": plan, "dns": None}
    runtime.write_state(str(run_dir / "alice.json"), state)
    # ExecStopPost= after a kill -9 (systemd's SERVICE_RESULT=signal): nothing is undone.
    monkeypatch.setenv("SERVICE_RESULT", "signal")
    assert cli.main(["down", "alice"]) == 0
    assert capsys.readouterr().err == (
        "pytun-client: warning: alice stopped with signal: its full tunnel stays closed (traffic "
        "for the internet is refused) until it starts again or `pytun-client down alice` from a "
        "shell\n")
    assert undone == [] and os.listdir(run_dir) == ["alice.json"]
    # A split tunnel has nothing to keep closed; a `down` from a shell undoes everything.
    assert cli.kept_after_failure({**state, "plan": routes.plan_routes(["10.0.0.0/8"]).to_json()}
                                  ) is None
    monkeypatch.delenv("SERVICE_RESULT")
    assert cli.main(["down", "alice"]) == 0
    assert len(undone) == 1 and os.listdir(run_dir) == []
    assert cli.kept_after_failure(state, {"SERVICE_RESULT": "success"}) is None
