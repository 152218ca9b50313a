"""The control socket: the pure line protocol, then serve() and request() over a real unix socket."""

import errno
import os
import socket
import stat
import threading

import pytest
import trio

from pytun.common import control
from pytun.common.control import ControlError, HubNotRunning


def test_parse_request():
    assert control.parse_request("get=1\n\n") == [("get", "1")]
    assert control.parse_request("a=1\nb=\nc=x=y\n\nignored=after") == [("a", "1"), ("b", ""), ("c", "x=y")]
    assert control.parse_request("sync=1") == [("sync", "1")]
    assert control.parse_request("\n") == []
    for bad in ("get\n\n", "=1\n\n", "Get=1\n\n", "a b=1\n\n"):
        with pytest.raises(ControlError, match="bad request line") as info:
            control.parse_request(bad)
        assert info.value.errno == errno.EINVAL


def test_format_and_parse_response():
    text = control.format_response([("peer", "alice"), ("rx_bytes", 5)])
    assert text == "peer=alice\nrx_bytes=5\nerrno=0\n\n"
    assert control.parse_response(text) == ([("peer", "alice"), ("rx_bytes", "5")], 0)
    assert control.format_response([], errno=22) == "errno=22\n\n"
    assert control.parse_response("message=no\nerrno=2\n\n") == ([("message", "no")], 2)
    with pytest.raises(ControlError, match="no errno"):
        control.parse_response("peer=alice\n\n")
    with pytest.raises(ControlError, match="bad errno"):
        control.parse_response("errno=x\n\n")
    with pytest.raises(ControlError):
        control.format_response([("message", "two\nlines")])
    assert control.format_request([("get", 1)]) == "get=1\n\n"


GET = [
    {"name": "alice", "public_key": "k1", "address": "10.77.0.2/32", "endpoint": "198.51.100.7:4000",
     "latest_handshake": 1700000000, "rx_bytes": 10, "tx_bytes": 20},
    {"name": "bob", "public_key": "k2", "address": "10.77.0.3/32", "endpoint": None,
     "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0},
]


def test_get_round_trip():
    pairs = control.get_response_pairs(GET)
    assert pairs[:7] == [("peer", "alice"), ("public_key", "k1"), ("address", "10.77.0.2/32"),
                         ("endpoint", "198.51.100.7:4000"), ("latest_handshake", "1700000000"),
                         ("rx_bytes", "10"), ("tx_bytes", "20")]
    assert ("endpoint", "") in pairs and ("latest_handshake", "0") in pairs
    text = control.format_response(pairs)
    assert control.peers_from_get(control.parse_response(text)[0]) == GET
    with pytest.raises(ControlError, match="before any peer"):
        control.peers_from_get([("rx_bytes", "1")])
    assert control.peers_from_get([("peer", "x"), ("future_key", "1")])[0]["name"] == "x"


# ---------------------------------------------------------------------------------- socket


def handler(pairs):
    d = dict(pairs)
    if "get" in d:
        return control.get_response_pairs(GET)
    if "sync" in d:
        return []
    if "refuse" in d:
        raise ControlError("peer is disabled", errno.EPERM)
    if "crash" in d:
        raise RuntimeError("bug with secret-ish details")
    return [("echo", ",".join(k for k, _ in pairs))]


class Server:
    """serve() in a trio loop on its own thread, so the blocking client runs as pytun-admin does."""

    def __init__(self, path, fn=handler):
        self.path, self.fn = str(path), fn
        self.started = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self):
        async with trio.open_nursery() as nursery:
            self.token = trio.lowlevel.current_trio_token()
            self.cancel = nursery.cancel_scope
            await nursery.start(control.serve, self.path, self.fn)
            self.started.set()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(5)
        return self

    def __exit__(self, *exc):
        trio.from_thread.run_sync(self.cancel.cancel, trio_token=self.token)
        self.thread.join(5)
        assert not self.thread.is_alive()


def test_serve_and_request(tmp_path):
    path = tmp_path / "control.sock"
    with Server(path):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert control.peers_from_get(control.request(str(path), [("get", "1")])) == GET
        assert control.request(str(path), [("sync", "1")]) == []
        with pytest.raises(ControlError, match="peer is disabled") as info:
            control.request(str(path), [("refuse", "1")])
        assert info.value.errno == errno.EPERM
        with pytest.raises(ControlError, match="internal error: RuntimeError") as info:
            control.request(str(path), [("crash", "1")])
        assert info.value.errno == 1
        # the server survives all of that
        assert control.request(str(path), [("a", "1"), ("b", "2")]) == [("echo", "a,b")]
    assert not path.exists()


def raw_exchange(path, payload: bytes) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode()


def oversized_exchange(path, payload: bytes) -> str:
    """Like raw_exchange, for a request the hub stops reading: our writes may then fail, and
    the hub's close with our bytes unread makes the kernel report a reset, but only after the
    answer it wrote has been read (Linux's AF_UNIX keeps queued data ahead of the error)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    return data.decode()


def test_bad_requests_get_errno(tmp_path):
    path = tmp_path / "control.sock"
    with Server(path):
        pairs, err = control.parse_response(raw_exchange(path, b"not a pair\n\n"))
        assert err == errno.EINVAL and "bad request line" in dict(pairs)["message"]
        # The hub answers and hangs up without reading the rest: the answer still arrives.
        answer = oversized_exchange(path, b"x=" + b"a" * (70 * 1024) + b"\n\n")
        assert control.parse_response(answer)[1] == errno.EMSGSIZE
        pairs, err = control.parse_response(raw_exchange(path, b"\xff\xfe=1\n\n"))
        assert err != 0
        # a request without the blank line but with the write side closed still gets an answer
        assert control.parse_response(raw_exchange(path, b"sync=1\n")) == ([], 0)


def test_async_handler(tmp_path):
    async def slow(pairs):
        await trio.sleep(0.01)
        return [("ok", "1")]

    path = tmp_path / "c.sock"
    with Server(path, slow):
        assert control.request(str(path), [("x", "1")]) == [("ok", "1")]


def test_not_running(tmp_path):
    with pytest.raises(HubNotRunning):
        control.request(str(tmp_path / "absent.sock"), [("get", "1")])
    with pytest.raises(HubNotRunning):
        control.request(str(tmp_path / "no-dir" / "x.sock"), [("get", "1")])
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: connection refused
    with pytest.raises(HubNotRunning):
        control.request(str(stale), [("get", "1")])
    assert issubclass(HubNotRunning, ControlError)


def test_stale_socket_replaced_live_one_refused(tmp_path):
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    with Server(path):
        assert control.request(str(path), [("sync", "1")]) == []

        async def second():
            await control.serve(str(path), handler)

        with pytest.raises(ControlError, match="already listening"):
            trio.run(second)
        assert control.request(str(path), [("sync", "1")]) == []
    regular = tmp_path / "file"
    regular.write_text("keep me")

    async def over_file():
        await control.serve(str(regular), handler)

    with pytest.raises(ControlError, match="not a socket"):
        trio.run(over_file)
    assert regular.read_text() == "keep me"


def test_client_timeout(tmp_path):
    """A listener that never answers: the client gives up after its timeout."""
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as mute:
        mute.bind(str(path))
        mute.listen(1)
        with pytest.raises(ControlError, match="did not answer") as info:
            control.request(str(path), [("get", "1")], timeout=0.2)
        assert not isinstance(info.value, HubNotRunning)
