"""pytun-client: the laptop end. One wg-quick file, one tunnel to the hub, in the foreground.

    pytun-client up alice.conf [--interface NAME]   runs until SIGTERM/SIGINT, then undoes it all
    pytun-client down alice.conf|alice               stops it; also cleans up after a SIGKILL
    pytun-client status [alice] [--json]             endpoint, latest handshake, bytes both ways
    pytun-client enroll TOKEN [-o alice.conf]        join with an invite (client/enroll.py)

The config is the file `pytun-admin add-peer` writes and stock WireGuard apps accept. The
interface is named after the file as wg-quick names it (alice.conf -> alice). Runtime files live
in $PYTUN_RUN_DIR, else /run/pytun: IFACE.json (what `down` must undo) and IFACE.sock (status).
Every failure is one line, `pytun-client: error: ...`, and exit status 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import signal
import stat
import sys
import time

import trio

from ..common.errors import PytunError
from ..common import __version__, cli, config, control, logformat
from ..common.cli import human_ago, human_bytes
from . import enroll as enroll_command
from . import routes, runtime, tunnel
from .runtime import TunnelError

PROG = "pytun-client"
STOP_TIMEOUT = 15.0  # seconds `down` waits for a running client to undo its own set-up
CAP_NET_ADMIN = 12
TUN_DEVICE = "/dev/net/tun"

_NAME_FROM_FILE = re.compile(r"(?:^|/)([a-zA-Z0-9_=+.-]{1,15})\.conf$")  # wg-quick's rule

log = logging.getLogger("pytun")


class ClientError(PytunError):
    """A one-line failure shown as `pytun-client: error: ...`."""


# ---------------------------------------------------------------------------------- config


def interface_from_path(path: str) -> str:
    """alice.conf -> alice, as wg-quick does; the name must be a valid interface name."""
    m = _NAME_FROM_FILE.search(path)
    if not m:
        raise ClientError(f"cannot name the interface after {os.path.basename(path)!r}: the file "
                          "must be NAME.conf with NAME 1-15 of a-z A-Z 0-9 _ = + . -; "
                          "or give --interface NAME")
    return m.group(1)


def check_interface(name: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9_=+.-]{1,15}", name):
        raise ClientError(f"bad interface name {name!r}: 1-15 of a-z A-Z 0-9 _ = + . -")
    return name


def read_config(path: str) -> tuple[str, os.stat_result, os.stat_result | None]:
    """The file's text, its status (of the very file read) and its directory's status."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise config.ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError:
            raise config.ConfigError(f"{path}:1: not a text file") from None
        except OSError as exc:
            raise config.ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        dir_st = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        dir_st = None
    return text, st, dir_st


def file_warnings(path: str, st) -> list[str]:
    """wg-quick's warning: the file holds the private key and others can read it."""
    if st.st_mode & 0o044:
        return [f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}) and "
                f"holds the private key; chmod 600 {path}"]
    return []


def hook_refusal(st, dir_st, euid: int) -> str | None:
    """Why hook commands (run as this user, usually root) must not come from this file, or None.

    Trusted: owned by root or by the user running pytun-client, writable by nobody else, in a
    directory nobody else can replace it in.
    """
    trusted = (0, euid)
    if st.st_uid not in trusted:
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o002:
        return "writable by others"
    if st.st_mode & 0o020 and st.st_gid not in trusted:
        return f"writable by group {st.st_gid}"
    if dir_st is not None:
        if dir_st.st_uid not in trusted:
            return f"in a directory owned by uid {dir_st.st_uid}"
        if not dir_st.st_mode & stat.S_ISVTX and (
                dir_st.st_mode & 0o002 or dir_st.st_mode & 0o020 and dir_st.st_gid not in trusted):
            return "in a directory others may write to"
    return None


def load_config(path: str) -> config.WgConfig:
    """Parse the file and insist on exactly one [Peer], the hub. Refuses hook commands from a
    file others could have written; warns when others can read it."""
    text, st, dir_st = read_config(path)
    cfg = config.parse(text, path)
    for warning in file_warnings(path, st):
        log.warning("%s", warning)
    i = cfg.interface
    if i.pre_up or i.post_up or i.pre_down or i.post_down:
        reason = hook_refusal(st, dir_st, os.geteuid())
        if reason:
            raise ClientError(f"{path}: refusing its PreUp/PostUp/PreDown/PostDown commands: "
                              f"the file is {reason}; they would run as this user "
                              f"(uid {os.geteuid()})")
    peer_lines = [n for n, line in enumerate(text.splitlines(), 1)
                  if line.split("#", 1)[0].strip().lower() == "[peer]"]
    if not cfg.peers:
        raise ClientError(f"{path}: no [Peer] section; pytun-client needs exactly one (the hub)")
    if len(cfg.peers) > 1:
        raise ClientError(f"{path}:{peer_lines[1]}: a second [Peer]; pytun-client supports "
                          "exactly one peer (the hub)")
    try:
        routes.parse_table(cfg.interface.table)
    except routes.PlanError as exc:
        line = next((n for n, text_line in enumerate(text.splitlines(), 1)
                     if text_line.split("=", 1)[0].strip().lower() == "table"), 0)
        raise ClientError(f"{path}:{line}: {exc}") from None
    return cfg


