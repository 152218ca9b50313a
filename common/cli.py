"""What the pytun commands share: run a subcommand and turn failures into one clear line.

The hub and the client run under trio with strict exception groups (trio's default since 0.25,
and asked for explicitly by both): an error that leaves a nursery arrives wrapped in an
ExceptionGroup, even when it is the only one. `unwrapped()` turns a group that holds one error
back into that error, so the usual `except` clauses, and the one-line messages, still apply.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator

from .errors import PytunError
from .keys import BadKey


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside a group (however deeply nested), or exc itself. A group of several
    errors stays a group, unless one is a KeyboardInterrupt: Ctrl-C wins."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
            continue
        interrupts = exc.subgroup(KeyboardInterrupt)
        if interrupts is None:
            break
        exc = interrupts
    return exc


@contextlib.contextmanager
def unwrapped() -> Iterator[None]:
    """Re-raise an exception group that holds one error as that error."""
    try:
        yield
    except BaseExceptionGroup as group:
        exc = sole_error(group)
        if exc is group:
            raise
        raise exc from exc.__cause__  # keeps its own cause; the group around it is noise


def describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def run(prog: str, fn: Callable[[Any], int], args: Any,
        expected: tuple[type[BaseException], ...] = ()) -> int:
    """fn(args)'s exit code, for every pytun command: a PytunError (or one of `expected`),
    a bad key, an OSError or Ctrl-C becomes one stderr line and exit status 1 (130 for
    Ctrl-C), also when it comes out of a trio nursery in an exception group."""
    expected = (PytunError, BadKey, *expected)
    try:
        with unwrapped():
            return fn(args)
    except expected as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 1


def human_ago(then: int | None, now: float | None = None) -> str:
    """'never', 'now', '1 minute, 3 seconds ago', as wg(8) shows a handshake."""
    if not then:
        return "never"
    delta = int((time.time() if now is None else now) - then)
    if delta <= 0:
        return "now"
    parts = []
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        n, delta = divmod(delta, size)
        if n:
            parts.append(f"{n} {unit}{'s' if n != 1 else ''}")
    return ", ".join(parts) + " ago"


def human_bytes(n: int) -> str:
    """'512 B', '1.50 KiB', '5.00 GiB'."""
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{n} B" if n < 1024 else f"{value:.2f} {unit}"
    raise AssertionError
