"""The config's DNS servers, handed to resolvconf or systemd-resolved and taken back at `down`.

    resolvconf   printf 'nameserver 10.77.0.1\\nsearch corp.example\\n' |
                     resolvconf -a IFACE -m 0 -x
                 undone with `resolvconf -d IFACE -f`       (what wg-quick does)
    resolvectl   resolvectl dns IFACE 10.77.0.1; resolvectl domain IFACE corp.example [~.]
                 undone with `resolvectl revert IFACE`

The interface name given to resolvconf carries the prefix from /etc/resolvconf/interface-order
(e.g. `tun.`) as wg-quick does, so resolvconf ranks the tunnel's servers first. Where neither
tool exists the caller gets one warning and the tunnel comes up anyway. The command runner and
`which` are parameters, so tests check the exact calls.
"""

from __future__ import annotations

import re
import shutil
import subprocess

INTERFACE_ORDER = "/etc/resolvconf/interface-order"


def resolvconf_name(ifname: str, interface_order: str = INTERFACE_ORDER) -> str:
    """wg-quick's resolvconf_iface_prefix: the first `PREFIX*` line of interface-order."""
    try:
        with open(interface_order, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^([A-Za-z0-9-]+)\*$", line.strip())
                if m:
                    return f"{m.group(1)}.{ifname}"
    except OSError:
        pass
    return ifname


def _first_line(done) -> str:
    text = (done.stderr or done.stdout or "").strip()
    return text.splitlines()[0] if text else f"exit status {done.returncode}"


def choose(ifname: str, *, which=shutil.which,
           interface_order: str = INTERFACE_ORDER) -> dict | None:
    """The record `apply` will follow and `undo` reads: method and name, or None (no tool)."""
    if which("resolvconf"):
        return {"method": "resolvconf", "name": resolvconf_name(ifname, interface_order)}
    if which("resolvectl"):
        return {"method": "resolvectl", "name": ifname}
    return None


def apply(ifname: str, servers, search=(), *, full_tunnel: bool = False,
          run=subprocess.run, which=shutil.which,
          interface_order: str = INTERFACE_ORDER) -> tuple[dict | None, str | None]:
    """Configure DNS; returns (what to record for `undo`, or None; a warning, or None)."""
    servers = [str(s) for s in servers]
    search = list(search)
    if not servers and not search:
        return None, None
    record = choose(ifname, which=which, interface_order=interface_order)
    if record is not None and record["method"] == "resolvconf":
        name = record["name"]
        text = "".join(f"nameserver {s}\n" for s in servers)
        if search:
            text += "search " + " ".join(search) + "\n"
        done = run(["resolvconf", "-a", name, "-m", "0", "-x"], input=text,
                   capture_output=True, text=True)
        if done.returncode != 0:
            return record, f"resolvconf refused the DNS servers: {_first_line(done)}"
        return record, None
    if record is not None:
        domains = search + (["~."] if full_tunnel else [])
        calls = []
        if servers:
            calls.append(["resolvectl", "dns", ifname, *servers])
        if domains:
            calls.append(["resolvectl", "domain", ifname, *domains])
        for argv in calls:
            done = run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                return record, f"{' '.join(argv[:2])} failed: {_first_line(done)}"
        return record, None
    return None, ("neither resolvconf nor resolvectl is installed: DNS "
                  f"{', '.join(servers + search)} from the config is not set; "
                  "the tunnel works, name resolution stays as it was")


def undo(record: dict | None, *, run=subprocess.run, which=shutil.which) -> str | None:
    """Take back what `apply` recorded; a problem as one line, or None."""
    if not record:
        return None
    method, name = record.get("method"), record.get("name", "")
    if method == "resolvconf" and which("resolvconf"):
        argv = ["resolvconf", "-d", name, "-f"]
    elif method == "resolvectl" and which("resolvectl"):
        argv = ["resolvectl", "revert", name]
    else:
        return None
    done = run(argv, capture_output=True, text=True)
    if done.returncode != 0 and method == "resolvconf":
        return f"resolvconf -d {name} failed: {_first_line(done)}"
    return None  # resolvectl forgets a link that is gone by itself; nothing to undo then
