"""Errors that leave a trio nursery still become the commands' one-line messages.

trio wraps every error that leaves a nursery in an ExceptionGroup (strict_exception_groups, the
default since trio 0.25, and asked for by pytun-server and pytun-client). A group that holds
one error must read exactly as that error would: `pytun-server: error: ...`, exit status 1, one
line, and Ctrl-C stays Ctrl-C. Each command is driven the way its console script runs it, with
a task that fails inside a real nursery.
"""

from __future__ import annotations

import errno
import logging

import pytest
import trio

from pytun.client import main as client_main
from pytun.client import tunnel
from pytun.common import cli, linux
from pytun.server import admin
from pytun.server import main as server_main

from .test_client import conf


async def nursery_with_a_failing_task(exc: BaseException) -> None:
    async def fail():
        raise exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)
        await trio.sleep_forever()


def run_failing(exc: BaseException) -> None:
    trio.run(nursery_with_a_failing_task, exc, strict_exception_groups=True)


def one_line(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix), err
    return err[len(prefix):].rstrip("\n")


# ---------------------------------------------------------------------------------- common/cli.py


def test_a_nursery_error_arrives_in_a_group_of_one():
    with pytest.raises(BaseExceptionGroup) as info:
        run_failing(ValueError("bad"))
    assert [type(e) for e in info.value.exceptions] == [ValueError]
    assert str(cli.sole_error(info.value)) == "bad"


def test_sole_error_unwraps_nested_groups_and_keeps_groups_of_several():
    inner = OSError(errno.ENOENT, "No such file or directory")
    assert cli.sole_error(ExceptionGroup("a", [ExceptionGroup("b", [inner])])) is inner
    several = ExceptionGroup("two", [ValueError("x"), OSError("y")])
    assert cli.sole_error(several) is several
    mixed = BaseExceptionGroup("ctrl-c", [ValueError("x"), KeyboardInterrupt()])
    assert isinstance(cli.sole_error(mixed), KeyboardInterrupt)
    plain = ValueError("not a group")
    assert cli.sole_error(plain) is plain


def test_unwrapped_keeps_the_errors_own_cause():
    cause = KeyError("underneath")
    err = ValueError("on top")
    err.__cause__ = cause
    with pytest.raises(ValueError) as info:
        with cli.unwrapped():
            raise ExceptionGroup("g", [err])
    assert info.value is err and info.value.__cause__ is cause


@pytest.mark.parametrize("exc, expected", [
    (ValueError("the expected kind"), "the expected kind"),
    (OSError(errno.EACCES, "Permission denied", "/dev/net/tun"),
     "Permission denied: /dev/net/tun"),
])
def test_cli_run_turns_a_group_of_one_into_one_line(capsys, exc, expected):
    rc = cli.run("pytun-x", lambda args: run_failing(exc), None, (ValueError,))
    assert rc == 1
    assert one_line(capsys, "pytun-x: error: ") == expected


def test_cli_run_ctrl_c_in_a_group_is_an_interruption(capsys):
    rc = cli.run("pytun-x", lambda args: run_failing(KeyboardInterrupt()), None, ())
    assert rc == 130
    assert capsys.readouterr().err == "pytun-x: interrupted\n"


def test_cli_run_lets_a_group_of_several_errors_through():
    def two(args):
        raise ExceptionGroup("two tasks failed", [ValueError("a"), ValueError("b")])

    with pytest.raises(ExceptionGroup):
        cli.run("pytun-x", two, None, (ValueError,))


# ---------------------------------------------------------------------------------- pytun-server


@pytest.fixture
def state_dir(tmp_path, capsys):
    d = str(tmp_path / "state")
    assert admin.main(["--state-dir", d, "init", "--subnet", "10.77.0.0/24",
                       "--endpoint", "vpn.example.com"]) == 0
    capsys.readouterr()
    # pytun-server logs through logging.basicConfig(), which writes to this test's stderr only
    # when no handler is left from an earlier test (pytun-client's point at a closed capture).
    root, pytun = logging.getLogger(), logging.getLogger("pytun")
    saved = root.handlers[:], pytun.handlers[:], pytun.propagate
    root.handlers[:], pytun.handlers[:], pytun.propagate = [], [], True
    yield d
    root.handlers[:], pytun.handlers[:], pytun.propagate = saved


class FailingHub:
    """Stands in for Hub: one of its tasks fails once it runs, as the data thread's would."""

    error: BaseException = OSError(errno.ENETDOWN, "Network is down")

    def __init__(self, *args):
        pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await nursery_with_a_failing_task(self.error)


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENETDOWN, "Network is down"), "pytun-server: error: Network is down"),
    (server_main.StartupError("no TUN device"), "pytun-server: error: cannot start: no TUN device"),
])
def test_server_turns_a_task_error_into_one_line(state_dir, capsys, monkeypatch, error, expected):
    monkeypatch.setattr(FailingHub, "error", error)
    monkeypatch.setattr(server_main, "Hub", FailingHub)
    assert server_main.main(["--state-dir", state_dir]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [expected], err


def test_server_ctrl_c_while_starting_is_a_clean_stop(state_dir, capsys, monkeypatch):
    monkeypatch.setattr(FailingHub, "error", KeyboardInterrupt())
    monkeypatch.setattr(server_main, "Hub", FailingHub)
    assert server_main.main(["--state-dir", state_dir]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" not in err, err


# ---------------------------------------------------------------------------------- pytun-client


class FailingTunnel:
    """Stands in for tunnel.Tunnel: up, then one of its tasks fails."""

    error_to_raise: BaseException = linux.LinuxError("the TUN device went away")
    torn_down = False

    def __init__(self, *args):
        self.error = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        await nursery_with_a_failing_task(self.error_to_raise)

    def teardown(self) -> list[str]:
        FailingTunnel.torn_down = True
        return []


@pytest.fixture
def client_up(tmp_path, monkeypatch):
    path = tmp_path / "alice.conf"
    path.write_text(conf())
    path.chmod(0o600)  # as add-peer -o writes it; a readable one is warned about
    monkeypatch.setenv("PYTUN_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(client_main, "check_privileges", lambda: None)
    monkeypatch.setattr(tunnel, "Tunnel", FailingTunnel)
    monkeypatch.setattr(FailingTunnel, "torn_down", False)
    return str(path)


@pytest.mark.parametrize("error, expected", [
    (linux.LinuxError("the TUN device went away"), "the TUN device went away"),
    (OSError(errno.EBADF, "Bad file descriptor"), "Bad file descriptor"),
])
def test_client_turns_a_task_error_into_one_line_and_tears_down(client_up, capsys, monkeypatch,
                                                                 error, expected):
    monkeypatch.setattr(FailingTunnel, "error_to_raise", error)
    assert client_main.main(["up", client_up]) == 1
    assert one_line(capsys, "pytun-client: error: ") == expected
    assert FailingTunnel.torn_down


def test_client_ctrl_c_in_a_group_takes_the_tunnel_down(client_up, capsys, monkeypatch):
    monkeypatch.setattr(FailingTunnel, "error_to_raise", KeyboardInterrupt())
    assert client_main.main(["up", client_up]) == 0
    assert capsys.readouterr().err.splitlines() == ["pytun-client: alice is down"]
    assert FailingTunnel.torn_down
