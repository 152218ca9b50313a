#!/usr/bin/env python3
"""pytun on one machine: a hub and three laptops in network namespaces, checked, then removed.

                         +------------------------ hub -------------------------+
    alice (pytun-client) | 198.51.100.17/28   lo 192.0.2.1 (UDP 51820)          |
    bob   (pytun-client) | 198.51.100.33/28   pytun0 10.77.0.1/24               |--- inet
    carol (wireguard-go) | 198.51.100.49/28   203.0.113.1/24 (egress, NAT) ------ | 203.0.113.2
                         +------------------------------------------------------+

alice has a split tunnel (the hub's subnet plus the route 203.0.113.0/24 that `pytun-admin init
--route` hands out), bob a full tunnel (`add-peer --full-tunnel`), carol runs stock wireguard-go
with the very file `pytun-admin add-peer` printed. Each laptop pings the hub's inner address and
reaches the "internet" namespace, which has no route back to 10.77.0.0/24: an answer proves the
hub masqueraded the laptop (a UDP echo there also reports the source address it saw).

What it touches: only namespaces it creates (`ip netns add`), joined by veth pairs made inside
them, with addresses from the documentation ranges. The root namespace's addresses, routes,
firewall and sysctls are never changed. Every process is stopped by its PID and every namespace
deleted at the end, also on failure, Ctrl-C or SIGTERM, and all of it is bounded in time.
Each check prints one PASS or FAIL line; the exit status is 0 only if all passed.

Run it as root: `scripts/demo` (installs what is missing first) or, once installed,
`/opt/pytun/bin/python scripts/demo.py`.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import netns as nn  # noqa: E402  (the namespace helpers the test suite uses)
from tests.hubnet import (HUB_ENDPOINT, HUB_INET, HUB_INNER, INET_HOST, Hub,  # noqa: E402
                          OurLaptop, WgGoLaptop, source_seen, start_whoami)

DEADLINE = 45.0  # seconds for the whole set-up and checks; teardown has its own bounds
INTERNET = "203.0.113.0/24"
WHOAMI_PORT = 9999

class Interrupted(BaseException):
    """Ctrl-C, SIGTERM or the deadline: stop checking, tear down."""


class Checks:
    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def run(self, label: str, fn, *, needs: tuple = ()) -> bool:
        """Run one check; it passes when fn() returns without raising."""
        missing = [n for n in needs if not n]
        if missing:
            return self.record(label, False, "not run: an earlier step failed")
        try:
            detail = fn()
        except Interrupted:
            raise
        except Exception as exc:  # AssertionError, CommandFailed, OSError...
            return self.record(label, False, _one_line(exc))
        return self.record(label, True, detail)

    def record(self, label: str, ok: bool, detail: str | None = None) -> bool:
        self.results.append((label, ok))
        line = f"{'PASS' if ok else 'FAIL'}  {label}"
        print(line + (f" ({detail})" if detail else ""), flush=True)
        return ok

    @property
    def all_passed(self) -> bool:
        return bool(self.results) and all(ok for _, ok in self.results)


def _one_line(exc: BaseException) -> str:
    """The first line of the error; for a failed command, also the last line it printed."""
    lines = (str(exc).strip() or type(exc).__name__).splitlines()
    said = (getattr(exc, "stderr", "") or "").strip().splitlines()
    return lines[0] + (f": {said[-1].strip()}" if said else "")


def _tail(path, n: int = 15) -> str:
    try:
        lines = pathlib.Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-n:])


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "run it as root: it creates network namespaces and TUN devices"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    missing = [t for t in ("ip", "ping", "wireguard-go", "wg") if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)}: run scripts/install-deps (or scripts/demo)"
    for module in ("pytun.server.main", "pytun.server.admin", "pytun.client.main"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"cannot import {module} ({exc}): run scripts/install-deps (or scripts/demo)"
    return None


def reach(hub: Hub, ns, address: str) -> None:
    """Ping `address` from a laptop until it answers, for up to 10 s."""
    try:
        nn.wait_until(lambda: nn.ping(ns, address), timeout=10, what=f"an answer from {address}")
    except AssertionError as exc:
        try:
            drops = {k: v for k, v in hub.drops().items() if v}
        except Exception:
            drops = "unknown"
        raise AssertionError(f"{exc}; hub drop counters: {drops}") from None


def reach_internet(hub: Hub, ns) -> str:
    reach(hub, ns, INET_HOST)
    seen = source_seen(ns, INET_HOST, WHOAMI_PORT)
    if seen != HUB_INET:
        raise AssertionError(f"the internet host saw source {seen or 'nothing'}, not the hub's "
                             f"{HUB_INET}")
    return f"the internet host sees {seen}"


def demo(checks: Checks, topo: nn.Topology, tmp: pathlib.Path) -> None:
    print(f"pytun demo: a hub and three laptops in network namespaces; work files in {tmp}",
          flush=True)
    hub = None
    laptops: dict[str, tuple] = {}

    def start_hub() -> str:
        nonlocal hub
        hub = Hub(topo, tmp, init_args=("--route", INTERNET))
        hub.start()
        return f"pytun-server in namespace {hub.ns.name}, UDP {HUB_ENDPOINT}:51820, {HUB_INNER}"

    if not checks.run("hub starts", start_hub):
        if hub is not None:
            print(_tail(hub.log_path), flush=True)
        return

    start_whoami(hub.inet, INET_HOST, WHOAMI_PORT)  # stopped with the namespace

    plans = (("alice", "pytun-client, split tunnel", ()),
             ("bob", "pytun-client, full tunnel", ("--full-tunnel",)),
             ("carol", "stock wireguard-go", ()))
    for name, kind, args in plans:
        def connect(name=name, kind=kind, args=args) -> str:
            ns, _ = hub.connect_laptop(prefix=name)
            config = hub.add_peer(name, *args)
            if kind.startswith("pytun-client"):
                laptop = OurLaptop(ns, tmp, config, name)
            else:
                laptop = WgGoLaptop(ns, tmp, config)
            laptops[name] = (ns, laptop)
            return f"namespace {ns.name}, interface {laptop.ifname}"

        if not checks.run(f"{name} ({kind}) brings its tunnel up", connect):
            log = getattr(laptops.get(name, (None, None))[1], "log_path", None)
            for path in [log] if log else sorted(tmp.glob("pc*.log")):
                print(_tail(path), flush=True)

    for name, _, _ in plans:
        ns = laptops.get(name, (None,))[0]
        checks.run(f"{name} pings the hub at {HUB_INNER}", lambda: reach(hub, ns, HUB_INNER),
                   needs=(ns,))
        checks.run(f"{name} reaches the internet host {INET_HOST} through the hub's NAT",
                   lambda: reach_internet(hub, ns), needs=(ns,))

    def show() -> str:
        text = hub.admin("show").stdout
        print("--- pytun-admin show", flush=True)
        print(text.rstrip(), flush=True)
        print("---", flush=True)
        rows = {r["name"]: r for r in json.loads(hub.admin("show", "--json").stdout)}
        for name, _, _ in plans:
            row = rows.get(name)
            if row is None:
                raise AssertionError(f"{name} is missing")
            if not row["latest_handshake"] or not (row["endpoint"] or "").startswith("198.51.100."):
                raise AssertionError(f"{name} has no handshake or endpoint: {row}")
        return "every laptop has a handshake and an endpoint"

    checks.run("pytun-admin show lists the three laptops", show)


def half_made() -> list[str]:
    """Namespaces named by this process (tests/netns.py's unique(): letters, PID, '-', counter)
    that no Netns object tracks: an interrupt can land while `ip netns add` is running."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = re.compile(rf"[a-z]{{1,5}}{os.getpid()}-[0-9a-f]+")
    tracked = set(nn._live)
    return [w for w in listed.split() if mine.fullmatch(w) and w not in tracked]


def teardown(checks: Checks, topo: nn.Topology, names: list[str], started: list[int],
             tmp: pathlib.Path, wg_dir_existed: bool) -> None:
    errors = []
    try:
        topo.close()
    except Exception as exc:
        errors.append(f"closing namespaces: {_one_line(exc)}")
    for ns in list(nn._live.values()):  # created but not yet handed to the topology
        try:
            ns.close()
        except Exception as exc:
            errors.append(f"closing {ns.name}: {_one_line(exc)}")
    for name in half_made():
        # Adopt it, so close() stops what runs inside and deletes it.
        ns = nn.Netns.__new__(nn.Netns)
        ns.name, ns.procs = name, []
        nn._live[name] = ns
        try:
            ns.close()
        except Exception as exc:
            errors.append(f"closing {name}: {_one_line(exc)}")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [n for n in names if n in listed.split()]
    if left:
        errors.append(f"namespaces left: {' '.join(left)}")
    alive = [pid for pid in started if nn.process_alive(pid)]
    if alive:
        errors.append(f"processes left: {' '.join(map(str, alive))}")
    sockets = [p for p in pathlib.Path("/run/wireguard").glob(f"*{os.getpid()}-*.sock")]
    for path in sockets:
        errors.append(f"left {path}")
    if not wg_dir_existed:
        try:
            os.rmdir("/run/wireguard")  # wireguard-go made it; only if empty
        except OSError:
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    checks.record(f"teardown: {len(names)} namespaces and {len(started)} processes gone",
                  not errors, "; ".join(errors) or None)


def main() -> int:
    t0 = time.monotonic()
    why = preflight()
    if why:
        print(f"FAIL  preflight: {why}", file=sys.stdout, flush=True)
        return 1
    checks = Checks()

    def interrupt(signum, _frame):
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.setitimer(signal.ITIMER_REAL, DEADLINE)
    wg_dir_existed = os.path.isdir("/run/wireguard")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pytun-demo-"))
    os.chmod(tmp, 0o700)
    topo = nn.Topology()
    try:
        demo(checks, topo, tmp)
    except Interrupted as exc:
        reason = "deadline" if str(exc) == "SIGALRM" else str(exc)
        checks.record("the demo finished", False, f"stopped by {reason}; tearing down")
    except Exception as exc:
        traceback.print_exc()
        checks.record("the demo finished", False, _one_line(exc))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # teardown must not be cut short
        spaces = [*topo.namespaces, *nn._live.values()]
        names = list(dict.fromkeys([*(ns.name for ns in spaces), *half_made()]))
        started = list(dict.fromkeys(p.pid for ns in spaces for p in ns.procs))
        print(f"namespaces: {' '.join(names)}", flush=True)
        print(f"processes: {' '.join(map(str, started))}", flush=True)
        teardown(checks, topo, names, started, tmp, wg_dir_existed)
        for s, handler in old.items():
            signal.signal(s, handler)
    passed = sum(ok for _, ok in checks.results)
    verdict = "PASSED" if checks.all_passed else "FAILED"
    print(f"demo {verdict}: {passed}/{len(checks.results)} checks passed in "
          f"{time.monotonic() - t0:.1f} s", flush=True)
    return 0 if checks.all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