# ---------------------------------------------------------------------------------- checks


def _has_cap_net_admin() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_privileges() -> None:
    if not os.path.exists(TUN_DEVICE):
        raise ClientError(f"no {TUN_DEVICE}: the tun module is not loaded (modprobe tun)")
    if os.geteuid() != 0 and not _has_cap_net_admin():
        raise ClientError("pytun-client up needs root (or CAP_NET_ADMIN)")


# ---------------------------------------------------------------------------------- commands


def cmd_up(args) -> int:
    cfg = load_config(args.config)
    ifname = check_interface(args.interface) if args.interface else interface_from_path(args.config)
    check_privileges()
    directory = runtime.run_dir()
    runtime.ensure_run_dir(directory)
    old = runtime.read_state(runtime.state_path(ifname, directory))
    if old is not None:
        if runtime.is_running(old):
            raise ClientError(f"{ifname} is already up (pid {old['pid']}); "
                              f"run `pytun-client down {ifname}` first")
        log.info("cleaning up after an earlier %s that did not stop cleanly", ifname)
        for problem in runtime.undo_recorded(old):
            log.warning("%s", problem)
        _remove(runtime.state_path(ifname, directory))
    if not cfg.peers[0].allowed_ips:
        log.warning("no AllowedIPs in %s: nothing will go through the tunnel", args.config)
    t = tunnel.Tunnel(cfg, ifname, args.config, directory)
    try:
        with cli.unwrapped():  # an error in one of the tunnel's tasks comes in a group of one
            trio.run(t.run, strict_exception_groups=True)
    except KeyboardInterrupt:
        pass
    finally:
        for problem in t.teardown():
            log.warning("%s", problem)
    if t.error is not None:
        raise ClientError(str(t.error))
    log.info("%s is down", ifname)
    return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def find_tunnel(target: str, directory: str) -> tuple[str, dict | None]:
    """CONFIG or IFACE -> (interface name, its state or None)."""
    if "/" in target or target.endswith(".conf") or os.path.isfile(target):
        path = os.path.abspath(target)
        for state_file in sorted(glob.glob(os.path.join(directory, "*.json"))):
            try:
                state = runtime.read_state(state_file)
            except TunnelError:
                continue
            if state and state.get("config") == path:
                return state["interface"], state
        ifname = interface_from_path(target)
    else:
        ifname = check_interface(target)
    return ifname, runtime.read_state(runtime.state_path(ifname, directory))


