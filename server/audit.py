"""The audit log: every change made through pytun-admin, who made it, when, before and after.

`audit.log` beside the registry holds one JSON object a line, appended (O_APPEND, fsync) and
never rewritten:

    {"time": "2026-12-01T09:12:03Z", "uid": 0, "user": "root", "sudo_user": "alice",
     "command": "disable-peer", "argv": ["disable-peer", "bob"],
     "changes": [{"object": "peer:bob", "before": {..."disabled": false...},
                  "after": {..."disabled": true...}}]}

pytun-admin writes the registry itself, so the caller is the admin process: its uid and user
name, and the sudo caller when sudo ran it. The before and after values come from a snapshot
of the settings and the registry (peers, groups, access rules) around the command, so every
command is covered without each one reporting what it changed; a command that changed nothing
(a listing, a failure) writes nothing. Keys: public keys are recorded, preshared and private
keys never (the registry's preshared key shows only as present or not).
"""

from __future__ import annotations

import calendar
import dataclasses
import json
import os
import pwd
import time

from . import state

AUDIT_FILE = "audit.log"
RUNTIME_FIELDS = ("endpoint", "last_handshake")  # the hub records these; not admin changes


class AuditError(state.StateError):
    """The audit log cannot be read or written; one line."""


def audit_path(state_dir: str) -> str:
    return os.path.join(state_dir, AUDIT_FILE)


def _plain(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def snapshot(state_dir: str) -> dict[str, object]:
    """object name -> its value, for everything pytun-admin can change."""
    out: dict[str, object] = {}
    try:
        settings = state.load_settings(state_dir)
    except state.StateError:
        return out
    out["settings"] = json.loads(settings.to_json())
    if settings.registry:  # the URL may hold a password: the log keeps it masked
        from .registry import mask
        out["settings"]["registry"] = mask(settings.registry)
    from .registry import RegistryError
    try:
        registry = state.open_hub_registry(state_dir, settings)
    except RegistryError:
        return out
    with registry:
        for peer in registry.list():
            value = _plain(peer)
            for name in RUNTIME_FIELDS:
                value.pop(name, None)
            value["preshared_key"] = value.get("preshared_key") is not None
            out[f"peer:{peer.name}"] = value
        for name, comment in registry.groups():
            out[f"group:{name}"] = {"name": name, "comment": comment}
        for rule in registry.rules():
            out[f"rule:{rule.id}"] = {**_plain(rule), "text": rule.text()}
    return out


def diff(before: dict, after: dict) -> list[dict]:
    changes = []
    for name in sorted(set(before) | set(after), key=lambda n: (n.split(":")[0], n)):
        if before.get(name) != after.get(name):
            changes.append({"object": name, "before": before.get(name),
                            "after": after.get(name)})
    return changes


def caller() -> dict:
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    out = {"uid": uid, "user": user}
    if os.environ.get("SUDO_USER") and os.environ.get("SUDO_UID", "").isdigit():
        out.update(sudo_user=os.environ["SUDO_USER"], sudo_uid=int(os.environ["SUDO_UID"]))
    return out


def append(state_dir: str, entry: dict) -> None:
    path = audit_path(state_dir)
    line = json.dumps(entry, separators=(",", ":"), sort_keys=False) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"cannot append to {path}: {exc.strerror}") from None


def record(state_dir: str, argv: list[str], command: str, before: dict, after: dict,
           now: float | None = None) -> dict | None:
    changes = diff(before, after)
    if not changes:
        return None
    when = time.time() if now is None else now
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)), **caller(),
             "command": command, "argv": argv, "changes": changes}
    append(state_dir, entry)
    return entry


def read(state_dir: str, since: float | None = None) -> list[dict]:
    path = audit_path(state_dir)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AuditError(f"cannot read {path}: {exc.strerror}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AuditError(f"{path} line {n} is not JSON: the log was edited") from None
        if since is not None:
            when = calendar.timegm(time.strptime(entry["time"], "%Y-%m-%dT%H:%M:%SZ"))
            if when < since:
                continue
        out.append(entry)
    return out


def wrap(fn, state_dir: str, argv: list[str], command: str):
    """fn(args), audited: the snapshot before, the command, the snapshot after, the entry.
    Read-only commands are not wrapped (see READ_ONLY)."""
    def audited(args) -> int:
        before = snapshot(state_dir)
        code = fn(args)
        after = snapshot(state_dir)
        record(state_dir, argv, command, before, after)
        return code
    return audited


# `ha` changes only the running hub's role (keepalived's hook; the hub logs it), nothing stored.
READ_ONLY = {"list-peers", "show", "doctor", "audit", "access list", "access explain",
             "group list", "ha"}


def describe(change: dict) -> str:
    """One short line for a change: what object, and which fields moved."""
    before, after = change["before"], change["after"]
    if before is None or after is None:
        value = after if before is None else before
        text = value.get("text") if isinstance(value, dict) else None
        return (f"{change['object']} {'added' if before is None else 'removed'}"
                + (f": {text}" if text else ""))
    if isinstance(before, dict) and isinstance(after, dict):
        fields = [f"{k}: {json.dumps(before.get(k))} -> {json.dumps(after.get(k))}"
                  for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        return f"{change['object']} " + ", ".join(fields)
    return f"{change['object']}: {json.dumps(before)} -> {json.dumps(after)}"
