"""The session log: start, endpoint change and end lines with their fields, and the formats
that carry them (text for the journal, json and logfmt for shippers)."""

from __future__ import annotations

import json
import logging

from pytun.common import logformat
from pytun.server.sessions import SessionLog
from pytun.common.peer import Event


class FakePeer:
    def __init__(self, name, endpoint=("198.51.100.18", 40000)):
        self.name = name
        self.endpoint = endpoint
        self.rx_bytes = self.tx_bytes = 0
        self.last_handshake = None
        self.public_key = b"\x01" * 32


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _fields(caplog):
    return [r.fields for r in caplog.records if r.name == "pytun.session"]


def _handshake(log, peer, clock):
    peer.last_handshake = clock.t
    log.on_event(Event.HANDSHAKE, peer, None)


def test_start_once_then_endpoint_then_end_after_180_s(caplog):
    caplog.set_level(logging.INFO, logger="pytun.session")
    clock = Clock()
    log = SessionLog(clock=clock, wallclock=lambda: 1_700_000_000.0)
    alice = FakePeer("alice")
    peers = {"alice": ((), alice)}
    _handshake(log, alice, clock)
    clock.t += 120
    _handshake(log, alice, clock)  # a rekey: the same session
    alice.endpoint = ("203.0.113.9", 5000)
    log.on_event(Event.ENDPOINT, alice, alice.endpoint)
    alice.rx_bytes, alice.tx_bytes = 5000, 7000
    clock.t += 179
    log.check(peers)
    assert [f["event"] for f in _fields(caplog)] == ["session_start", "session_endpoint"]
    clock.t += 1
    log.check(peers)
    start, moved, end = _fields(caplog)
    assert start == {"event": "session_start", "peer": "alice", "endpoint": "198.51.100.18:40000"}
    assert moved["endpoint"] == "203.0.113.9:5000"
    assert end["event"] == "session_end" and end["reason"] == "timeout"
    assert (end["rx_bytes"], end["tx_bytes"]) == (5000, 7000)
    assert end["duration_seconds"] == 300.0  # first handshake to last + 180 s
    # The next handshake starts a new session.
    _handshake(log, alice, clock)
    assert _fields(caplog)[-1]["event"] == "session_start"


def test_removed_disabled_and_reconfigured_peers_end_their_sessions(caplog):
    caplog.set_level(logging.INFO, logger="pytun.session")
    clock = Clock()
    log = SessionLog(clock=clock)
    a, b, c = FakePeer("a"), FakePeer("b"), FakePeer("c")
    for p in (a, b, c):
        _handshake(log, p, clock)
    log.check({"c": ((), FakePeer("c"))}, disabled={"b"})
    ends = {f["peer"]: f["reason"] for f in _fields(caplog) if f["event"] == "session_end"}
    assert ends == {"a": "removed", "b": "disabled", "c": "reconfigured"}
    assert log.active == {}


def test_no_key_in_any_line(caplog):
    caplog.set_level(logging.INFO, logger="pytun.session")
    clock = Clock()
    log = SessionLog(clock=clock)
    p = FakePeer("k")
    _handshake(log, p, clock)
    log.close()
    for record in caplog.records:
        text = logformat.JsonFormatter().format(record)
        assert "public_key" not in text and "AQEBAQ" not in text


def _record(msg="session alice: started", **fields):
    r = logging.LogRecord("pytun.session", logging.INFO, __file__, 1, msg, (), None)
    r.fields = fields
    return r


def test_json_and_logfmt_lines_carry_the_fields():
    r = _record(event="session_end", peer="alice", endpoint="[2001:db8::1]:51820",
                rx_bytes=10, duration_seconds=1.5, reason="no handshake")
    line = json.loads(logformat.JsonFormatter().format(r))
    assert line["event"] == "session_end" and line["rx_bytes"] == 10
    assert line["level"] == "info" and line["msg"] == "session alice: started"
    assert line["time"].endswith("Z")
    text = logformat.LogfmtFormatter().format(r)
    assert "peer=alice" in text and "endpoint=[2001:db8::1]:51820" in text
    assert 'reason="no handshake"' in text and 'msg="session alice: started"' in text
    plain = logformat.formatter("text", "pytun-server").format(r)
    assert plain == "pytun-server: session alice: started"
    # A line without fields still formats.
    assert json.loads(logformat.JsonFormatter().format(
        logging.LogRecord("pytun", logging.WARNING, __file__, 1, "x %d", (1,), None)))["msg"] == "x 1"


def test_a_laptop_hopping_ports_gets_one_endpoint_line_per_ten_seconds(caplog):
    caplog.set_level(logging.INFO, logger="pytun.session")
    clock = Clock()
    log = SessionLog(clock=clock, wallclock=lambda: 1_700_000_000.0)
    bob = FakePeer("bob")
    _handshake(log, bob, clock)
    for i in range(480):  # 16 source ports a second for 30 s (steps exact in binary)
        clock.t += 0.0625
        bob.endpoint = ("198.51.100.18", 20000 + i)
        log.on_event(Event.ENDPOINT, bob, bob.endpoint)
    moved = [f for f in _fields(caplog) if f["event"] == "session_endpoint"]
    assert [m["moves"] for m in moved] == [1, 161, 321]  # the first, then every 10 s
    log.close()
    assert _fields(caplog)[-1]["endpoint_changes"] == 480


def test_one_logging_set_up_for_every_command(capsys):
    """pytun-server and pytun-client log through the same set-up: `prog: ` before every line,
    the level's word before warnings and errors, debug lines only when verbose, and a second
    set-up replaces the first instead of doubling every line."""
    log = logging.getLogger("pytun.test")
    try:
        logformat.setup("pytun-server")
        logformat.setup("pytun-client")
        log.debug("hidden")
        log.info("up")
        log.warning("slow")
        log.error("broken")
        assert capsys.readouterr().err.splitlines() == [
            "pytun-client: up", "pytun-client: warning: slow", "pytun-client: error: broken"]
        logformat.setup("pytun-server", verbose=True, kind="json")
        log.debug("shown")
        line = json.loads(capsys.readouterr().err)
        assert line["level"] == "debug" and line["msg"] == "shown"
    finally:
        root = logging.getLogger("pytun")
        root.handlers[:] = []
        root.propagate = True
        root.setLevel(logging.NOTSET)
