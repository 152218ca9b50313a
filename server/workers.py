"""The hub on several cores: a supervisor and N data-plane workers (docs/workers.md).

One Python process runs its per-packet work on one core. With `workers` above 1 the hub runs

- a **supervisor** (`Supervisor`, this process): the registry, the firewall, the control
  socket and systemd's notify protocol. It opens what needs privileges and must be shared, in
  order: a multi-queue TUN device with one queue per worker, and one UDP socket per worker
  bound to the listen port with SO_REUSEPORT, the group steered by `steering.program`. Then it
  starts the workers and keeps no packet path of its own;
- **workers** (`WorkerHub`, `python -m pytun.server.workers`), each a hub of its own over
  one TUN queue and one socket, with the peers whose key `steering.owner_of` gives it. Each
  reads the registry itself (changes, write-behind of endpoints and handshake timestamps,
  enrollment), and holds its peers' sessions alone: no state is shared on the packet path.

Datagrams of a session reach their worker by the receiver index (the steering program). An
initiation lands where the kernel's hash puts it and is handed to the owner after its static
key is known; a tunnel packet the kernel queued on another worker's queue is handed over too
(Device "Workers"; the kernel's automatic queue choice sends a flow's packets back to the
queue that wrote its last packet, so most need no hand-over). `show` and `stats` ask every
worker and merge; `sync` and `ha` reach every worker. A worker that exits stops the hub (with
its firewall undone), and systemd starts it again.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import trio

from ..common import control, linux, logformat, steering
from ..common.driver import Driver, Handoff, open_udp
from ..common.errors import PytunError
from ..common.runner import offload_wanted
from ..common.sdnotify import Notifier
from . import nat, policy, state
from .hub import HA_ROLES, REGISTRY_POLL, Hub, StartupError, _egress_interfaces
from .metrics import MetricsError, MetricsServer
from .ops import Operations

log = logging.getLogger("pytun")

READY_WITHIN = 30.0  # seconds a worker may take to start
STOP_WITHIN = 10.0  # seconds a worker may take to stop on SIGTERM before it is killed
WATCH_EVERY = 0.2  # seconds between checks that every worker still runs
ASK_TIMEOUT = 5.0  # seconds a worker may take to answer the supervisor
_CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS")


class WorkerDied(PytunError):
    """A data-plane worker exited; the hub stops so that it starts again whole."""


def worker_socket_path(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"worker{index}.sock")


# ---------------------------------------------------------------------------------- worker


class WorkerHub(Hub):
    """One worker: a hub over a TUN queue and a socket it was given, with its share of peers.
    The supervisor owns the firewall; this one only plans (for the peer-to-peer switch)."""

    def __init__(self, state_dir, settings, private_key, registry, *, worker: tuple[int, int],
                 fds: dict, role: str, egress: tuple, offload: bool):
        super().__init__(state_dir, settings, private_key, registry, worker=worker)
        self.fds = fds
        self.egress = egress
        self.offload = offload
        self.role = role
        self.device.set_standby(role == "standby")
        self.ops = Operations(self, Notifier(None))  # the supervisor speaks to systemd

    async def apply_firewall(self) -> None:
        return  # the supervisor's, which reads the same registry

    def metrics_pairs(self) -> list[tuple[str, str]]:
        """What the supervisor's metrics need of this worker (never a preshared key)."""
        with self._device() as device:
            now = self.clock()
            pairs = [("handshakes_completed", str(device.handshakes_completed)),
                     ("handshakes_gave_up", str(device.handshakes_gave_up)),
                     ("under_load", "1" if device.under_load(now) else "0"),
                     *((f"drop_{k}", str(n)) for k, n in sorted(device.drops.items())),
                     *((f"handoff_{k}", str(n)) for k, n in sorted(device.handoffs.items())),
                     *((f"tun_{k}", str(n)) for k, n in
                       sorted((self.driver.offload if self.driver else {}).items()))]
            for name, (spec, p) in self.peers.items():
                current = p.current
                pairs += [("peer", name), ("public_key", spec[0]), ("address", spec[1]),
                          ("sites", ",".join(spec[2])), ("tx", str(p.tx_bytes)),
                          ("rx", str(p.rx_bytes)), ("wall", repr(p.last_handshake_wall or 0)),
                          ("mono", repr(p.last_handshake if p.last_handshake is not None
                                        else -1.0)),
                          ("created", repr(current.created if current is not None else -1.0))]
        return pairs

    def handle_control(self, pairs):
        keys_ = [k for k, _ in pairs]
        if keys_ == ["metrics"]:
            return self.metrics_pairs()
        if keys_ == ["stats"]:
            pairs = super().handle_control(pairs)
            with self._device() as device:
                handoffs = sorted(device.handoffs.items())
            return pairs + [(f"handoff_{k}", str(n)) for k, n in handoffs]
        return super().handle_control(pairs)

    async def _run(self, signals, task_status) -> None:
        s, fds = self.settings, self.fds
        index, count = self.device.worker
        self.sock = socket.socket(fileno=fds["sock"])
        self.sock.setblocking(False)
        outboxes = [socket.socket(fileno=fd) if fd >= 0 else None for fd in fds["out"]]
        handoff = Handoff(socket.socket(fileno=fds["inbox"]), outboxes)
        self.view = policy.HubView.from_settings(s, *self.egress)
        try:
            self.sync()
            driver = Driver(self.device, fds["tun"], self.sock, on_event=self.on_event,
                            sticky=True, vnet_hdr=True, tun_offload=self.offload,
                            handoff=handoff)
            self._redial(driver.now(), time.time(), driver)
            self.ops.prepare(driver)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.enroller.run)
                self.driver = driver
                await nursery.start(driver.run)
                await nursery.start(control.serve, worker_socket_path(self.state_dir, index),
                                    self.handle_control)
                nursery.start_soon(self.write_behind)
                nursery.start_soon(self._poll_registry)
                nursery.start_soon(self.ops.run)
                log.info("worker %d of %d up: %d peers", index, count, len(self.peers))
                task_status.started()
                ready = fds.get("ready", -1)
                if ready >= 0:
                    os.write(ready, b"1")
                    os.close(ready)
                async for signum in signals:
                    break
                nursery.cancel_scope.cancel()
            self.driver = None
            self.flush()
        finally:
            self.ops.stop()
            self.sock.close()
            self.sock = None
            handoff.inbox.close()
            for box in outboxes:
                if box is not None:
                    box.close()
            os.close(fds["tun"])


def worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pytun-server-worker")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--worker", required=True)  # "i/n"
    p.add_argument("--fds", required=True)  # tun,sock,inbox,ready,out0:out1:...
    p.add_argument("--role", default="active")
    p.add_argument("--egress", default=",")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--log-format", default="text")
    args = p.parse_args(argv)
    linux.die_with(args.parent)
    index, count = (int(x) for x in args.worker.split("/"))
    prog = f"pytun-server[worker {index}]"
    logformat.setup(prog, verbose=args.verbose, kind=args.log_format)
    tun, sock, inbox, ready, outs = args.fds.split(",")
    fds = {"tun": int(tun), "sock": int(sock), "inbox": int(inbox), "ready": int(ready),
           "out": [int(x) for x in outs.split(":")]}
    egress = tuple(x or None for x in args.egress.split(","))

    def serve(_args) -> int:
        settings = state.load_settings(args.state_dir)
        private_key = state.load_private_key(args.state_dir)
        registry = state.open_hub_registry(args.state_dir, settings)
        try:
            hub = WorkerHub(args.state_dir, settings, private_key, registry,
                            worker=(index, count), fds=fds, role=args.role, egress=egress,
                            offload=args.offload)
            trio.run(hub.run, strict_exception_groups=True)
        except KeyboardInterrupt:
            pass
        finally:
            registry.close()
        return 0

    from ..common import cli
    return cli.run(prog, serve, args)


# ---------------------------------------------------------------------------------- supervisor


class _Session:
    __slots__ = ("created",)

    def __init__(self, created: float):
        self.created = created


class _PeerView:
    """A worker's peer as the metrics read it (server/metrics.py)."""

    __slots__ = ("tx_bytes", "rx_bytes", "last_handshake_wall", "last_handshake", "current")


class _DeviceTotals:
    """The workers' devices summed, as the metrics read a device."""

    def __init__(self, workers: int = 1):
        self.drops: Counter[str] = Counter()
        self.handoffs: Counter[str] = Counter()
        self.offload: Counter[str] = Counter()
        self.worker = (0, workers)
        self.handshakes_completed = 0
        self.handshakes_gave_up = 0
        self.loaded = False

    def under_load(self, now: float) -> bool:
        return self.loaded


