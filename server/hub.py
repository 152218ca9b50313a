"""The hub: one Device with a peer per registry row, a TUN device, one UDP socket, NAT.

The registry is the source of truth. `sync()` applies its difference to the running device
without touching unchanged peers' sessions; it runs at start, on the control socket's `sync=1`
(pytun-admin sends it after every change) and whenever the registry's change token moves.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import time

import trio

from ..common import keys, linux
from ..common.device import Device
from ..common.driver import Driver, endpoint_for, format_endpoint, open_udp
from . import control, nat, policy, state
from .registry import Registry, RegistryError
from .ops import MetricsError, Operations

log = logging.getLogger("pytun")

REGISTRY_POLL = 1.0
REDIAL_WITHIN = 600.0  # after a restart, re-dial laptops seen in the last ten minutes
RECORD_EVERY = 300  # seconds between stored handshake times of a laptop that stays put
FIREWALL_RETRY = 5.0  # seconds before a failed live firewall change is tried again


class StartupError(Exception):
    """The hub cannot start; the message is one clear line."""


def _peer_spec(record) -> tuple:
    """What, in a registry row, the device must be rebuilt for when it changes."""
    return (record.public_key, ",".join(str(a) for a in record.addresses),
            tuple(str(s) for s in record.sites), record.preshared_key, record.keepalive)


class Hub:
    def __init__(self, state_dir: str, settings: state.HubSettings, private_key: bytes,
                 registry: Registry):
        self.state_dir = state_dir
        self.settings = settings
        self.registry = registry
        self.device = Device(private_key, mtu=settings.mtu,
                             allow_peer_to_peer=settings.allow_peer_to_peer)
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

    # -- registry ------------------------------------------------------------------------------

    def _device(self):
        """The device, held against the data plane while the block runs (once it runs)."""
        if self.driver is None:
            return contextlib.nullcontext(self.device)
        return self.driver.locked()

    def sync(self) -> tuple[list[str], list[str]]:
        """Apply the registry to the device and plan the firewall for it (`apply_firewall`
        carries the plan out). Returns (added, removed) peer names."""
        self._token = self.registry.change_token()
        records = self.registry.list()
        wanted = {r.name: r for r in records if not r.disabled}
        if self.view is not None:
            self._plan(records, self.registry.rules())
        with self._device():
            if self.view is not None:
                self.device.allow_peer_to_peer = self._reaches_peers
            return self._apply(wanted)

    def _plan(self, records, rules) -> None:
        self.records = records
        now = time.time()
        self.wanted = {}
        for family in (4, 6):
            p = policy.plan(self.view, records, rules, now, family)
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
                rules = plan["chains"][policy.chain(self.view.interface, "POL")]
                log.info("firewall: IPv%d access rules applied (%d rules)", family,
                         sum(r["target"] == "ACCEPT" for r in rules))

    def _apply(self, wanted: dict) -> tuple[list[str], list[str]]:
        added, removed = [], []
        for name in list(self.peers):
            spec, engine_peer = self.peers[name]
            record = wanted.get(name)
            if record is None or _peer_spec(record) != spec:
                self.device.remove_peer(engine_peer.public_key)
                del self.peers[name]
                self._recorded.pop(name, None)
                if record is None:
                    removed.append(name)
                    log.info("peer %s removed", name)
        for name, record in wanted.items():
            if name in self.peers:
                continue
            try:
                self._add(record)
            except (ValueError, keys.BadKey) as exc:
                log.error("peer %s not loaded: %s", name, exc)
                continue
            added.append(name)
        return added, removed

    def _add(self, record) -> None:
        public = keys.parse_public(record.public_key)
        psk = keys.parse_psk(record.preshared_key) if record.preshared_key else None
        allowed = [*(ipaddress.ip_network(a, strict=False) for a in record.addresses),
                   *record.sites]
        endpoint = None
        if record.endpoint and self.sock is not None:
            host, _, port = record.endpoint.rpartition(":")
            try:
                endpoint = endpoint_for(self.sock, host, int(port))
            except ValueError:
                endpoint = None
        engine_peer = self.device.add_peer(public, preshared_key=psk, allowed_ips=allowed,
                                           endpoint=endpoint, name=record.name)
        engine_peer.last_handshake_wall = record.last_handshake
        self.peers[record.name] = (_peer_spec(record), engine_peer)
        log.info("peer %s added (%s)", record.name, ", ".join(map(str, record.addresses)))

    def _redial(self, now: float, wall: float) -> None:
        """Start handshakes to laptops that were connected before a restart."""
        for _, engine_peer in self.peers.values():
            seen = engine_peer.last_handshake_wall
            if engine_peer.endpoint is not None and seen and wall - seen < REDIAL_WITHIN:
                self.device.initiate(engine_peer, now)

    # -- events and control ---------------------------------------------------------------------

    def on_event(self, kind: str, peer, detail) -> None:
        if kind == "handshake":
            log.info("handshake with peer %s from %s", peer.name, format_endpoint(peer.endpoint))
            self._record(peer)
        elif kind == "endpoint":
            log.info("peer %s moved to %s", peer.name, format_endpoint(detail))
            self._record(peer)
        elif kind == "handshake_gave_up":
            log.info("peer %s: no handshake answer for 90 s, giving up until it calls", peer.name)

    def _record(self, peer) -> None:
        """Persist where a laptop is, for the re-dial after a restart. A registry write waits
        for the disk, so a rekey (every two minutes per laptop) writes only when the endpoint
        moved or the stored handshake time is older than RECORD_EVERY."""
        endpoint = format_endpoint(peer.endpoint) or None
        when = int(peer.last_handshake_wall or 0) or None
        last = self._recorded.get(peer.name)
        if last is not None and last[0] == endpoint and (when or 0) - last[1] < RECORD_EVERY:
            return
        try:
            self.registry.record_endpoint(peer.name, endpoint, when)
            self._recorded[peer.name] = (endpoint, when or 0)
        except RegistryError as exc:
            log.warning("could not record the endpoint of %s: %s", peer.name, exc)

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
            return [(f"drop_{reason}", str(n)) for reason, n in drops]
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
        s = self.settings
        try:
            tun_fd, ifname = linux.open_tun(s.interface, vnet_hdr=True)
        except linux.LinuxError as exc:
            raise StartupError(str(exc)) from None
        firewall: list[int] = []  # families whose rules may be in the kernel
        try:
            # Link and firewall steps run in a forked child (linux.run_apart): pyroute2 and
            # python-iptables then never load into the long-running hub.
            try:
                linux.run_apart(linux.configure_link, ifname, s.addresses, s.mtu)
                self.sock = open_udp(s.listen_port)
            except (linux.LinuxError, OSError) as exc:
                raise StartupError(getattr(exc, "strerror", None) or str(exc)) from None
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
            driver = Driver(self.device, tun_fd, self.sock, on_event=self.on_event,
                            sticky=True, vnet_hdr=True)
            self._redial(driver.now(), time.time())
            self.ops.prepare(driver)
            try:
                self.ops.start_metrics()
            except MetricsError as exc:
                raise StartupError(str(exc)) from None
            async with trio.open_nursery() as nursery:
                await nursery.start(driver.run)
                self.driver = driver
                await nursery.start(control.serve, state.socket_path(self.state_dir),
                                    self.handle_control)
                nursery.start_soon(self._poll_registry)
                self._firewall_changed = trio.Event()
                nursery.start_soon(self._firewall_loop)
                nursery.start_soon(self.ops.run)
                log.info("hub up: %s %s, UDP port %d, %d peers", ifname,
                         ", ".join(map(str, s.addresses)), s.listen_port, len(self.peers))
                self.ops.ready()
                task_status.started()
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("stopping on %s", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
        finally:
            self.ops.stop()
            for family in firewall:
                try:
                    linux.run_apart(nat.teardown, s.interface, family)
                except (nat.NatError, linux.LinuxError) as exc:
                    log.error("firewall tear-down failed: %s", exc)
            if self.sock is not None:
                self.sock.close()
            os.close(tun_fd)

    async def _poll_registry(self) -> None:
        while True:
            await trio.sleep(REGISTRY_POLL)
            try:
                expired = self._expiry is not None and time.time() >= self._expiry
                if expired or self.registry.change_token() != self._token:
                    self.sync()
            except RegistryError as exc:
                log.warning("registry check failed: %s", exc)

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


def _egress_interfaces(egress: str | None) -> tuple[str | None, str | None]:
    """(IPv4, IPv6) egress: the one configured, which must exist, else each default route's."""
    if egress is not None:
        if not linux.link_exists(egress):
            raise linux.LinuxError(f"egress interface {egress} does not exist (pytun-admin init"
                                   " --egress, or egress in hub.json)")
        return egress, egress
    return linux.default_route_interface(4), linux.default_route_interface(6)

