"""linux.run_apart: set-up steps in a forked child, and what the hub process never loads."""

import os
import signal
import subprocess
import sys

import pytest

from pytun.common import linux
from pytun.server import nat


def test_the_result_comes_back_and_the_work_happened_in_a_child():
    assert linux.run_apart(os.getpid) != os.getpid()
    assert linux.run_apart(sorted, [3, 1, 2]) == [1, 2, 3]


def test_the_childs_error_is_raised_here_with_its_message():
    def fails():
        raise nat.NatError("cannot create chain PYTUN-FORWARD: Permission denied")

    with pytest.raises(nat.NatError, match="PYTUN-FORWARD: Permission denied"):
        linux.run_apart(fails)


def test_a_child_that_dies_is_a_clear_error():
    with pytest.raises(linux.LinuxError, match="ended without a result"):
        linux.run_apart(lambda: os.kill(os.getpid(), signal.SIGKILL))


def test_a_result_that_cannot_be_sent_is_an_error_not_a_hang():
    with pytest.raises(linux.LinuxError, match="result cannot be handed back"):
        linux.run_apart(lambda: (lambda: None))


def test_the_hub_process_loads_neither_pyroute2_nor_python_iptables():
    code = ("import sys, pytun.server.main, pytun.server.hub; "
            "print(sorted(m for m in ('pyroute2', 'iptc') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