class MergedView:
    """The hub the metrics server sees with workers: every worker asked at each scrape (the
    monotonic clock is the machine's, so handshake ages compare across processes)."""

    def __init__(self, supervisor: "Supervisor"):
        self.supervisor = supervisor
        self.settings = supervisor.settings
        self.peers: dict[str, tuple[tuple, _PeerView]] = {}
        self.device = _DeviceTotals(supervisor.count)

    @property
    def records(self):
        return self.supervisor.records

    @property
    def role(self) -> str:
        return self.supervisor.role

    def refresh(self) -> None:
        """In the metrics thread: ask each worker (a worker that does not answer is left out
        of this scrape, and logged)."""
        peers: dict[str, tuple[tuple, _PeerView]] = {}
        totals = _DeviceTotals(self.supervisor.count)
        for i in range(self.supervisor.count):
            try:
                answer = control.request(worker_socket_path(self.supervisor.state_dir, i),
                                         [("metrics", "1")], ASK_TIMEOUT)
            except control.ControlError as exc:
                log.warning("metrics: worker %d did not answer: %s", i, exc)
                continue
            _merge(answer, peers, totals)
        self.peers, self.device = peers, totals


def _merge(answer, peers: dict, totals: _DeviceTotals) -> None:
    row: dict[str, str] = {}

    def close() -> None:
        if not row:
            return
        p = _PeerView()
        p.tx_bytes, p.rx_bytes = int(row["tx"]), int(row["rx"])
        p.last_handshake_wall = float(row["wall"]) or None
        mono, created = float(row["mono"]), float(row["created"])
        p.last_handshake = mono if mono >= 0 else None
        p.current = _Session(created) if created >= 0 else None
        sites = tuple(x for x in row.get("sites", "").split(",") if x)
        peers[row["peer"]] = ((row["public_key"], row["address"], sites), p)
        row.clear()

    for key, value in answer:
        if key == "peer":
            close()
            row["peer"] = value
        elif row:
            row[key] = value
        elif key == "handshakes_completed":
            totals.handshakes_completed += int(value)
        elif key == "handshakes_gave_up":
            totals.handshakes_gave_up += int(value)
        elif key == "under_load":
            totals.loaded = totals.loaded or value == "1"
        elif key.startswith("drop_"):
            totals.drops[key[5:]] += int(value)
        elif key.startswith("handoff_"):
            totals.handoffs[key[8:]] += int(value)
        elif key.startswith("tun_"):
            totals.offload[key[4:]] += int(value)
    close()


def resolve_workers(value) -> int:
    """`workers` as the settings or the command line give it: a number, or "auto" (the cores
    this process may run on)."""
    if value in (None, "auto"):
        try:
            return max(1, min(len(os.sched_getaffinity(0)), steering.MAX_WORKERS))
        except OSError:
            return os.cpu_count() or 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise state.StateError(f"workers must be a number or auto, not {value!r}") from None
    if not 1 <= n <= 64:
        raise state.StateError(f"workers must be from 1 to 64, not {n}")
    return n


