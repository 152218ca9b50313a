"""The hub's control socket: a root-only unix socket speaking `key=value` lines.

In the spirit of WireGuard's cross-platform UAPI. A request is `key=value` lines ended by an
empty line; the answer is `key=value` lines, then `errno=N`, then an empty line. One request per
connection. errno 0 means success; otherwise a `message=` line says why.

    get=1             ->  for each peer, in order:
                            peer=<name>
                            public_key=<base64>
                            address=<cidr, e.g. 10.77.0.2/32>
                            endpoint=<ip:port, or empty if never seen>
                            latest_handshake=<unix seconds, 0 if never>
                            rx_bytes=<n>
                            tx_bytes=<n>
                          errno=0
    sync=1            ->  the hub re-reads the registry and applies the difference;
                          errno=0 once applied

Example session (`printf 'get=1\\n\\n' | socat - UNIX-CONNECT:/var/lib/pytun/control.sock`):

    peer=alice
    public_key=xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
    address=10.77.0.2/32
    endpoint=198.51.100.7:40211
    latest_handshake=1732246157
    rx_bytes=18232
    tx_bytes=92840
    errno=0

The parsing and formatting functions are pure; `serve` is the thin trio layer and `request` the
blocking client pytun-admin uses.
"""

from __future__ import annotations

import errno as _errno
import inspect
import logging
import os
import re
import socket
import stat
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import PytunError

if TYPE_CHECKING:
    import trio

log = logging.getLogger("pytun.control")

MAX_REQUEST = 64 * 1024
MAX_RESPONSE = 16 * 1024 * 1024
TIMEOUT = 5.0
_KEY = re.compile(r"[a-z_][a-z0-9_]*")

Pairs = list[tuple[str, str]]


class ControlError(PytunError):
    """A refused request, or a failed exchange. `errno` travels in the answer."""

    def __init__(self, message: str, errno: int = _errno.EINVAL):
        super().__init__(message)
        self.errno = errno


class HubNotRunning(ControlError):
    """Nothing listens on the control socket."""

    def __init__(self, message: str):
        super().__init__(message, _errno.ECONNREFUSED)


# ---------------------------------------------------------------------------------- pure


def _parse_lines(text: str, what: str) -> Pairs:
    pairs: Pairs = []
    for line in text.split("\n"):
        if line == "":
            break
        key, sep, value = line.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ControlError(f"bad {what} line {line[:60]!r}: expected key=value")
        pairs.append((key, value))
    return pairs


def parse_request(text: str) -> Pairs:
    """`key=value` lines up to the first empty line (or the end of the text)."""
    return _parse_lines(text, "request")


def _format_lines(pairs: Iterable[tuple[str, object]]) -> str:
    out = []
    for key, value in pairs:
        value = "" if value is None else str(value)
        if not _KEY.fullmatch(key) or "\n" in value or "\r" in value:
            raise ControlError(f"cannot send {key!r}: keys are [a-z0-9_], values one line")
        out.append(f"{key}={value}\n")
    return "".join(out)


def format_request(pairs: Iterable[tuple[str, object]]) -> str:
    return _format_lines(pairs) + "\n"


def format_response(pairs: Iterable[tuple[str, object]], errno: int = 0) -> str:
    return _format_lines(pairs) + f"errno={int(errno)}\n\n"


def parse_response(text: str) -> tuple[Pairs, int]:
    pairs = _parse_lines(text, "response")
    if not pairs or pairs[-1][0] != "errno":
        raise ControlError("incomplete response from the hub (no errno line)", _errno.EPROTO)
    try:
        errno = int(pairs[-1][1])
    except ValueError:
        raise ControlError(f"bad errno {pairs[-1][1]!r} from the hub", _errno.EPROTO) from None
    return pairs[:-1], errno




def get_response_pairs(peers: Iterable[dict[str, Any]]) -> Pairs:
    """What the hub answers to get=1, from dicts shaped like `peers_from_get` returns."""
    pairs: Pairs = []
    for p in peers:
        pairs.append(("peer", p["name"]))
        pairs.append(("public_key", p["public_key"]))
        pairs.append(("address", str(p["address"])))
        pairs.append(("endpoint", p.get("endpoint") or ""))
        pairs.append(("latest_handshake", str(int(p.get("latest_handshake") or 0))))
        pairs.append(("rx_bytes", str(int(p.get("rx_bytes") or 0))))
        pairs.append(("tx_bytes", str(int(p.get("tx_bytes") or 0))))
    return pairs


