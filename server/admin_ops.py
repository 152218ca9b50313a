"""pytun-admin commands for operations: `metrics` (where the hub serves Prometheus metrics),
`doctor`, `audit`, and `ha` (the hot-standby role keepalived's notify hook sets)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from . import state
from .admin import AdminError as OpsError
from .metrics import MetricsError, parse_listen


def cmd_metrics(args) -> int:
    settings = state.load_settings(args.state_dir)
    if not (args.listen or args.off or args.token_file or args.no_token):
        print(f"metrics: {settings.metrics or 'off'}")
        print(f"token file: {settings.metrics_token_file or 'none'}")
        return 0
    if args.listen and args.off:
        raise OpsError("give --listen ADDR or --off, not both")
    if args.token_file and args.no_token:
        raise OpsError("give --token-file FILE or --no-token, not both")
    if args.listen:
        try:
            parse_listen(args.listen)
        except MetricsError as exc:
            raise OpsError(str(exc)) from None
        settings.metrics = args.listen
    if args.off:
        settings.metrics = None
    if args.token_file:
        settings.metrics_token_file = os.path.abspath(args.token_file)
    if args.no_token:
        settings.metrics_token_file = None
    state.save_settings(args.state_dir, state.HubSettings.from_json(settings.to_json()))
    print(f"metrics: {settings.metrics or 'off'}; a running hub applies it when restarted",
          file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    from . import doctor
    checks = doctor.run(args.state_dir)
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        for check in checks:
            print(check.lines())
        counts = {s: sum(c.status == s for c in checks) for s in (doctor.PASS, doctor.WARN,
                                                                   doctor.FAIL)}
        print(f"{counts['PASS']} passed, {counts['WARN']} warnings, {counts['FAIL']} failed")
    return 1 if any(c.status == doctor.FAIL for c in checks) else 0


HA_STATES = ("master", "backup", "fault", "stop", "status")


def cmd_ha(args) -> int:
    from ..common import control
    settings = state.load_settings(args.state_dir)
    if settings.ha is None:
        raise OpsError("hot standby is off: hub.json has no ha setting (see README, Hot"
                       " standby)")
    try:
        pairs = dict(control.request(state.socket_path(args.state_dir),
                                     [("ha", args.state)]))
    except control.HubNotRunning:
        raise OpsError("hub not running; it starts as "
                       f"{settings.ha['start_as']} (ha.start_as in hub.json)") from None
    except control.ControlError as exc:
        raise OpsError(str(exc)) from None
    print(f"role: {pairs.get('role')}, service address {pairs.get('service_address')},"
          f" {pairs.get('standby_drops', '0')} datagrams dropped while standby")
    return 0


def audited(args, argv: list[str]):
    """args.fn wrapped so that what it changes goes to the audit log (audit.py)."""
    from . import audit
    command = " ".join(filter(None, (args.command, getattr(args, "access_command", None),
                                     getattr(args, "group_command", None))))
    if command in audit.READ_ONLY:
        return args.fn
    return audit.wrap(args.fn, args.state_dir, list(argv), command)


def cmd_audit(args) -> int:
    from . import admin, audit
    since = None
    if args.since:
        if args.since[-1:].lower() in admin.DURATION and args.since[:-1].isdigit():
            since = time.time() - admin.parse_duration(args.since)
        else:
            since = admin.parse_time(args.since)
    entries = audit.read(args.state_dir, since)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        who = e["user"] + (f" (sudo by {e['sudo_user']})" if e.get("sudo_user") else "")
        print(f"{e['time']}  {who} uid {e['uid']}: {e['command']}")
        for change in e["changes"]:
            print(f"    {audit.describe(change)}")
    return 0


def add_commands(add) -> None:
    """Register the operations commands with pytun-admin's parser (`add` is its helper)."""
    sp = add("metrics", cmd_metrics, "show or change where the hub serves Prometheus metrics")
    sp.add_argument("--listen", metavar="ADDR:PORT", help="e.g. 127.0.0.1:9586")
    sp.add_argument("--off", action="store_true", help="serve no metrics")
    sp.add_argument("--token-file", metavar="FILE", help="require the bearer token in FILE")
    sp.add_argument("--no-token", action="store_true", help="require no token")
    sp = add("audit", cmd_audit, "every change made with pytun-admin: who, when, before, after")
    sp.add_argument("--since", metavar="TIME", help="a duration back (2h, 7d) or a time"
                    " (2026-12-01T00:00:00Z)")
    sp.add_argument("--json", action="store_true")
    sp = add("ha", cmd_ha, "hot standby: set the running hub's role (keepalived's notify hook"
             " calls it) or show it")
    sp.add_argument("state", choices=HA_STATES, nargs="?", default="status",
                    help="master: take over and call laptops back; backup, fault, stop: end"
                         " every session and answer nothing; status (default): show the role")
    sp = add("doctor", cmd_doctor, "check the host and the hub: PASS, WARN or FAIL with the fix"
             " (exit 1 on a FAIL)")
    sp.add_argument("--json", action="store_true")
