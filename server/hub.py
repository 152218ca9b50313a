"""The hub: one Device with a peer per registry row, a TUN device, one UDP socket, NAT.

The registry is the source of truth. `sync()` applies its difference to the running device
without touching unchanged peers' sessions; it runs at start, on the control socket's `sync=1`
(pytun-admin sends it after every change) and whenever the registry's change token moves.

What the data plane learns goes the other way, write-behind: a handshake or a move only marks
the peer, and a worker thread (off the trio loop), at most once every WRITE_EVERY seconds,
stores the latest endpoint of each marked peer and the greatest handshake timestamp of each
key, in a transaction each. A laptop that changes source port with every datagram thus costs
one row a second, and one log line per LOG_EVERY. The timestamps (per public key, in the
registry) keep a captured initiation refused after the peer is removed and added again,
disabled and enabled, or the hub restarts.

Hot standby (settings `ha`): two hubs share the key, the registry and a service address that
keepalived moves between them; its notify hook sets the role (`ha=master|backup|fault` on the
control socket, `pytun-admin ha ...`). The standby keeps its TUN device, rules and socket up
and answers nothing (Device.set_standby). Becoming active, a hub takes the endpoints and
handshake times the other one wrote to the registry and calls back every laptop seen within
REDIAL_WITHIN, from the service address, so laptops need not wait for their own retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import signal
import time

import trio

from ..common.errors import PytunError
from ..common import control, keys, linux, steering
from ..common.device import Device
from ..common.peer import Event
from ..common.runner import DeviceLink
from ..common.driver import Driver, format_endpoint
from ..common.endpoint import Endpoint
from . import firewall, invites, nat, policy, state
from .registry import Registry, RegistryError
from .ops import MetricsError, Operations

log = logging.getLogger("pytun")

WRITE_EVERY = 1.0  # seconds between registry writes of what the data plane saw
LOG_EVERY = 10.0  # at most one line per peer and kind of event this often; the rest counted
REGISTRY_POLL = 0.25  # a change made on another host reaches this hub this soon
OUTAGE_LOG_EVERY = 60.0  # one line a minute while the registry cannot be reached
REDIAL_WITHIN = 600.0  # after a restart, re-dial laptops seen in the last ten minutes
RECORD_EVERY = 300  # seconds between stored handshake times of a laptop that stays put
FIREWALL_RETRY = 5.0  # seconds before a failed live firewall change is tried again
# keepalived's states, as its notify hook passes them on (deploy/keepalived/pytun-notify)
HA_ROLES = {"master": "active", "active": "active", "backup": "standby",
            "fault": "standby", "stop": "standby", "standby": "standby"}


class StartupError(PytunError):
    """The hub cannot start; the message is one clear line."""


def _peer_spec(record) -> tuple:
    """What, in a registry row, the device must be rebuilt for when it changes."""
    return (record.public_key, ",".join(str(a) for a in record.addresses),
            tuple(str(s) for s in record.sites), record.preshared_key, record.keepalive)


class Hub:
    def __init__(self, state_dir: str, settings: state.HubSettings, private_key: bytes,
                 registry: Registry, *, worker: tuple[int, int] = (0, 1)):
        self.state_dir = state_dir
        self.settings = settings
        self.registry = registry
        # One of several data-plane workers (server/workers.py): this hub's device holds the
        # peers steering.owner_of gives it, and routes the others' addresses to their owner.
        self.device = Device(private_key, mtu=settings.mtu,
                             allow_peer_to_peer=settings.allow_peer_to_peer,
                             under_load_threshold=settings.under_load_threshold, worker=worker)
        self._owners: dict[str, int] = {}  # public key (text) -> its worker, when several
        self.foreign: dict[str, tuple[tuple, object]] = {}  # name -> (spec, Foreign entry)
        self.clock = time.monotonic
        self._dirty: dict[str, object] = {}  # name -> engine peer seen to handshake or move
        self._pending_ts: dict[str, bytes] = {}  # public key -> greatest TAI64N, not yet stored
        self._stored_ts: dict[str, bytes] = {}  # public key -> greatest TAI64N known stored
        self._logged: dict[tuple, list] = {}  # (kind, name) -> [time of last line, not logged]
        self._writer_wake: trio.Event | None = None  # set when a peer is marked
        self.peers: dict[str, tuple[tuple, object]] = {}  # name -> (spec, engine peer)
        self.driver: Driver | None = None
        self.records: list = []  # the registry as last planned (metrics read it)
        self.ops = Operations(self)  # metrics, systemd notify and watchdog, session log
        self.sock = None
        self._token = None
        self._recorded: dict[str, tuple] = {}  # name -> (endpoint, handshake time) stored
        self.view: policy.HubView | None = None  # known once the egress is looked up
        self.wanted: dict[int, dict] = {}  # family -> the firewall plan the registry asks for
        self.applied: dict[int, dict] = {}  # family -> the plan the kernel holds
        self._expiry: float | None = None  # when the next access rule expires
        self._firewall_changed: trio.Event | None = None
        self._firewall_lock = trio.Lock()
        # public key -> (endpoint, handshake time) of peers taken off the device, so one that
        # comes back (enabled, renewed) is called at once even before the registry has them
        self._last_seen: dict[str, tuple] = {}
        self._refused: set[str] = set()  # registered but disabled or expired
        self._peer_expiry: float | None = None  # when the next peer expires
        self._warned: dict[str, int] = {}  # name -> the expiry already warned about
        # Enrollment by invite: datagrams of its type reach the enroller (server/invites.py).
        self.enroller = invites.Enroller(self)
        self.device.other_handler = self.enroller.on_datagram
        # Hot standby: "active" or "standby"; a hub without the ha setting is always active.
        self.role = settings.ha["start_as"] if settings.ha else "active"
        if self.role == "standby":
            self.device.set_standby(True)

    # -- registry ------------------------------------------------------------------------------

    def _device(self):
        """The device, held against the data plane while the block runs (once it runs)."""
        if self.driver is None:
            return contextlib.nullcontext(self.device)
        return self.driver.locked()

    def sync(self) -> tuple[list[str], list[str]]:
        """Apply the registry to the device and plan the firewall for it (`apply_firewall`
        carries the plan out). Returns (added, removed) peer names."""
        token = self.registry.change_token()
        now = time.time()
        # An expired peer is refused like a disabled one, by the engine and the firewall.
        records = [dataclasses.replace(r, disabled=True) if r.expired(now) else r
                   for r in self.registry.list()]
        rules = self.registry.rules() if self.view is not None else []
        # Only once all is read: a registry that failed halfway (a lost connection) leaves the
        # token as it was, so the next poll tries again.
        self._token = token
        wanted = {r.name: r for r in records if not r.disabled and self.owns(r)}
        self._refused = {r.name for r in records if r.disabled}
        for r in records:
            if r.name in self.peers and r.name not in wanted and r.expired(now):
                log.info("peer %s expired at %s: its sessions end", r.name, _utc(r.expires))
        self._warn_expiring(records, now)
        self._peer_expiry = min((r.expires for r in records
                                 if r.expires is not None and r.expires > now), default=None)
        if self.view is not None:
            self._plan(records, rules)
        with self._device():
            if self.view is not None:
                self.device.allow_peer_to_peer = self._reaches_peers
            if self.device.worker[1] > 1:
                self._apply_foreign({r.name: r for r in records
                                     if not r.disabled and r.name not in wanted})
            return self._apply(wanted)

    def owns(self, record) -> bool:
        """Whether this hub's device holds `record`'s peer (always, unless one of workers)."""
        index, count = self.device.worker
        if count == 1:
            return True
        owner = self._owners.get(record.public_key)
        if owner is None:
            try:
                owner = steering.owner_of(keys.parse_public(record.public_key), count)
            except keys.BadKey:
                owner = index  # _add says why it is not loaded
            if len(self._owners) > 65536:
                self._owners.clear()
            self._owners[record.public_key] = owner
        return owner == index

    def _apply_foreign(self, others: dict) -> None:
        """The other workers' peers: their allowed IPs route to their owner (under the lock)."""
        for name in list(self.foreign):
            spec, entry = self.foreign[name]
            record = others.get(name)
            if record is None or _peer_spec(record) != spec:
                self.device.remove_foreign(entry)
                del self.foreign[name]
        for name, record in others.items():
            if name in self.foreign:
                continue
            try:
                allowed = [*(ipaddress.ip_network(a, strict=False) for a in record.addresses),
                           *record.sites]
                owner = self._owners[record.public_key]
                entry = self.device.add_foreign(owner, allowed, name)
            except (ValueError, KeyError):
                continue
            self.foreign[name] = (_peer_spec(record), entry)

    def _warn_expiring(self, records, now: float) -> None:
        """One log line per peer when it comes within `expiry_warning` of its expiry."""
        soon = now + self.settings.expiry_warning
        for r in records:
            if r.expires is not None and now < r.expires <= soon and \
                    self._warned.get(r.name) != r.expires:
                self._warned[r.name] = r.expires
                log.warning("peer %s expires at %s (pytun-admin renew %s --ttl ...)", r.name,
                            _utc(r.expires), r.name)

    def _next_expiry(self) -> float | None:
        times = [t for t in (self._expiry, self._peer_expiry) if t is not None]
        return min(times) if times else None

    def _plan(self, records, rules) -> None:
        self.records = records
        now = time.time()
        self.wanted = {}
        for family in (4, 6):
            p = firewall.plan(self.view, records, rules, now, family)
            if p is not None:
                self.wanted[family] = p.to_dict()
        self._reaches_peers = policy.reaches_peers(self.view, records, rules, now)
        self._expiry = policy.next_expiry(rules, now)
        if self._firewall_changed is not None and self.wanted != self.applied:
            self._firewall_changed.set()

    async def apply_firewall(self) -> None:
        """Carry out the planned firewall in the kernel, in a process of its own per family
        (the hub's process has threads, and python-iptables keeps one family per process).
        One change at a time, always the newest plan: a slow change is never overtaken."""
        async with self._firewall_lock:
            for family in sorted(self.wanted):
                plan = self.wanted[family]
                if self.applied.get(family) == plan:
                    continue
                try:
                    await trio.to_thread.run_sync(nat.apply_apart, plan,
                                                  self.applied.get(family))
                except nat.NatError as exc:
                    raise control.ControlError(f"firewall change failed: {exc}") from None
                self.applied[family] = plan
                rules = plan["chains"][firewall.chain(self.view.interface, "POL")]
                log.info("firewall: IPv%d access rules applied (%d rules)", family,
                         sum(r["target"] == "ACCEPT" for r in rules))

    def _apply(self, wanted: dict) -> tuple[list[str], list[str]]:
        added, removed = [], []
        for name in list(self.peers):
            spec, engine_peer = self.peers[name]
            record = wanted.get(name)
            if record is None or _peer_spec(record) != spec:
                self._keep_timestamp(spec[0], engine_peer)  # for a re-add with the same key
                if name in self._refused and engine_peer.endpoint is not None \
                        and engine_peer.last_handshake_wall:  # refused for now, not removed
                    self._remember(spec[0], engine_peer)
                self.device.remove_peer(engine_peer.public_key)
                del self.peers[name]
                self._recorded.pop(name, None)
                self._dirty.pop(name, None)
                if record is None:
                    removed.append(name)
                    log.info("peer %s removed", name)
        stored = None
        for name, record in wanted.items():
            if name in self.peers:
                continue
            if stored is None:
                stored = self._load_timestamps()
            try:
                engine_peer = self._add(record, stored)
            except (ValueError, keys.BadKey) as exc:
                log.error("peer %s not loaded: %s", name, exc)
                continue
            added.append(name)
            if self.driver is not None:  # a live change: added, enabled, renewed, new key
                log.info("peer %s added (%s)", name, ", ".join(map(str, record.addresses)))
                # A laptop that called before its row reached this hub (added on another
                # host) is answered now; one seen lately is called at once. Neither is left
                # to its own next retry.
                if not self.device.answer_waiting(engine_peer, self.driver.now()):
                    self._call_back(engine_peer, self.driver.now(), time.time())
                if self.settings.ha and engine_peer.last_sent_handshake is not None:
                    self.driver.send_from([engine_peer.endpoint],
                                          self.settings.ha["service_address"])
        return added, removed

    def _add(self, record, stored: dict[str, bytes]) -> None:
        public = keys.parse_public(record.public_key)
        psk = keys.parse_psk(record.preshared_key) if record.preshared_key else None
        allowed = [*(ipaddress.ip_network(a, strict=False) for a in record.addresses),
                   *record.sites]
        endpoint = self._stored_endpoint(record.endpoint)
        seen = record.last_handshake
        recent = self._last_seen.pop(record.public_key, None)  # removed from this device lately
        if recent is not None and recent[1] > (seen or 0):
            endpoint, seen = recent
        engine_peer = self.device.add_peer(public, preshared_key=psk, allowed_ips=allowed,
                                           endpoint=endpoint, name=record.name)
        engine_peer.last_handshake_wall = seen
        # Only an initiation newer than any this key ever completed is answered.
        engine_peer.greatest_timestamp = max(stored.get(record.public_key, b""),
                                             self._pending_ts.get(record.public_key, b""))
        self.peers[record.name] = (_peer_spec(record), engine_peer)
        return engine_peer

    def _stored_endpoint(self, text: str | None):
        """A registry endpoint ("198.51.100.18:40000", "[2001:db8::2]:40000") as this hub's
        socket addresses it; None when there is none or it does not parse."""
        if not text or self.sock is None:
            return None
        try:
            return Endpoint.parse(text).sockaddr(self.sock.family)
        except ValueError:
            return None

    def _remember(self, public_key: str, engine_peer) -> None:
        if len(self._last_seen) >= 4096:  # only the recent ones are ever called back
            old = time.time() - REDIAL_WITHIN
            self._last_seen = {k: v for k, v in self._last_seen.items() if v[1] >= old}
        self._last_seen[public_key] = (engine_peer.endpoint, engine_peer.last_handshake_wall)

    def _call_back(self, engine_peer, now: float, wall: float) -> None:
        seen = engine_peer.last_handshake_wall
        if engine_peer.endpoint is not None and seen and wall - seen < REDIAL_WITHIN:
            self.device.initiate(engine_peer, now)

    def _redial(self, now: float, wall: float, driver: Driver | None = None) -> int:
        """Start handshakes to laptops that were connected before a restart (or before the
        other hub of a standby pair gave up the service address); with `ha`, from the service
        address. Returns how many were called."""
        called = []
        for _, engine_peer in self.peers.values():
            sent = engine_peer.last_sent_handshake
            self._call_back(engine_peer, now, wall)
            if engine_peer.last_sent_handshake != sent:
                called.append(engine_peer.endpoint)
        if driver is not None and self.settings.ha and called:
            driver.send_from(called, self.settings.ha["service_address"])
        return len(called)

    # -- hot standby ----------------------------------------------------------------------------

    def set_role(self, role: str) -> None:
        """"active" or "standby" (keepalived's MASTER, or BACKUP/FAULT/STOP). Standby ends every
        session at once and answers nothing; active takes the registry's endpoints (the other
        hub wrote them) and calls back the laptops seen within REDIAL_WITHIN."""
        if self.settings.ha is None:
            raise control.ControlError("this hub has no ha setting in hub.json (hot standby"
                                       " is off)")
        if role == self.role:
            return
        if role == "standby":
            with self._device():
                sessions = sum(1 for _, p in self.peers.values() if p.current is not None)
                self.device.set_standby(True)
                if self.driver is not None:
                    self.driver.forget_sources()
                self.role = role
            log.info("ha: standby: %d sessions ended, answering nothing", sessions)
            return
        try:
            records = self.registry.list()
            stored = self._load_timestamps()
        except RegistryError as exc:  # still take over, with what this hub saw itself
            log.warning("ha: registry not read (%s): calling back the laptops this hub saw",
                        exc)
            records, stored = [], {}
        with self._device():
            taken = self._take_endpoints(records, stored)
            self.device.set_standby(False)
            self.role = role
            driver = self.driver
            now = driver.now() if driver is not None else self.clock()
            called = self._redial(now, time.time(), driver)
        log.info("ha: active: %d endpoints from the registry, calling back %d laptops from %s",
                 taken, called, self.settings.ha["service_address"])

    def _holds_service_address(self) -> bool:
        try:
            return bool(linux.run_apart(linux.has_address, self.settings.ha["service_address"]))
        except linux.LinuxError as exc:
            log.warning("ha: cannot tell whether this host holds the service address: %s", exc)
            return False

    def _take_endpoints(self, records, stored: dict[str, bytes]) -> int:
        """Endpoints and handshake times newer than this hub's own, and the greatest handshake
        timestamps (a captured initiation stays refused here too). Under the device lock."""
        taken = 0
        for r in records:
            entry = self.peers.get(r.name)
            if entry is None:
                continue
            spec, p = entry
            ts = stored.get(spec[0], b"")
            if ts > p.greatest_timestamp:
                p.greatest_timestamp = ts
            if not r.endpoint or not r.last_handshake or self.sock is None or \
                    r.last_handshake <= (p.last_handshake_wall or 0):
                continue
            endpoint = self._stored_endpoint(r.endpoint)
            if endpoint is None:
                continue
            p.endpoint = endpoint
            p.last_handshake_wall = r.last_handshake
            self._recorded[r.name] = (r.endpoint, r.last_handshake)
            taken += 1
        return taken

    def ha_status(self) -> list[tuple[str, str]]:
        with self._device() as device:
            dropped = device.drops.get("standby", 0)
        return [("role", self.role),
                ("service_address", (self.settings.ha or {}).get("service_address", "")),
                ("standby_drops", str(dropped))]

    # -- events and control ---------------------------------------------------------------------

    def on_event(self, kind: Event, peer, detail) -> None:
        """In the trio thread, for the latest event of each kind per peer (see Driver)."""
        entry = self.peers.get(peer.name)
        if entry is None or entry[1] is not peer:
            return  # removed (or replaced) since the data plane saw it
        if kind is Event.HANDSHAKE:
            self._log_limited(kind, peer.name, "handshake with peer %s from %s",
                              format_endpoint(peer.endpoint))
            self._mark(peer)
        elif kind is Event.ENDPOINT:
            self._log_limited(kind, peer.name, "peer %s moved to %s", format_endpoint(detail))
            self._mark(peer)
        elif kind is Event.GAVE_UP:
            log.info("peer %s: no handshake answer for 90 s, giving up until it calls", peer.name)

    def _mark(self, peer) -> None:
        self._dirty[peer.name] = peer
        if self._writer_wake is not None:
            self._writer_wake.set()

    def _log_limited(self, kind: str, name: str, fmt: str, *args) -> None:
        """One line per peer and kind per LOG_EVERY; the others are counted and summed up."""
        now = self.clock()
        seen = self._logged.get((kind, name))
        if seen is not None and now - seen[0] < LOG_EVERY:
            seen[1] += 1
            return
        log.info(fmt, name, *args)
        self._logged[kind, name] = [now, 0]

    def _log_summaries(self, now: float) -> None:
        for (kind, name), seen in list(self._logged.items()):
            if now - seen[0] < LOG_EVERY:
                continue
            if seen[1]:
                what = "handshakes" if kind is Event.HANDSHAKE else "moves"
                # "at least": the driver hands over only the latest event of a batch
                log.info("peer %s: at least %d more %s in %d s, not logged one by one", name,
                         seen[1], what, round(now - seen[0]))
            del self._logged[kind, name]

    # -- writing behind -------------------------------------------------------------------------

    def _keep_timestamp(self, public_key: str, engine_peer) -> None:
        ts = engine_peer.greatest_timestamp
        if ts and ts > max(self._stored_ts.get(public_key, b""),
                           self._pending_ts.get(public_key, b"")):
            self._pending_ts[public_key] = ts

    def _load_timestamps(self) -> dict[str, bytes]:
        stored = self.registry.handshake_timestamps()
        for key, ts in stored.items():
            if ts > self._stored_ts.get(key, b""):
                self._stored_ts[key] = ts
        return stored

    def _collect(self, everyone: bool = False) -> tuple[list, list]:
        """What to write: (name, endpoint, handshake time) of the peers marked since the last
        write, and (public key, timestamp) of keys whose greatest timestamp grew. Holds the
        device for the reads; a rekey of a laptop that stays put writes only every RECORD_EVERY."""
        endpoints = []
        with self._device():
            for name, p in self._dirty.items():
                endpoint = format_endpoint(p.endpoint) or None
                when = int(p.last_handshake_wall or 0) or None
                last = self._recorded.get(name)
                if last is None or last[0] != endpoint or (when or 0) - last[1] >= RECORD_EVERY:
                    endpoints.append((name, endpoint, when))
            for spec, p in (self.peers.values() if everyone else
                            (self.peers[n] for n in self._dirty if n in self.peers)):
                self._keep_timestamp(spec[0], p)
        self._dirty.clear()
        return endpoints, list(self._pending_ts.items())

    def _store(self, endpoints: list, timestamps: list) -> bool:
        """In a worker thread (or at exit): one transaction for each list."""
        try:
            if timestamps:
                self.registry.raise_handshake_timestamps(timestamps)
            if endpoints:
                self.registry.record_endpoints(endpoints)
        except RegistryError as exc:
            log.warning("could not record %d endpoints and %d handshake timestamps: %s",
                        len(endpoints), len(timestamps), exc)
            return False
        return True

    def _stored(self, endpoints: list, timestamps: list) -> None:
        for name, endpoint, when in endpoints:
            self._recorded[name] = (endpoint, when or 0)
        for key, ts in timestamps:
            if ts > self._stored_ts.get(key, b""):
                self._stored_ts[key] = ts
            if self._pending_ts.get(key) == ts:
                del self._pending_ts[key]

    async def write_behind(self) -> None:
        """Store what the data plane saw, off the event loop: at once when nothing was written
        in the last WRITE_EVERY (a laptop's first handshake survives a crash right after it),
        else WRITE_EVERY after the last write, with whatever is newest by then."""
        last_write = -WRITE_EVERY
        while True:
            self._writer_wake = trio.Event()
            if not self._dirty:
                with trio.move_on_after(WRITE_EVERY):  # also for the log summaries
                    await self._writer_wake.wait()
            wait = last_write + WRITE_EVERY - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._log_summaries(self.clock())
            endpoints, timestamps = self._collect()
            if not endpoints and not timestamps:
                continue
            last_write = trio.current_time()
            if await trio.to_thread.run_sync(self._store, endpoints, timestamps):
                self._stored(endpoints, timestamps)
            else:  # try again next time, with whatever is newer by then
                for name, *_ in endpoints:
                    if name in self.peers:
                        self._dirty.setdefault(name, self.peers[name][1])

    def flush(self) -> None:
        """Store everything now, every peer's timestamp included (at stop)."""
        endpoints, timestamps = self._collect(everyone=True)
        if self._store(endpoints, timestamps):
            self._stored(endpoints, timestamps)

    def status(self) -> list[dict]:
        with self._device():
            return self._status()

    def _status(self) -> list[dict]:
        rows = []
        for name, (spec, p) in sorted(self.peers.items()):
            rows.append({"name": name, "public_key": spec[0], "address": spec[1],
                         "endpoint": format_endpoint(p.endpoint),
                         "latest_handshake": int(p.last_handshake_wall or 0),
                         "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes})
        return rows

    def handle_control(self, pairs):
        keys_ = [k for k, _ in pairs]
        if keys_ == ["get"]:
            return control.get_response_pairs(self.status())
        if keys_ == ["stats"]:
            with self._device() as device:
                drops = sorted(device.drops.items())
                offload = sorted(self.driver.offload.items()) if self.driver else []
            return ([(f"drop_{reason}", str(n)) for reason, n in drops]
                    + [(f"tun_{what}", str(n)) for what, n in offload])
        if keys_ == ["ha"]:
            want = pairs[0][1]
            if want != "status":
                role = HA_ROLES.get(want)
                if role is None:
                    raise control.ControlError(f"ha={want!r}: give master, backup, fault, stop"
                                               " or status")
                self.set_role(role)
            return self.ha_status()
        if keys_ == ["sync"]:
            try:
                self.sync()
            except RegistryError as exc:
                raise control.ControlError(str(exc)) from None
            return self._sync_firewall()
        raise control.ControlError(f"unknown request {' '.join(keys_)!r}")

    async def _sync_firewall(self):
        """The answer to sync=1 waits until the kernel holds the new rules."""
        await self.apply_firewall()
        return []

    # -- running --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # SIGTERM and SIGINT are caught from the start: one that comes during start-up stops
        # the hub as soon as it is up, with everything undone, not half-way with rules left.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await self._run(signals, task_status)

    async def _run(self, signals, task_status) -> None:
        s = self.settings
        # Link and firewall steps run in a forked child (linux.run_apart): pyroute2 and
        # python-iptables then never load into the long-running hub.
        link = DeviceLink(s.interface, s.addresses, s.mtu, port=s.listen_port, sticky=True,
                          configure=lambda *args: linux.run_apart(linux.configure_link, *args))
        try:
            link.open_tun()
            self.sock = link.open_socket()
        except (linux.LinuxError, OSError) as exc:
            link.close()
            raise StartupError(getattr(exc, "strerror", None) or str(exc)) from None
        ifname = link.ifname
        firewall: list[int] = []  # families whose rules may be in the kernel
        try:
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
                firewall.append(family)
                try:
                    for warning in linux.run_apart(nat.setup, plan):
                        log.warning("%s", warning)
                except (nat.NatError, linux.LinuxError) as exc:
                    raise StartupError(f"firewall set-up failed: {exc}") from None
                self.applied[family] = plan
            if s.ha and self.role == "standby" and self._holds_service_address():
                # keepalived made this host master while the hub was not running (a restart
                # of the hub alone, or the hub started after keepalived): its hook was lost.
                self.role = "active"
                self.device.set_standby(False)
                log.info("ha: active: this host holds the service address %s",
                         s.ha["service_address"])
            driver = link.driver(self.device, self.on_event)
            self._redial(driver.now(), time.time(), driver)
            self.ops.prepare(driver)
            try:
                self.ops.start_metrics()
            except MetricsError as exc:
                raise StartupError(str(exc)) from None
            async with trio.open_nursery() as nursery:
                await nursery.start(self.enroller.run)
                self.driver = driver  # the device is changed under its lock from now on
                await link.serve(nursery, state.socket_path(self.state_dir), self.handle_control)
                nursery.start_soon(self.write_behind)
                nursery.start_soon(self._poll_registry)
                self._firewall_changed = trio.Event()
                nursery.start_soon(self._firewall_loop)
                nursery.start_soon(self.ops.run)
                log.info("hub up: %s %s, UDP port %d, %d peers%s", ifname,
                         ", ".join(map(str, s.addresses)), s.listen_port, len(self.peers),
                         f", {self.role} (hot standby pair)" if s.ha else "")
                self.ops.ready()
                task_status.started()
                async for signum in signals:
                    log.info("stopping on %s", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
            self.driver = None  # the data thread has stopped
            self.flush()
        finally:
            self.ops.stop()
            for family in firewall:
                try:
                    linux.run_apart(nat.teardown, s.interface, family)
                except (nat.NatError, linux.LinuxError) as exc:
                    log.error("firewall tear-down failed: %s", exc)
            link.close()
            self.sock = None

    async def _poll_registry(self) -> None:
        failing_since: float | None = None  # while the registry cannot be reached
        said_at = 0.0
        while True:
            await trio.sleep(REGISTRY_POLL)
            try:
                due = self._next_expiry()
                expired = due is not None and time.time() >= due
                # In a worker thread: a registry across the network (PostgreSQL) may take up to
                # its connect timeout to answer, and the packets must keep flowing meanwhile.
                token = await trio.to_thread.run_sync(self.registry.change_token)
                if expired or token != self._token:
                    self.sync()
            except RegistryError as exc:
                # One line when it starts and one a minute while it lasts, not one per poll;
                # the peers loaded keep their sessions meanwhile.
                now = time.monotonic()
                if failing_since is None or now - said_at >= OUTAGE_LOG_EVERY:
                    log.warning("registry check failed: %s (the loaded peers are served;"
                                " changes wait for the registry)", exc)
                    said_at = now
                failing_since = failing_since if failing_since is not None else now
                continue
            if failing_since is not None:
                log.info("registry reachable again after %.0f s", time.monotonic() - failing_since)
                failing_since = None

    async def _firewall_loop(self) -> None:
        """Live changes (a registry poll, an expired rule) reach the kernel from here."""
        while True:
            await self._firewall_changed.wait()
            self._firewall_changed = trio.Event()
            try:
                await self.apply_firewall()
            except control.ControlError as exc:
                log.error("%s; trying again in %.0f s", exc, FIREWALL_RETRY)
                await trio.sleep(FIREWALL_RETRY)
                self._firewall_changed.set()


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _egress_interfaces(egress: str | None) -> tuple[str | None, str | None]:
    """(IPv4, IPv6) egress: the one configured, which must exist, else each default route's."""
    if egress is not None:
        if not linux.link_exists(egress):
            raise linux.LinuxError(f"egress interface {egress} does not exist (pytun-admin init"
                                   " --egress, or egress in hub.json)")
        return egress, egress
    return linux.default_route_interface(4), linux.default_route_interface(6)

