"""pytun-admin commands for operations: `metrics` (where the hub serves Prometheus metrics)."""

from __future__ import annotations

import os
import sys

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


def add_commands(add) -> None:
    """Register the operations commands with pytun-admin's parser (`add` is its helper)."""
    sp = add("metrics", cmd_metrics, "show or change where the hub serves Prometheus metrics")
    sp.add_argument("--listen", metavar="ADDR:PORT", help="e.g. 127.0.0.1:9586")
    sp.add_argument("--off", action="store_true", help="serve no metrics")
    sp.add_argument("--token-file", metavar="FILE", help="require the bearer token in FILE")
    sp.add_argument("--no-token", action="store_true", help="require no token")
