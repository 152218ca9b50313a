"""The whitepaper's timers (section 6) under a hand-stepped clock: minutes run in milliseconds.

Constants (section 6.1): REKEY_AFTER_MESSAGES 2^60, REJECT_AFTER_MESSAGES 2^64 - 2^13 - 1,
REKEY_AFTER_TIME 120 s, REJECT_AFTER_TIME 180 s, REKEY_ATTEMPT_TIME 90 s, REKEY_TIMEOUT 5 s,
KEEPALIVE_TIMEOUT 10 s. Every test counts datagrams exactly: the protocol decides the numbers.
"""

from __future__ import annotations

import pytest

from pytun.common import peer as P
from pytun.common import timers
from tests.enginenet import Net, static_key, two, up  # noqa: F401

INIT, RESP, COOKIE, DATA = 1, 2, 3, 4


def times(sent, mtype=None):
    return [round(s.time, 6) for s in sent if mtype is None or s.type == mtype]


def test_constants_are_the_whitepapers():
    assert P.REKEY_AFTER_MESSAGES == 2**60
    assert P.REJECT_AFTER_MESSAGES == 2**64 - 2**13 - 1
    assert (P.REKEY_AFTER_TIME, P.REJECT_AFTER_TIME, P.REKEY_ATTEMPT_TIME) == (120, 180, 90)
    assert (P.REKEY_TIMEOUT, P.KEEPALIVE_TIMEOUT) == (5, 10)
    assert P.RECEIVE_REKEY_AGE == 165
    assert P.ZERO_KEYS_AFTER == 540


def test_a_quiet_session_stays_quiet():
    net, a, b = two()
    up(net, a, b)
    start = len(net.sent)
    net.run(119, step=0.5)
    # b answers the data with one keepalive after 10 s; nothing else moves.
    assert [(s.sender, s.type, s.time) for s in net.sent[start:]] == [("b", DATA, 10.0)]
    assert net.sent[start].is_keepalive


# -- rekeying ------------------------------------------------------------------------------------


def test_initiator_rekeys_on_the_first_send_after_rekey_after_time():
    net, a, b = two()
    up(net, a, b)
    first = a.peer(b).current
    net.run_until(119.5, step=0.5)
    a.device.send(a.packet_to(b, b"119.5"), net.now)
    net.deliver()
    assert net.sent_by("a", INIT, since=1) == []
    net.run_until(120.5, step=0.5)
    mark = len(net.sent)
    a.device.send(a.packet_to(b, b"120.5"), net.now)
    net.deliver()
    # The packet still goes on the old session, and a handshake starts beside it.
    assert [(s.sender, s.type) for s in net.sent[mark:mark + 3]] == [("a", DATA), ("a", INIT),
                                                                     ("b", RESP)]
    assert b.received[-1] == a.packet_to(b, b"120.5")
    assert a.peer(b).current is not first and a.peer(b).previous is first
    a.device.send(a.packet_to(b, b"new"), net.now)
    net.deliver()
    assert b.received[-1] == a.packet_to(b, b"new")
    assert int.from_bytes(net.sent[-1].datagram[4:8], "little") == b.peer(a).current.local_index


def test_responder_never_rekeys_on_time():
    net, a, b = two()
    up(net, a, b)
    net.run_until(179, step=1.0)
    b.device.send(b.packet_to(a, b"old but valid"), net.now)
    net.deliver()
    assert net.sent_by("b", INIT) == []
    assert a.received == [b.packet_to(a, b"old but valid")]


def test_initiator_rekeys_when_receiving_after_165_seconds():
    net, a, b = two()
    up(net, a, b)
    net.run_until(164.5, step=0.5)
    b.device.send(b.packet_to(a, b"164.5"), net.now)
    net.deliver()
    assert net.sent_by("a", INIT, since=1) == []
    net.run_until(165.5, step=0.5)
    b.device.send(b.packet_to(a, b"165.5"), net.now)
    net.deliver()
    assert times(net.sent_by("a", INIT, since=1)) == [165.5]
    assert a.received == [b.packet_to(a, b"164.5"), b.packet_to(a, b"165.5")]
    assert a.peer(b).current.created == 165.5
    # Only once per session: more packets on the old one do not start more handshakes.
    assert len(net.sent_by("b", RESP)) == 2


