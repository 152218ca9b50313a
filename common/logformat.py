"""Logging for every pytun command: one set-up (`setup`), and the line formats: text (the
default, readable in the journal and on a terminal), json and logfmt (for log shippers).
A record's structured fields come in `extra={"fields": {...}}`; the text format shows only
the message, the others add every field beside it."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

FORMATS = ("text", "json", "logfmt")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-\[\]]+$")


def _base(record: logging.LogRecord) -> dict[str, object]:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        out.update(getattr(record, "fields", None) or {})
        return json.dumps(out, separators=(",", ":"), default=str)


def _logfmt_value(value: object) -> str:
    text = "" if value is None else str(value)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        out.update(getattr(record, "fields", None) or {})
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in out.items())


class TextFormatter(logging.Formatter):
    """`prog: message`, with `warning: ` or `error: ` before the message at those levels."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_WORDS.get(record.levelno, "")
        return f"{self.prog}: {level}{record.getMessage()}"


_LEVEL_WORDS = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
                logging.CRITICAL: "error: "}


def formatter(kind: str, prog: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    if kind == "logfmt":
        return LogfmtFormatter()
    return TextFormatter(prog)


def setup(prog: str, *, verbose: bool = False, kind: str = "text") -> None:
    """Send the `pytun` loggers' lines to stderr in format `kind`; debug lines with `verbose`.
    Calling it again replaces the earlier set-up (no line is written twice)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind, prog))
    root = logging.getLogger("pytun")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
