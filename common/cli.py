"""What the pytun commands share: run a subcommand and turn failures into one clear line."""

from __future__ import annotations

import sys


def run(prog: str, fn, args, expected: tuple) -> int:
    """fn(args)'s exit code; an expected error, an OSError or Ctrl-C becomes one stderr line."""
    try:
        return fn(args)
    except expected as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1
