"""Log line formats for pytun-server: text (the default, readable in the journal), json and
logfmt (for log shippers). A record's structured fields come in `extra={"fields": {...}}`;
the text format shows only the message, the others add every field beside it."""

from __future__ import annotations

import json
import logging
import re
import time

FORMATS = ("text", "json", "logfmt")
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+\-\[\]]+$")


def _base(record: logging.LogRecord) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        out.update(getattr(record, "fields", None) or {})
        return json.dumps(out, separators=(",", ":"), default=str)


def _logfmt_value(value) -> str:
    text = "" if value is None else str(value)
    if text and _BARE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = _base(record)
        out.update(getattr(record, "fields", None) or {})
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in out.items())


def formatter(kind: str, prog: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    if kind == "logfmt":
        return LogfmtFormatter()
    return logging.Formatter(f"{prog}: %(message)s")
