"""pytun-client enroll TOKEN [-o FILE]: join a hub with the token `pytun-admin invite` printed.

The key pair is made here, and the private key goes nowhere but into the config file: the hub
learns only the public key. The request (common/enroll.py) goes to the endpoint in the token,
over UDP, the same bytes again after 1, 2, 3... seconds until an answer comes or --timeout
passes. The answer is accepted only if it was made with the hub key the token names. The
config is written 0600 (an existing file is refused unless --force) and works with
`pytun-client up FILE`, wg-quick and the WireGuard apps. Errors are one line, exit status 1.

The answer may set the laptop's addresses, DNS, MTU, the hub's endpoint, AllowedIPs and
keepalive; a config that sets anything else (hook commands, which would run as root here, a
private key, Table, FwMark, ListenPort, SaveConfig) or names another hub is refused.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

from ..common.errors import PytunError
from ..common import config, enroll, files, keys

DEFAULT_TIMEOUT = 15.0
RETRY_AFTER = (1.0, 2.0, 3.0, 4.0)  # seconds between sends; the last one repeats
MAX_REPLY = 2048


class EnrollError(PytunError):
    """A one-line failure shown as `pytun-client: error: ...`."""


def default_output(name: str) -> str:
    """NAME.conf, with NAME made a valid interface name as wg-quick wants it (1-15 of
    a-z A-Z 0-9 _ = + . -), since `pytun-client up` names the interface after the file."""
    safe = re.sub(r"[^a-zA-Z0-9_=+.-]", "-", name)[:15].strip(".") or "pytun"
    return f"{safe}.conf"


def _reserve(path: str, force: bool) -> bool:
    """Make sure the config can be written before the invite is spent; True when an empty
    0600 file was created here (removed again if enrolling fails)."""
    if os.path.isdir(path):
        raise EnrollError(f"{path} is a directory; give a file name")
    if force:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK):
            raise EnrollError(f"cannot write in {directory}")
        return False
    try:
        files.create_private(path)
    except FileExistsError:
        raise EnrollError(f"{path} exists; give another -o FILE, or --force to replace it") \
            from None
    except OSError as exc:
        raise EnrollError(f"cannot write {path}: {exc.strerror}") from None
    return True


def exchange(endpoint: str, datagram: bytes, pending: enroll.Pending, timeout: float,
             *, clock=time.monotonic) -> tuple[bool, str]:
    """Send the request to `endpoint` until the hub's answer opens; (ok, text)."""
    try:
        host, port = config.parse_endpoint(endpoint)
    except ValueError as exc:
        raise EnrollError(f"the token's endpoint: {exc}") from None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except (socket.gaierror, IndexError) as exc:
        raise EnrollError(f"cannot resolve the hub's endpoint {host}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    refused = False
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)  # only the hub's address is heard
        start = clock()
        deadline, next_send, sends = start + timeout, start, 0
        while (now := clock()) < deadline:
            if now >= next_send:
                try:
                    sock.send(datagram)
                except ConnectionRefusedError:  # an ICMP error for an earlier send
                    refused = True
                except OSError as exc:
                    raise EnrollError(f"cannot send to the hub at {endpoint}: "
                                      f"{exc.strerror}") from None
                next_send = now + RETRY_AFTER[min(sends, len(RETRY_AFTER) - 1)]
                sends += 1
            sock.settimeout(max(0.001, min(next_send, deadline) - now))
            try:
                data = sock.recv(MAX_REPLY)
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                refused = True
                continue
            try:
                return enroll.open_reply_untrusted(pending, data)
            except enroll.EnrollFailure:
                continue  # not the hub's answer to this request
    why = ("nothing listens on that UDP port (the hub is not running?)" if refused else
           "check the endpoint, the hub's UDP port in its firewall, and that the token is for"
           " this hub; if the hub enrolled this laptop all the same, the invite is spent: ask"
           " for a new one")
    raise EnrollError(f"no answer from the hub at {endpoint} within {timeout:g} s: {why}")


def build_config(text: str, private: bytes, token: enroll.Token) -> config.WgConfig:
    """The hub's answer with this laptop's private key in it, after checking what it sets."""
    try:
        cfg = config.parse(text, "the hub's answer", require_private_key=False)
    except config.ConfigError as exc:
        raise EnrollError(f"the hub's answer is not a usable config: {exc}") from None
    i = cfg.interface
    if (i.private_key is not None or i.pre_up or i.post_up or i.pre_down or i.post_down
            or i.table is not None or i.fwmark is not None or i.listen_port is not None
            or i.save_config):
        raise EnrollError("the hub's answer sets what a hub may not set on a laptop (a private"
                          " key, hook commands, Table, FwMark, ListenPort or SaveConfig)")
    if len(cfg.peers) != 1 or cfg.peers[0].public_key != token.hub_public:
        raise EnrollError("the hub's answer names another hub than the token")
    if not i.addresses:
        raise EnrollError("the hub's answer gives this laptop no address")
    if cfg.peers[0].endpoint is None:
        cfg.peers[0].endpoint = config.parse_endpoint(token.endpoint)
    i.private_key = private
    return cfg


def cmd_enroll(args) -> int:
    text = sys.stdin.readline() if args.token == "-" else args.token
    try:
        token = enroll.parse_token(text)
    except enroll.BadToken as exc:
        raise EnrollError(str(exc)) from None
    if not 0 < args.timeout <= 600:
        raise EnrollError("--timeout must be from 0 to 600 seconds")
    path = args.output or default_output(token.name)
    created = _reserve(path, args.force)
    try:
        private = keys.generate_private()
        datagram, pending = enroll.create_request(token, private, os.urandom(32))
        ok, text = exchange(token.endpoint, datagram, pending, args.timeout)
        if not ok:
            raise EnrollError(f"the hub refused: {text}")
        cfg = build_config(text, private, token)
        try:
            keys.write_secret_file(path, config.render(cfg))
        except OSError as exc:
            raise EnrollError(f"enrolled, but cannot write {path}: {exc.strerror}") from None
    except BaseException:
        if created:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    addresses = ", ".join(str(a.ip) for a in cfg.interface.addresses)
    print(f"enrolled as {token.name} ({addresses}); config written to {path} (mode 0600);"
          f" start it with: pytun-client up {path}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("enroll", help="join a hub with an invite token; the key pair is made"
                                       " here and the private key never leaves this machine",
                        description="Join a hub with the token `pytun-admin invite NAME` "
                                    "printed: make a key pair here, register its public key "
                                    "with the hub, and write a wg-quick config (mode 0600).")
    sp.add_argument("token", metavar="TOKEN",
                    help="pytun1:..., or - to read it from stdin (out of the process list)")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="where to write the config (default: NAME.conf, after the invite)")
    sp.add_argument("--force", action="store_true", help="replace FILE if it exists")
    sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"give up after this long without an answer (default "
                         f"{DEFAULT_TIMEOUT:g})")
    sp.set_defaults(fn=cmd_enroll, verbose=False)
