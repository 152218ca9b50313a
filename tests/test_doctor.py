"""pytun-admin doctor's decisions, from what each check reads (no root needed)."""

from __future__ import annotations

import ipaddress
import os


from pytun.server import doctor, state

SETTINGS = state.HubSettings(subnet="10.77.0.0/24", endpoint="192.0.2.1", interface="pt0")


def test_forwarding_off_fails_only_while_the_hub_runs():
    off = {"/proc/sys/net/ipv4/ip_forward": "0"}.get
    assert doctor.check_forwarding(SETTINGS, True, read=off).status == doctor.FAIL
    assert doctor.check_forwarding(SETTINGS, False, read=off).status == doctor.WARN
    on = {"/proc/sys/net/ipv4/ip_forward": "1"}.get
    assert doctor.check_forwarding(SETTINGS, True, read=on).status == doctor.PASS


def test_conntrack_thresholds():
    assert doctor.check_conntrack(10, 1000).status == doctor.PASS
    warn = doctor.check_conntrack(850, 1000)
    assert warn.status == doctor.WARN and "nf_conntrack_max=2000" in warn.fix
    assert doctor.check_conntrack(990, 1000).status == doctor.FAIL
    assert doctor.check_conntrack(None, None).status == doctor.WARN


def test_mtu_against_the_egress():
    assert doctor.check_mtu(SETTINGS, 1500, "eth0").status == doctor.PASS
    bad = doctor.check_mtu(SETTINGS, 1400, "eth0")
    assert bad.status == doctor.FAIL and '"mtu": 1340' in bad.fix


def test_rules_missing_or_not_reached():
    jumps = [{"table": "filter", "chain": "FORWARD", "target": "PYTUN-pt0-FWD"}]
    good = {"filter": ":FORWARD ACCEPT [0:0]\n:PYTUN-pt0-FWD - [0:0]\n"
                      "-A FORWARD -m comment --comment pytun:pt0 -j PYTUN-pt0-FWD\n"}
    assert doctor.check_rules(SETTINGS, good, jumps).status == doctor.PASS
    unjumped = {"filter": ":FORWARD ACCEPT [0:0]\n:PYTUN-pt0-FWD - [0:0]\n"}
    assert "no jump from FORWARD" in doctor.check_rules(SETTINGS, unjumped, jumps).detail
    shadowed = {"filter": good["filter"].replace("-A FORWARD -m", "-A FORWARD -j DROP\n-A FORWARD -m")}
    assert "unconditional DROP" in doctor.check_rules(SETTINGS, shadowed, jumps).detail
    assert doctor.check_rules(SETTINGS, {}, jumps).status == doctor.FAIL


def test_udp_port_owner():
    assert doctor.check_udp_port(51820, None, None).status == doctor.FAIL
    other = doctor.check_udp_port(51820, (42, "nc -u -l 51820"), 7)
    assert other.status == doctor.FAIL and "PID 42" in other.detail
    assert doctor.check_udp_port(51820, (7, "python3 -m pytun.server.main"), 7).status == doctor.PASS


def test_endpoint_local_nat_or_unresolved():
    local = {ipaddress.ip_address("192.0.2.1")}
    assert doctor.check_endpoint(SETTINGS, local, lambda h: [ipaddress.ip_address(h)]).status \
        == doctor.PASS
    assert doctor.check_endpoint(SETTINGS, set(), lambda h: [ipaddress.ip_address(h)]).status \
        == doctor.WARN

    def nowhere(host):
        raise OSError("Name or service not known")
    assert doctor.check_endpoint(SETTINGS, local, nowhere).status == doctor.FAIL


def test_state_modes_and_registry(tmp_path):
    d = str(tmp_path / "s")
    state.init_state(d, SETTINGS)
    assert {c.status for c in doctor.check_state_modes(d)} == {doctor.PASS}
    assert doctor.check_registry(state.registry_path(d)).status == doctor.PASS
    os.chmod(state.private_key_path(d), 0o644)
    bad = [c for c in doctor.check_state_modes(d) if c.status == doctor.FAIL]
    assert [c.name for c in bad] == ["private key mode"] and "chmod 0600" in bad[0].fix
    with open(state.registry_path(d), "r+b") as f:
        f.seek(0)
        f.write(b"not a database at all" * 10)
    assert doctor.check_registry(state.registry_path(d)).status == doctor.FAIL


def test_rp_filter_strict_warns():
    assert doctor.check_rp_filter({"all": "0", "pt0": "0"}).status == doctor.PASS
    strict = doctor.check_rp_filter({"all": "1", "pt0": "0"})
    assert strict.status == doctor.WARN and "all.rp_filter=2" in strict.fix


def test_nftables_drop_chain_fails_and_names_the_chain():
    checks = doctor.check_firewall_backend([
        "nftables chain inet filter forward hooks forward with policy drop (Docker, ufw?):"
        " forwarded VPN traffic may be dropped by it"])
    assert checks[0].status == doctor.FAIL and "inet filter forward" in checks[0].fix
    assert doctor.check_firewall_backend([])[0].status == doctor.PASS
