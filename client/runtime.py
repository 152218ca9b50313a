"""A tunnel's runtime files, and undoing what they record.

    RUN_DIR/IFACE.json  the PID and everything set up, written before each step is carried
                        out, so `pytun-client down` can undo it after a kill -9
    RUN_DIR/IFACE.sock  the control socket (`status`)

RUN_DIR is /run/pytun, or $PYTUN_RUN_DIR.
"""

from __future__ import annotations

import json
import os

from ..common.errors import PytunError
from ..common import files, linux
from . import dns, hooks, routes

RUN_DIR = "/run/pytun"
STATE_VERSION = 1


class TunnelError(PytunError):
    """The tunnel cannot come up; the message is one line for the operator."""


def run_dir() -> str:
    return os.environ.get("PYTUN_RUN_DIR") or RUN_DIR


def state_path(ifname: str, directory: str | None = None) -> str:
    return os.path.join(directory or run_dir(), f"{ifname}.json")


def socket_path(ifname: str, directory: str | None = None) -> str:
    return os.path.join(directory or run_dir(), f"{ifname}.sock")


def ensure_run_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise TunnelError(f"cannot create {directory}: {exc.strerror}") from None


def write_state(path: str, state: dict) -> None:
    files.write_atomic(path, json.dumps(state, indent=2) + "\n")


def read_state(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TunnelError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise TunnelError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise TunnelError(f"{path} is not a pytun-client state file (version {STATE_VERSION})")
    return state


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None for a gone process.

    With the PID it names one process for good: a recycled PID has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def is_running(state: dict) -> bool:
    pid = state.get("pid")
    return isinstance(pid, int) and process_start_time(pid) == state.get("start_time")


def undo_recorded(state: dict, *, close=None) -> list[str]:
    """Undo what a state file records, in reverse: PreDown, DNS, rules and routes, the link,
    PostDown. `close` (the running tunnel's own teardown) closes its socket and TUN device
    before the link is looked at; `down` after a kill -9 has nothing to close. Returns
    problems, one line each."""
    ifname = state["interface"]
    down = state.get("down_hooks") or {}
    problems = hooks.run_hooks("PreDown", down.get("pre_down", []), ifname)
    problem = dns.undo(state.get("dns"))
    if problem:
        problems.append(problem)
    if state.get("plan"):
        problems += routes.undo(routes.Plan.from_json(state["plan"]), ifname)
    if close is not None:
        close()  # the TUN device goes with its last fd
    try:
        if state.get("link") and linux.link_exists(ifname):
            linux.delete_link(ifname)
    except linux.LinuxError as exc:
        problems.append(str(exc))
    problems += hooks.run_hooks("PostDown", down.get("post_down", []), ifname)
    return problems