def peers_from_get(pairs: Pairs) -> list[dict[str, Any]]:
    """The get=1 answer as dicts: name, public_key, address, endpoint (str or None),
    latest_handshake (int or None), rx_bytes, tx_bytes. Unknown keys are skipped."""
    peers: list[dict[str, Any]] = []
    for key, value in pairs:
        if key == "peer":
            peers.append({"name": value, "public_key": "", "address": "", "endpoint": None,
                          "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0})
        elif not peers:
            raise ControlError(f"{key}= before any peer= in the hub's answer", _errno.EPROTO)
        elif key in ("public_key", "address"):
            peers[-1][key] = value
        elif key == "endpoint":
            peers[-1][key] = value or None
        elif key in ("latest_handshake", "rx_bytes", "tx_bytes"):
            try:
                n = int(value)
            except ValueError:
                raise ControlError(f"bad {key}={value!r} from the hub", _errno.EPROTO) from None
            peers[-1][key] = (n or None) if key == "latest_handshake" else n
    return peers


# ---------------------------------------------------------------------------------- server

Handler = Callable[[Pairs], "Pairs"]


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it",
                           _errno.EEXIST)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: left over from a hub that died
        return
    finally:
        probe.close()
    raise ControlError(f"another hub is already listening on {path}", _errno.EADDRINUSE)


def _bind_private(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # the socket file is created 0600: root-only
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return sock


class _Ignored:
    @staticmethod
    def started(value: object = None) -> None:
        pass


# trio is imported by the serving side only: the admin tool, a client, starts ~150 ms sooner.

async def serve(path: str, handler: Handler, *, task_status: Any = _Ignored) -> None:
    """Answer control requests on `path` until cancelled; then remove the socket file.

    `handler(pairs)` returns the answer pairs (it may also be async). It may raise
    ControlError(message, errno); any other exception answers errno=1 and is logged.
    Handlers run one at a time.
    """
    import trio

    _remove_stale(path)
    raw = _bind_private(path)
    ident = os.stat(path).st_ino
    raw.listen(16)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
    lock = trio.Lock()
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_connection, stream, handler, lock)
    finally:
        listener.socket.close()
        try:
            if os.stat(path).st_ino == ident:
                os.unlink(path)
        except OSError:
            pass


async def _read_request(stream: trio.SocketStream) -> str:
    data = b""
    while b"\n\n" not in data and not data.startswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ControlError(f"request larger than {MAX_REQUEST} bytes", _errno.EMSGSIZE)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError("request is not UTF-8") from None


async def _answer(pairs: Pairs, handler: Handler, lock: trio.Lock) -> str:
    async with lock:
        try:
            result = handler(pairs)
            if inspect.isawaitable(result):
                result = await result
            return format_response(result or [])
        except ControlError as exc:
            return format_response([("message", str(exc))], exc.errno or 1)
        except Exception as exc:
            log.exception("control request %s failed", [k for k, _ in pairs])
            return format_response([("message", f"internal error: {type(exc).__name__}")], 1)


async def _connection(stream: trio.SocketStream, handler: Handler, lock: trio.Lock) -> None:
    import trio

    async with stream:
        try:
            with trio.fail_after(TIMEOUT):
                try:
                    pairs = parse_request(await _read_request(stream))
                except ControlError as exc:
                    reply = format_response([("message", str(exc))], exc.errno)
                else:
                    reply = await _answer(pairs, handler, lock)
                await stream.send_all(reply.encode("utf-8"))
        except trio.TooSlowError:
            log.warning("control client too slow; dropped")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


# ---------------------------------------------------------------------------------- client


def request(path: str, pairs: Iterable[tuple[str, object]], timeout: float = TIMEOUT) -> Pairs:
    """Send one request and return the answer's pairs (without errno).

    Raises HubNotRunning when nothing listens on `path`, ControlError when the hub answers
    errno != 0 or the exchange fails.
    """
    payload = format_request(pairs).encode("utf-8")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise HubNotRunning(f"no hub is listening on {path}") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}; the control socket is root-only",
                               _errno.EACCES) from None
        data = b""
        try:
            sock.sendall(payload)
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_RESPONSE:
                    raise ControlError("response from the hub is too large", _errno.EMSGSIZE)
        except socket.timeout:
            raise ControlError(f"the hub did not answer within {timeout:g} s",
                               _errno.ETIMEDOUT) from None
        except OSError as exc:
            raise ControlError(f"talking to the hub on {path}: {exc.strerror or exc}",
                               exc.errno or 1) from None
    finally:
        sock.close()
    answer, errno = parse_response(data.decode("utf-8", errors="replace"))
    if errno != 0:
        message = dict(answer).get("message") or os.strerror(errno)
        raise ControlError(message, errno)
    return answer