class Supervisor(Hub):
    """The hub with `count` workers: registry, firewall, control socket; no packets."""

    def __init__(self, state_dir, settings, private_key, registry, *, count: int,
                 verbose: bool = False, log_format: str = "text"):
        super().__init__(state_dir, settings, private_key, registry)
        self.count = count
        self.verbose = verbose
        self.log_format = log_format
        self.procs: list[subprocess.Popen] = []
        self.metrics: MetricsServer | None = None

    def owns(self, record) -> bool:
        return False  # every peer is a worker's

    # -- asking the workers ---------------------------------------------------------------------

    async def _ask_all(self, pairs) -> list:
        answers = []
        for i in range(self.count):
            answers.append(await trio.to_thread.run_sync(
                control.request, worker_socket_path(self.state_dir, i), pairs, ASK_TIMEOUT))
        return answers

    async def _merged_get(self):
        rows = []
        for answer in await self._ask_all([("get", "1")]):
            rows += control.peers_from_get(answer)
        rows.sort(key=lambda r: r["name"])
        return control.get_response_pairs(rows)

    async def _merged_stats(self):
        total: Counter[str] = Counter()
        for answer in await self._ask_all([("stats", "1")]):
            for key, value in answer:
                try:
                    total[key] += int(value)
                except ValueError:
                    continue
        return [("workers", str(self.count))] + [(k, str(n)) for k, n in sorted(total.items())]

    async def _merged_ha(self, want: str):
        answers = await self._ask_all([("ha", want)])
        if want != "status":
            self.role = HA_ROLES[want]
        dropped = sum(int(dict(a).get("standby_drops", 0)) for a in answers)
        roles = {dict(a).get("role") for a in answers}
        role = roles.pop() if len(roles) == 1 else "mixed"
        return [("role", role),
                ("service_address", (self.settings.ha or {}).get("service_address", "")),
                ("standby_drops", str(dropped))]

    async def _sync_all(self):
        await self.apply_firewall()
        await self._ask_all([("sync", "1")])
        return []

    def handle_control(self, pairs):
        keys_ = [k for k, _ in pairs]
        if keys_ == ["get"]:
            return self._merged_get()
        if keys_ == ["stats"]:
            return self._merged_stats()
        if keys_ == ["ha"]:
            if self.settings.ha is None:
                raise control.ControlError("this hub has no ha setting in hub.json (hot"
                                           " standby is off)")
            want = pairs[0][1]
            if want != "status" and want not in HA_ROLES:
                raise control.ControlError(f"ha={want!r}: give master, backup, fault, stop"
                                           " or status")
            return self._merged_ha(want)
        if keys_ == ["sync"]:
            try:
                self.sync()
            except Exception as exc:  # RegistryError: one line to the admin
                raise control.ControlError(str(exc)) from None
            return self._sync_all()
        raise control.ControlError(f"unknown request {' '.join(keys_)!r}")

    # -- running --------------------------------------------------------------------------------

    async def _run(self, signals, task_status) -> None:
        s, n = self.settings, self.count
        opened: list = []  # fds and sockets to close in this process once workers hold them
        tuns: list[int] = []
        socks: list[socket.socket] = []
        pairs: list[tuple[socket.socket, socket.socket]] = []
        fw: list[int] = []
        offload = offload_wanted()
        try:
            try:
                for _ in range(n):
                    fd, ifname = linux.open_tun(s.interface, vnet_hdr=True, multi_queue=True)
                    tuns.append(fd)
                    if offload and not linux.set_tun_offload(fd):
                        offload = False
                linux.run_apart(linux.configure_link, s.interface, s.addresses, s.mtu)
                for _ in range(n):  # in order: the group numbers its members as they bind
                    socks.append(open_udp(s.listen_port, reuse_port=True))
                steering.attach(socks[0], n)
                pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(n)]
            except (linux.LinuxError, OSError) as exc:
                raise StartupError(getattr(exc, "strerror", None) or str(exc)) from None
            self.sock = socks[0]  # stored endpoints are parsed for this family
            for warning in nat.backend_warnings():
                log.warning("%s", warning)
            try:
                egress = linux.run_apart(_egress_interfaces, s.egress)
            except linux.LinuxError as exc:
                raise StartupError(str(exc)) from None
            self.view = policy.HubView.from_settings(s, *egress)
            if self.registry.ensure_default_rules(policy.default_rules(s)):
                log.info("access rules: the defaults were written (pytun-admin access list)")
            self.sync()
            for family, plan in self.wanted.items():
                fw.append(family)
                try:
                    for warning in linux.run_apart(nat.setup, plan):
                        log.warning("%s", warning)
                except (nat.NatError, linux.LinuxError) as exc:
                    raise StartupError(f"firewall set-up failed: {exc}") from None
                self.applied[family] = plan
            if s.ha and self.role == "standby" and self._holds_service_address():
                self.role = "active"
                log.info("ha: active: this host holds the service address %s",
                         s.ha["service_address"])
            self._start_workers(tuns, socks, pairs, egress, offload)
            opened = [*tuns, *socks, *(x for pair in pairs for x in pair)]
            tuns, socks, pairs = [], [], []
            for thing in opened:  # the workers hold them now; a queue left here would be read
                thing.close() if hasattr(thing, "close") else os.close(thing)  # by nobody
            opened = []
            self.sock = None
            await self._wait_ready()
            if s.metrics:
                try:
                    self.metrics = MetricsServer(MergedView(self), s.metrics,
                                                 s.metrics_token_file)
                    self.metrics.start()
                except MetricsError as exc:
                    raise StartupError(str(exc)) from None
                log.info("metrics on http://%s/metrics%s", self.metrics.address,
                         " (bearer token required)" if self.metrics.token else "")
            notifier = self.ops.notifier
            async with trio.open_nursery() as nursery:
                await nursery.start(control.serve, state.socket_path(self.state_dir),
                                    self.handle_control)
                nursery.start_soon(self._poll_registry)
                self._firewall_changed = trio.Event()
                nursery.start_soon(self._firewall_loop)
                nursery.start_soon(self._watch)
                nursery.start_soon(self._health, notifier)
                log.info("hub up: %s %s, UDP port %d, %d workers, %d peers%s", s.interface,
                         ", ".join(map(str, s.addresses)), s.listen_port, n,
                         sum(1 for r in self.records if not r.disabled),
                         f", {self.role} (hot standby pair)" if s.ha else "")
                notifier.notify("READY=1", f"STATUS={self._status_line()}")
                task_status.started()
                async for signum in signals:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
        finally:
            self.ops.notifier.notify("STOPPING=1", "STATUS=stopping")
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            await trio.to_thread.run_sync(self._stop_workers)
            for thing in [*tuns, *socks, *(x for pair in pairs for x in pair)]:
                thing.close() if hasattr(thing, "close") else os.close(thing)
            for family in fw:
                try:
                    linux.run_apart(nat.teardown, s.interface, family)
                except (nat.NatError, linux.LinuxError) as exc:
                    log.error("firewall tear-down failed: %s", exc)
            self.sock = None

    def _status_line(self) -> str:
        peers = sum(1 for r in self.records if not r.disabled)
        return f"{self.count} workers, {peers} peer{'s' if peers != 1 else ''}"

    def _start_workers(self, tuns, socks, pairs, egress, offload) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        self._ready = []
        for i in range(self.count):
            ready_r, ready_w = os.pipe()
            outs = [pairs[j][1].fileno() if j != i else -1 for j in range(self.count)]
            fds = [tuns[i], socks[i].fileno(), pairs[i][0].fileno(), ready_w,
                   *(fd for fd in outs if fd >= 0)]
            argv = [sys.executable, "-m", "pytun.server.workers",
                    "--state-dir", self.state_dir, "--worker", f"{i}/{self.count}",
                    "--fds", f"{tuns[i]},{socks[i].fileno()},{pairs[i][0].fileno()},{ready_w},"
                             + ":".join(map(str, outs)),
                    "--role", self.role, "--egress", ",".join(x or "" for x in egress),
                    "--parent", str(os.getpid()), "--log-format", self.log_format]
            if offload:
                argv.append("--offload")
            if self.verbose:
                argv.append("-v")
            try:
                proc = subprocess.Popen(argv, pass_fds=fds, env=env)
            finally:
                os.close(ready_w)
            self.procs.append(proc)
            self._ready.append(ready_r)

    async def _wait_ready(self) -> None:
        def wait() -> None:
            deadline = time.monotonic() + READY_WITHIN
            for i, fd in enumerate(self._ready):
                try:
                    left = deadline - time.monotonic()
                    got = select.select([fd], [], [], max(left, 0))[0] and os.read(fd, 1)
                finally:
                    os.close(fd)
                if not got:
                    code = self.procs[i].poll()
                    raise StartupError(f"worker {i} did not start"
                                       + (f" (exit status {code})" if code is not None else
                                          f" within {READY_WITHIN:.0f} s"))
        await trio.to_thread.run_sync(wait)

    async def _watch(self) -> None:
        while True:
            await trio.sleep(WATCH_EVERY)
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None:
                    raise WorkerDied(f"worker {i} exited (status {code}); the hub stops so"
                                     " that it starts again whole")

    async def _health(self, notifier: Notifier) -> None:
        """STATUS= as peers change; the watchdog is pinged while every worker answers."""
        interval = notifier.watchdog_interval or REGISTRY_POLL * 20
        status = ""
        while True:
            try:
                await self._ask_all([("stats", "1")])
            except control.ControlError as exc:
                log.warning("a worker did not answer: %s", exc)
            else:
                notifier.watchdog()
            line = self._status_line()
            if line != status:
                status = line
                notifier.notify(f"STATUS={line}")
            await trio.sleep(interval)

    def _stop_workers(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WITHIN
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop within %.0f s: killed", i, STOP_WITHIN)
                proc.kill()
                proc.wait()
        self.procs = []


if __name__ == "__main__":
    sys.exit(worker_main())
