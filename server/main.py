"""pytun-server: run the hub in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys

import trio

from ..common import __version__, cli, linux, logformat
from ..common.errors import PytunError
from . import nat, state
from .hub import Hub, StartupError
from .registry import RegistryError, mask

log = logging.getLogger("pytun")
PROG = "pytun-server"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pytun-server",
        description="Run the pytun hub: a WireGuard-compatible VPN concentrator with NAT.")
    p.add_argument("--state-dir", metavar="DIR",
                   help="hub state (default: $PYTUN_STATE_DIR, else /var/lib/pytun)")
    p.add_argument("--cleanup", action="store_true",
                   help="remove what a crashed hub left behind (firewall rules, ip_forward, "
                        "interface, control socket) and exit")
    p.add_argument("--workers", metavar="N",
                   help="data-plane worker processes: a number, or auto for one per core"
                        " (default: workers in hub.json, else 1)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=logformat.FORMATS, default="text",
                   help="text (default, for the journal), or json or logfmt lines with the"
                        " session log's fields, for log shippers")
    p.add_argument("--version", action="version", version=f"pytun-server {__version__}")
    return p


def cleanup(state_dir: str) -> None:
    try:
        settings = state.load_settings(state_dir)
    except state.StateError:
        settings = None
    if settings is not None:  # without settings, which hub's rules they are is unknown
        nat.cleanup(settings.interface, state_dir)
    if settings is not None:
        kind = linux.link_kind(settings.interface)
        if kind == "tun":
            linux.delete_link(settings.interface)
        elif kind is not None:
            log.warning("left %s alone: it is a %s device, not the hub's TUN device",
                        settings.interface, kind or "physical")
    leftovers = [state.socket_path(state_dir)]
    try:  # data-plane workers' control sockets (server/workers.py)
        leftovers += [os.path.join(state_dir, f) for f in os.listdir(state_dir)
                      if f.startswith("worker") and f.endswith(".sock")]
    except OSError:
        pass
    for path in leftovers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def registry_damage(path: str) -> str | None:
    """What SQLite's quick check finds wrong with an existing registry, or None. Run before the
    hub opens it for writing: a damaged registry is refused and left as it is (to restore from
    a backup, or to repair by hand), never written to."""
    if not os.path.exists(path):
        return None  # SqliteRegistry says so
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5.0)
        try:
            rows = db.execute("PRAGMA quick_check(1)").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return str(exc)
    found = rows[0][0] if rows else "no answer"
    return None if found == "ok" else found.replace("*** in database main ***", "").strip() \
        .splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    logformat.setup(PROG, verbose=args.verbose, kind=args.log_format)
    args.state_dir = state.resolve_state_dir(args.state_dir)
    return cli.run(PROG, _cleanup if args.cleanup else _serve, args)


def _cleanup(args) -> int:
    try:
        cleanup(args.state_dir)
    except (nat.NatError, linux.LinuxError, OSError) as exc:
        raise CleanupError(f"cleanup failed: {exc}") from None
    log.info("cleaned up what a hub with state in %s may have left", args.state_dir)
    return 0


def _serve(args) -> int:
    settings = state.load_settings(args.state_dir)
    private_key = state.load_private_key(args.state_dir)
    if not settings.registry:
        damage = registry_damage(state.registry_path(args.state_dir))
        if damage is not None:
            raise RegistryError(f"registry {state.registry_path(args.state_dir)} is damaged "
                                f"({damage}); the hub leaves it as it is: restore a backup "
                                f"(pytun-admin restore)")
    else:
        log.info("registry %s", mask(settings.registry))
    from .workers import Supervisor, resolve_workers
    count = resolve_workers(args.workers if args.workers is not None else settings.workers)
    registry = state.open_hub_registry(args.state_dir, settings)
    if count > 1:
        hub = Supervisor(args.state_dir, settings, private_key, registry, count=count,
                         verbose=args.verbose, log_format=args.log_format)
    else:
        hub = Hub(args.state_dir, settings, private_key, registry)
    try:
        with cli.unwrapped():  # an error in one of the hub's tasks comes in a group of one
            trio.run(hub.run, strict_exception_groups=True)
    except StartupError as exc:
        raise StartupError(f"cannot start: {exc}") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C while starting: a clean stop, like SIGINT once up
    finally:
        registry.close()
    log.info("stopped")
    return 0


class CleanupError(PytunError):
    """--cleanup could not remove something; the message says what."""


if __name__ == "__main__":
    sys.exit(main())