def test_the_receive_side_rekey_looks_at_the_current_session_not_the_one_received_on():
    net, a, b = two()
    up(net, a, b)
    net.run_until(165.5, step=0.5)
    # a's confirmation of the new session is lost: b keeps sending on the old one for a while.
    net.drop_if = lambda s: s.sender == "a" and s.type == DATA
    b.device.send(b.packet_to(a, b"165.5"), net.now)
    net.deliver()
    assert times(net.sent_by("a", INIT, since=1)) == [165.5]
    new = a.peer(b).current
    assert new.created == 165.5 and b.peer(a).next is not None
    net.run_until(171, step=0.5)
    b.device.send(b.packet_to(a, b"171 on the old session"), net.now)
    net.deliver()
    assert a.received[-1] == b.packet_to(a, b"171 on the old session")
    # a's current session is 5.5 s old: no reason for another handshake (wireguard-go and the
    # kernel look at the current keypair's age).
    assert times(net.sent_by("a", INIT, since=1)) == [165.5]
    assert a.peer(b).current is new


def test_nothing_is_sent_on_a_session_at_reject_after_time_and_nothing_received_on_it():
    net, a, b = two()
    up(net, a, b)
    net.drop_if = lambda s: s.type in (INIT, RESP)  # no rekey can complete
    net.run_until(179.9, step=0.5)
    b.device.send(b.packet_to(a, b"179.9"), net.now)
    late = b.device.net_out[:]  # the same datagram, held up in the network
    net.deliver()
    assert a.received == [b.packet_to(a, b"179.9")]

    net.clock.now = 180.0
    mark = len(net.sent)
    a.device.send(a.packet_to(b, b"180"), net.now)
    b.device.send(b.packet_to(a, b"180"), net.now)
    net.deliver()
    assert [s.type for s in net.sent[mark:]] == [INIT]  # b initiates; a did at 179.9 already
    assert b.received == [a.packet_to(b, b"first")]
    [(datagram, _)] = late
    a.device.receive(datagram, b.endpoint, net.now)
    assert a.device.drops == {"expired_keypair": 1}
    assert a.received == [b.packet_to(a, b"179.9")]


@pytest.mark.parametrize("sender, receiver", [("a", "b"), ("b", "a")],
                         ids=["initiator", "responder"])
def test_rekey_after_messages_by_either_side(sender, receiver):
    net, a, b = two()
    nodes = {"a": a, "b": b}
    s, r = nodes[sender], nodes[receiver]
    up(net, a, b)
    net.run_until(30, step=0.5)
    s.peer(r).current.send_counter = P.REKEY_AFTER_MESSAGES - 1
    s.device.send(s.packet_to(r, b"at the limit"), net.now)
    net.deliver()
    assert net.sent_by(sender, INIT, since=1) == []
    s.device.send(s.packet_to(r, b"past the limit"), net.now)
    [(data, _), (init, _)] = s.device.net_out
    assert int.from_bytes(data[8:16], "little") == P.REKEY_AFTER_MESSAGES
    assert init[0] == INIT
    net.deliver()
    assert r.received[-2:] == [s.packet_to(r, b"at the limit"), s.packet_to(r, b"past the limit")]
    assert s.peer(r).current.send_counter < 2  # a new session, used by sender only just now