def _wait_gone(state: dict, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while runtime.is_running(state):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kept_after_failure(state: dict, environ=os.environ) -> str | None:
    """Under systemd, ExecStopPost= runs `down` after every stop. After a failure (a crash, a
    kill -9: SERVICE_RESULT is not "success") a full tunnel's fail-closed routes stay, so the
    laptop does not send in clear until the unit restarts it; the next `up` or a `down` from a
    shell removes them. Returns the failure, or None when `down` should undo everything."""
    result = environ.get("SERVICE_RESULT")
    plan = state.get("plan") or {}
    if result and result != "success" and plan.get("full_tunnel") and not runtime.is_running(state):
        return result
    return None


def cmd_down(args) -> int:
    directory = runtime.run_dir()
    ifname, state = find_tunnel(args.target, directory)
    if state is None:
        raise ClientError(f"{ifname} is not up (nothing in {directory})")
    failure = kept_after_failure(state)
    if failure:
        log.warning("%s stopped with %s: its full tunnel stays closed (traffic for the internet "
                    "is refused) until it starts again or `pytun-client down %s` from a shell",
                    ifname, failure, ifname)
        return 0
    if runtime.is_running(state):
        pid = state["pid"]
        log.info("stopping %s (pid %d)", ifname, pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise ClientError(f"not allowed to stop pid {pid}; run as root") from None
        if not _wait_gone(state, STOP_TIMEOUT):
            log.warning("pid %d did not stop within %g s; killing it", pid, STOP_TIMEOUT)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(state, 5.0)
    else:
        log.info("%s was not stopped cleanly (pid %s is gone); removing what it set up",
                 ifname, state.get("pid"))
    # After a clean stop the client removed its state itself; otherwise undo what it recorded.
    leftover = runtime.read_state(runtime.state_path(ifname, directory))
    if leftover is not None:
        for problem in runtime.undo_recorded(leftover):
            log.warning("%s", problem)
        _remove(runtime.state_path(ifname, directory))
    _remove(runtime.socket_path(ifname, directory))
    log.info("%s is down", ifname)
    return 0


def _status_of(ifname: str, directory: str) -> dict:
    state = runtime.read_state(runtime.state_path(ifname, directory))
    if state is None:
        raise ClientError(f"{ifname} is not up")
    if not runtime.is_running(state):
        raise ClientError(f"{ifname} is not running (pid {state.get('pid')} is gone); "
                          f"`pytun-client down {ifname}` cleans up after it")
    try:
        pairs = control.request(runtime.socket_path(ifname, directory), [("get", "1")])
    except control.HubNotRunning:
        raise ClientError(f"{ifname} (pid {state['pid']}) does not answer on "
                          f"{runtime.socket_path(ifname, directory)}") from None
    except control.ControlError as exc:
        raise ClientError(f"{ifname}: {exc}") from None
    out: dict = {}
    for key, value in pairs:
        out[key] = int(value) if value.isdigit() else value
    return out


def format_status(s: dict, now: float | None = None) -> str:
    if "error" in s:
        return f"interface: {s['interface']} ({s['error']})\n"
    lines = [f"interface: {s.get('interface')} (pid {s.get('pid')}, {s.get('state')})",
             f"  public key: {s.get('public_key')}",
             f"  address: {s.get('address') or '-'}",
             f"hub: {s.get('hub') or '(no endpoint; waiting for the hub)'}",
             f"  endpoint: {s.get('endpoint') or '-'}",
             f"  latest handshake: {human_ago(s.get('latest_handshake') or None, now)}",
             f"  transfer: {human_bytes(s.get('rx_bytes', 0))} received, "
             f"{human_bytes(s.get('tx_bytes', 0))} sent"]
    if s.get("persistent_keepalive"):
        lines.append(f"  persistent keepalive: every {s['persistent_keepalive']} seconds")
    if s.get("full_tunnel"):
        lines.append("  routing: full tunnel")
    return "\n".join(lines) + "\n"


def cmd_status(args) -> int:
    directory = runtime.run_dir()
    if args.interface:
        names = [check_interface(args.interface)]
    else:
        names = sorted(os.path.basename(p)[:-5]
                       for p in glob.glob(os.path.join(directory, "*.json")))
    if not names:
        if args.json:
            print("[]")
        else:
            print(f"{PROG}: no tunnels are up", file=sys.stderr)
        return 0
    results = []
    for name in names:
        try:
            results.append(_status_of(name, directory))
        except ClientError as exc:
            if args.interface:
                raise
            results.append({"interface": name, "state": "not running", "error": str(exc)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        sys.stdout.write("\n".join(format_status(s) for s in results))
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The laptop end of pytun: a WireGuard tunnel to the hub, with its routes "
                    "and DNS, from one wg-quick config file.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("up", help="bring the tunnel up; stays in the foreground until "
                                   "SIGTERM or SIGINT",
                        description="Bring the tunnel up and stay in the foreground until SIGTERM "
                                    "or SIGINT, then remove its routes, rules and DNS.")
    sp.add_argument("config", metavar="CONFIG", help="wg-quick file, e.g. alice.conf")
    sp.add_argument("--interface", metavar="NAME",
                    help="interface name (default: the file name without .conf)")
    sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sp.set_defaults(fn=cmd_up)

    sp = sub.add_parser("down", help="stop a running tunnel, or clean up after a killed one",
                        description="Stop the tunnel and remove everything it set up; also "
                                    "cleans up after a client that was killed.")
    sp.add_argument("target", metavar="CONFIG|IFACE")
    sp.set_defaults(fn=cmd_down, verbose=False)

    sp = sub.add_parser("status", help="endpoint, latest handshake and traffic of tunnels",
                        description="Show the running tunnels (or one): the hub's endpoint, the "
                                    "latest handshake, bytes received and sent.")
    sp.add_argument("interface", metavar="IFACE", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_status, verbose=False)

    enroll_command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    logformat.setup(PROG, verbose=args.verbose)
    return cli.run(PROG, args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
