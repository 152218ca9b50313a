"""The replay window, checked by the WireGuard kernel's numbered case table and a slow reference.

The table is the selftest in the kernel's drivers/net/wireguard/selftest/counter.c
(wg_packet_counter_selftest), also ported to wireguard-go replay/replay_test.go. As in the
kernel, test numbers run on through the bulk tests, so a failure message names the same case.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pytun.common.replay import RING_BLOCKS, WINDOW_SIZE, ReplayFilter

# The kernel's REJECT_AFTER_MESSAGES: U64_MAX - COUNTER_WINDOW_SIZE - 1.
REJECT_AFTER_MESSAGES = 2**64 - 1 - WINDOW_SIZE - 1
T_LIM = WINDOW_SIZE + 1


def test_window_is_the_kernels():
    assert WINDOW_SIZE == 8192 - 64 == 8128
    assert RING_BLOCKS == 128


class Table:
    """Runs `T(n, expected)` like the kernel macro: one number per case, never reset."""

    def __init__(self) -> None:
        self.filter = ReplayFilter()
        self.number = 0

    def init(self) -> None:  # T_INIT
        self.filter.reset()

    def __call__(self, n: int, expected: bool) -> None:
        self.number += 1
        # The read-only check must predict what validate() will answer.
        predicted = self.filter.check(n, REJECT_AFTER_MESSAGES)
        got = self.filter.validate(n, REJECT_AFTER_MESSAGES)
        assert got is expected, f"nonce counter self-test {self.number}: counter {n} gave {got}"
        assert predicted is expected, f"check() disagrees in self-test {self.number}: counter {n}"


def test_kernel_counter_selftest_table():
    T = Table()
    R = REJECT_AFTER_MESSAGES
    T.init()
    cases = [
        (0, True),  # 1
        (1, True),  # 2
        (1, False),  # 3
        (9, True),  # 4
        (8, True),  # 5
        (7, True),  # 6
        (7, False),  # 7
        (T_LIM, True),  # 8
        (T_LIM - 1, True),  # 9
        (T_LIM - 1, False),  # 10
        (T_LIM - 2, True),  # 11
        (2, True),  # 12
        (2, False),  # 13
        (T_LIM + 16, True),  # 14
        (3, False),  # 15
        (T_LIM + 16, False),  # 16
        (T_LIM * 4, True),  # 17
        (T_LIM * 4 - (T_LIM - 1), True),  # 18
        (10, False),  # 19
        (T_LIM * 4 - T_LIM, False),  # 20
        (T_LIM * 4 - (T_LIM + 1), False),  # 21
        (T_LIM * 4 - (T_LIM - 2), True),  # 22
        (T_LIM * 4 + 1 - T_LIM, False),  # 23
        (0, False),  # 24
        (R, False),  # 25
        (R - 1, True),  # 26
        (R, False),  # 27
        (R - 1, False),  # 28
        (R - 2, True),  # 29
        (R + 1, False),  # 30
        (R + 2, False),  # 31
        (R - 2, False),  # 32
        (R - 3, True),  # 33
        (0, False),  # 34
    ]
    for n, expected in cases:
        T(n, expected)
    assert T.number == 34

    # Bulk 1: fill the window forward from 1; 0 is exactly WINDOW_SIZE behind, still inside.
    T.init()
    for i in range(1, WINDOW_SIZE + 1):
        T(i, True)
    T(0, True)
    T(0, False)

    # Bulk 2: forward from 2; 1 is inside, 0 is one past the window.
    T.init()
    for i in range(2, WINDOW_SIZE + 2):
        T(i, True)
    T(1, True)
    T(0, False)

    # Bulk 3: backward from WINDOW_SIZE down to 0, every one fresh.
    T.init()
    for i in range(WINDOW_SIZE, -1, -1):
        T(i, True)

    # Bulk 4: backward from WINDOW_SIZE + 1 down to 1; then 0 is too old.
    T.init()
    for i in range(WINDOW_SIZE + 1, 0, -1):
        T(i, True)
    T(0, False)

    # Bulk 5: backward from WINDOW_SIZE to 1, then one forward step pushes 0 out.
    T.init()
    for i in range(WINDOW_SIZE, 0, -1):
        T(i, True)
    T(WINDOW_SIZE + 1, True)
    T(0, False)

    # Bulk 6: the same, but 0 arrives before the forward step.
    T.init()
    for i in range(WINDOW_SIZE, 0, -1):
        T(i, True)
    T(0, True)
    T(WINDOW_SIZE + 1, True)

    bulk = 5 * (WINDOW_SIZE + 2) + (WINDOW_SIZE + 1)
    assert T.number == 34 + bulk


def test_limit_is_exclusive():
    f = ReplayFilter()
    assert not f.check(10, 10)
    assert not f.validate(10, 10)
    assert f.validate(9, 10)
    assert not f.validate(9, 10)


def test_check_is_read_only():
    f = ReplayFilter()
    for _ in range(3):
        assert f.check(5, 100)
    assert f.validate(5, 100)
    assert not f.check(5, 100)
    assert f.check(4, 100)


def test_reset_forgets_everything():
    f = ReplayFilter()
    for i in range(0, 3 * WINDOW_SIZE, 7):
        f.validate(i, 2**64)
    f.reset()
    for i in range(0, WINDOW_SIZE, 7):
        assert f.validate(i, 2**64), i


def test_far_jump_clears_stale_blocks():
    # Counters c and c + k * 8192 share a ring slot; a jump must not leave c's bit behind.
    f = ReplayFilter()
    assert f.validate(5, 2**64)
    assert f.validate(5 + 8192, 2**64)
    assert f.validate(5 + 8192 * 40, 2**64)
    assert f.validate(5 + 8192 * 40 - 8192 + 64, 2**64)  # same slot as 5 + 64, inside the window


def test_walking_forward_clears_each_new_block():
    # One step per block over five turns of the ring: each counter's slot still holds the bit
    # of the counter exactly 8192 earlier, which the move forward must have cleared.
    for stride in (64, 32, 8192 - 64, 8192 + 64):
        f = ReplayFilter()
        for c in range(0, 5 * 8192 + 1, stride):
            assert f.validate(c, 2**64), (stride, c)


class SlowReplay:
    """Obviously correct and slow: every counter ever accepted, and the highest."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = -1

    def validate(self, counter: int, limit: int) -> bool:
        if counter >= limit or counter in self.seen:
            return False
        if self.top >= 0 and self.top - counter > WINDOW_SIZE:
            return False
        self.seen.add(counter)
        self.top = max(self.top, counter)
        return True


# Counters are drawn as offsets from a moving base, so that runs stay near the window's edges,
# jump far ahead, and sometimes fall just outside.
_step = st.one_of(
    st.integers(-WINDOW_SIZE - 70, WINDOW_SIZE + 70),
    st.sampled_from(
        [-WINDOW_SIZE - 1, -WINDOW_SIZE, -WINDOW_SIZE + 1, 63, 64, 65, 8191, 8192, 8193]
    ),
    st.integers(0, 2**20),
    st.integers(-3, 3),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_step, min_size=1, max_size=300),
    st.one_of(
        st.integers(0, 200), st.integers(0, 2**64 - 1), st.just(REJECT_AFTER_MESSAGES - 9000)
    ),
)
def test_matches_slow_reference(steps, start):
    limit = REJECT_AFTER_MESSAGES
    fast, slow = ReplayFilter(), SlowReplay()
    base = start
    for step in steps:
        counter = min(max(base + step, 0), 2**64 - 1)
        expected = slow.validate(counter, limit)
        # check() is a pure prediction of validate().
        assert fast.check(counter, limit) is expected, counter
        assert fast.validate(counter, limit) is expected, counter
        base = max(base, counter)