def test_no_packet_at_or_past_reject_after_messages():
    net, a, b = two()
    up(net, a, b)
    net.run_until(30, step=0.5)  # past REKEY_TIMEOUT since the first handshake
    old = a.peer(b).current
    old.send_counter = P.REJECT_AFTER_MESSAGES - 1
    net.drop_if = lambda s: s.type == RESP  # hold the new session back for a moment
    a.device.send(a.packet_to(b, b"last"), net.now)
    a.device.send(a.packet_to(b, b"one too many"), net.now)
    net.deliver()
    counters = [int.from_bytes(s.datagram[8:16], "little") for s in net.sent_by("a", DATA)]
    assert counters == [0, P.REJECT_AFTER_MESSAGES - 1]
    assert len(net.sent_by("a", INIT)) == 2  # sending the last one started a handshake
    assert old.send_counter == P.REJECT_AFTER_MESSAGES
    assert b.received[-1] == a.packet_to(b, b"last")
    assert list(a.peer(b).staged) == [a.packet_to(b, b"one too many")]
    # The receiver refuses a genuine packet with the counter REJECT_AFTER_MESSAGES.
    sealed = old.send.seal(P.REJECT_AFTER_MESSAGES, a.packet_to(b, b"forged by us"))
    forged = (b"\x04\0\0\0" + old.remote_index.to_bytes(4, "little")
              + P.REJECT_AFTER_MESSAGES.to_bytes(8, "little") + sealed)
    b.device.receive(forged, a.endpoint, net.now)
    assert b.device.drops == {"replay": 1}
    # When the new session comes up, the staged packet goes on it from counter 0.
    net.drop_if = None
    net.run(5.5)
    assert b.received[-1] == a.packet_to(b, b"one too many")
    assert a.peer(b).current is not old


# -- handshake retransmission --------------------------------------------------------------------


def test_retransmit_every_rekey_timeout_plus_jitter_then_give_up_after_rekey_attempt_time():
    net, a, b = two()
    net.drop_if = lambda s: s.sender == "a"  # b never hears a
    for i in range(3):
        a.device.send(a.packet_to(b, bytes([i])), 0.0)
    net.run(130, step=0.01)
    sent = times(net.sent_by("a", INIT))
    # The first, then one every REKEY_TIMEOUT (+ up to 333 ms) for REKEY_ATTEMPT_TIME.
    assert len(sent) == 1 + P.MAX_TIMER_HANDSHAKES == 19
    gaps = [y - x for x, y in zip(sent, sent[1:])]
    assert all(5.0 <= g <= 5.0 + 0.333 + 0.011 for g in gaps), gaps
    assert len(set(round(g, 2) for g in gaps)) > 1  # the jitter is really random
    assert sent[-1] >= P.REKEY_ATTEMPT_TIME
    gave_up = [e for e in a.device.events if e[0] == "handshake_gave_up"]
    assert len(gave_up) == 1
    assert list(a.peer(b).staged) == []  # what waited for a session is dropped, and counted
    assert a.device.drops == {"handshake_gave_up": 3}
    assert len(net.sent) == 19  # nothing at all after giving up
    # New data starts a new round of attempts.
    a.device.send(a.packet_to(b, b"again"), net.now)
    net.run(6, step=0.01)
    assert len(net.sent_by("a", INIT)) == 21


def test_a_late_response_still_completes_after_retransmission():
    net, a, b = two()
    net.drop_if = lambda s: s.type == RESP and s.time < 1
    up_packet = a.packet_to(b, b"slow start")
    a.device.send(up_packet, 0.0)
    net.run(5.5, step=0.01)
    assert len(net.sent_by("a", INIT)) == 2
    assert b.received == [up_packet]
    assert a.peer(b).retransmit_at is None
    net.run(20, step=0.05)
    assert len(net.sent_by("a", INIT)) == 2


def held_responses(net):
    """Hold every response b sends (for delivery later, by hand); returns the list."""
    held = []

    def hold(sent):
        if sent.type == RESP:
            held.append(sent.datagram)
            return True
        return False

    net.drop_if = hold
    return held


def test_a_response_to_the_initiation_before_the_retransmission_still_completes():
    """The first response arrives late, after a retransmitted initiation that was lost: the
    first initiation is still in flight, so its response makes a session (boringtun's
    `previous` handshake state; dropped before)."""
    net, a, b = two()
    held = []

    def slow_then_lost(sent):  # the first answer is held; the retransmission is lost
        if sent.type == RESP:
            held.append(sent.datagram)
            return True
        return sent.type == INIT and sent.time > 1

    net.drop_if = slow_then_lost
    packet = a.packet_to(b, b"over a slow path")
    a.device.send(packet, 0.0)
    net.run(5.5, step=0.01)  # the retransmission went out at 5 s + jitter
    assert len(net.sent_by("a", INIT)) == 2 and len(held) == 1
    net.drop_if = None
    before = dict(a.device.drops)
    net.inject(a, held[0], b.endpoint)  # the answer to the first initiation
    assert a.device.drops == before
    assert b.received == [packet]  # staged packet sent on the new session, decrypted by b
    assert a.peer(b).current is not None and a.peer(b).previous_handshake is None
    assert a.peer(b).retransmit_at is None


def test_answers_to_both_initiations_end_on_the_newer_session():
    """b answered both initiations; its session for the first is gone once it answered the
    second. Whichever answer arrives first, a ends on the second's session, and data flows."""
    for order in ((0, 1), (1, 0)):
        net, a, b = two()
        held = held_responses(net)
        a.device.send(a.packet_to(b, b"one"), 0.0)
        net.run(5.5, step=0.01)
        assert len(held) == 2
        net.drop_if = None
        for i in order:
            net.inject(a, held[i], b.endpoint)
        pa = a.peer(b)
        assert pa.handshake is None and pa.previous_handshake is None and not a.device.handshakes
        a.device.send(a.packet_to(b, b"two"), net.now)
        net.deliver()
        assert b.received[-1] == a.packet_to(b, b"two"), order
        # Answering twice is no longer possible: a third copy of either is an unknown index.
        before = a.device.drops["unknown_index"]
        net.inject(a, held[order[0]], b.endpoint)
        assert a.device.drops["unknown_index"] == before + 1, order


def test_staged_queue_keeps_the_newest_packets():
    net, a, b = two()
    net.drop_if = lambda s: s.type == INIT and s.time < 1
    packets = [a.packet_to(b, i.to_bytes(2, "big")) for i in range(P.MAX_STAGED + 10)]
    for p in packets:
        a.device.send(p, 0.0)
    net.run(5.5, step=0.05)
    assert b.received == packets[10:]
    assert a.device.drops == {"staged_overflow": 10}


# -- keepalives ----------------------------------------------------------------------------------


def test_keepalive_ten_seconds_after_data_received_with_nothing_sent():
    net, a, b = two()
    up(net, a, b)  # b received data at 0
    net.run(9.99, step=0.01)
    assert net.sent_by("b", DATA) == []
    net.run(0.02, step=0.01)
    [ka] = net.sent_by("b", DATA)
    assert ka.is_keepalive and ka.time == pytest.approx(10.0)
    net.run(60, step=0.5)
    assert len(net.sent_by("b")) == 2  # the response and one keepalive: keepalives need none
    assert len(net.sent_by("a", DATA)) == 1


def test_no_keepalive_when_data_went_back_in_time():
    net, a, b = two()
    up(net, a, b)
    net.run_until(5, step=0.5)
    b.device.send(b.packet_to(a, b"answer"), net.now)
    net.deliver()
    net.run(30, step=0.05)
    b_data = [(round(s.time, 2), s.is_keepalive) for s in net.sent_by("b", DATA)]
    a_data = [(round(s.time, 2), s.is_keepalive) for s in net.sent_by("a", DATA)]
    assert b_data == [(5.0, False)]
    assert a_data == [(0.0, False), (15.0, True)]  # a answers b's data in turn


def test_more_data_during_the_keepalive_wait_asks_for_one_more_keepalive():
    net, a, b = two()
    up(net, a, b)
    net.run_until(3, step=0.5)
    a.device.send(a.packet_to(b, b"more"), net.now)
    net.deliver()
    net.run(40, step=0.05)
    assert times(net.sent_by("b", DATA)) == [10.0, 20.0]


def test_persistent_keepalive():
    net, a, b = two(keepalive=25)
    up(net, a, b)
    net.run(100, step=0.05)
    # a's last authenticated packet was b's keepalive at 10: then every 25 s.
    assert times(net.sent_by("a", DATA)) == [0.0, 35.0, 60.0, 85.0]
    assert all(s.is_keepalive for s in net.sent_by("a", DATA)[1:])
    assert times(net.sent_by("b", DATA)) == [10.0]  # keepalives are not answered


def test_new_handshake_fifteen_seconds_after_data_sent_without_an_answer():
    net, a, b = two()
    up(net, a, b)
    net.run_until(20, step=0.5)
    net.drop_if = lambda s: s.sender == "b"
    a.device.send(a.packet_to(b, b"hello?"), net.now)
    net.deliver()
    net.run(14.99, step=0.01)
    assert net.sent_by("a", INIT, since=1) == []
    net.run(0.35, step=0.01)
    [init] = net.sent_by("a", INIT, since=1)
    assert 35.0 <= init.time <= 35.0 + 0.333 + 0.011


def test_an_answer_cancels_the_new_handshake():
    net, a, b = two()
    up(net, a, b)
    net.run_until(20, step=0.5)
    a.device.send(a.packet_to(b, b"hello?"), net.now)
    net.deliver()
    net.run(60, step=0.05)  # b's keepalive at 30 is the answer
    assert net.sent_by("a", INIT, since=1) == []


# -- zeroing ---------------------------------------------------------------------------------------


def test_key_material_is_zeroed_after_three_times_reject_after_time():
    net, a, b = two()
    up(net, a, b)
    net.run_until(539.5, step=0.5)
    for x, y in ((a, b), (b, a)):
        assert x.peer(y).current is not None
    net.run_until(540.0, step=0.5)
    for x, y in ((a, b), (b, a)):
        peer = x.peer(y)
        assert peer.keypairs() == [] and peer.handshake is None
        assert x.device.keypairs == {} and x.device.handshakes == {}
    assert len(net.sent) == 4  # init, response, data, b's keepalive: zeroing sends nothing
    # Afterwards a send starts a fresh handshake.
    a.device.send(a.packet_to(b, b"after"), net.now)
    net.deliver()
    assert b.received[-1] == a.packet_to(b, b"after")


def test_next_deadline_is_the_earliest_timer():
    net, a, b = two()
    assert a.device.next_deadline() is None
    a.device.send(a.packet_to(b), 0.0)
    assert 5.0 <= a.device.next_deadline() <= 5.334
    net.deliver()
    # After the handshake: b's keepalive (10 s) is b's earliest; a waits for zeroing or an
    # answer to its data (15 s + jitter), whichever comes first.
    assert b.device.next_deadline() == 10.0
    assert 15.0 <= a.device.next_deadline() <= 15.334


def test_next_wakeup_sleeps_until_the_earliest_timer_unless_many_are_armed():
    net, a, b = two()
    assert a.device.next_wakeup(0.0, 0.1, 5.0) == 5.0  # nothing armed: the longest sleep
    a.device.send(a.packet_to(b), 0.0)
    assert 5.0 <= a.device.next_wakeup(0.0, 0.1, 60.0) <= 5.334  # the retransmit
    assert a.device.next_wakeup(0.0, 0.1, 2.0) == 2.0
    # With more peers armed than FEW_ARMED, a driver checks every tick instead.
    for i in range(timers.FEW_ARMED):
        peer = a.device.add_peer(static_key(f"extra-{i}")[1], allowed_ips=[f"10.9.{i}.0/24"],
                                 endpoint=("192.0.2.99", 51820))
        a.device.initiate(peer, 0.0)
    assert a.device.next_wakeup(0.0, 0.1, 60.0) == 0.1
