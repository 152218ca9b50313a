"""One running tunnel: the shared engine with one peer (the hub), its routes, DNS and state.

    up:   TUN device with the config's addresses and MTU, one UDP socket (marked for a full
          tunnel), the Device and its Driver, the control socket; then the hub's address
          (retried every few seconds while it cannot be resolved), a handshake at once,
          routes and rules, DNS. Runs until SIGTERM, SIGINT or SIGHUP, then undoes all of it.
    state RUN_DIR/IFACE.json records the PID and everything set up, written before each
          step is carried out, so `down` can undo it after a SIGKILL; RUN_DIR/IFACE.sock
          answers `get=1` (common/control.py's protocol) for `status`.

Handshakes, keepalives and rekeying are the engine's. On top of it the client re-resolves a
host-name endpoint while handshakes go unanswered (after 15 s, and when the engine gives up),
moving on to the next address the name has, so a hub that changed address or a dead address
among several is left behind without a restart.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket

import trio

from ..common import control, keys, linux
from ..common.config import WgConfig
from ..common.device import Device
from ..common.driver import Driver, endpoint_for, format_endpoint
from ..common.peer import REKEY_TIMEOUT, Event
from ..common.runner import DeviceLink
from . import dns, hooks, routes
from .resolve import host_of, is_ip, lookup, next_address
from .runtime import (STATE_VERSION, TunnelError, process_start_time, socket_path, state_path,
                      undo_recorded, write_state)

log = logging.getLogger("pytun")

DEFAULT_MTU = 1420
RESOLVE_RETRY = 5.0  # seconds between tries while the hub's name does not resolve
RESOLVE_TIMEOUT = 10.0
RERESOLVE_AFTER = 15.0  # unanswered handshakes for this long: look the name up again
FAILOVER_AFTER = 2.0  # with `# pytun-endpoint` lines: an initiation unanswered this long
WATCH_INTERVAL = 1.0

_ABANDON = ("abandon_on_cancel"
            if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")


# ---------------------------------------------------------------------------------- the tunnel


class Tunnel:
    def __init__(self, cfg: WgConfig, ifname: str, config_path: str, directory: str, *,
                 lookup=lookup, resolve_retry: float = RESOLVE_RETRY):
        self.cfg = cfg
        self.peer_cfg = cfg.peers[0]
        self.ifname = ifname
        self.dir = directory
        self.lookup = lookup
        self.resolve_retry = resolve_retry
        self.mtu = cfg.interface.mtu or DEFAULT_MTU
        self.state = {"version": STATE_VERSION, "pid": os.getpid(),
                      "start_time": process_start_time(os.getpid()), "interface": ifname,
                      "config": os.path.abspath(config_path), "link": False, "plan": None,
                      "dns": None}
        self.link: DeviceLink | None = None
        self.tun_fd: int | None = None
        self.sock: socket.socket | None = None
        self.device: Device | None = None
        self.peer = None
        self.driver: Driver | None = None
        self.plan: routes.Plan | None = None
        self.phase = "starting"
        self.hub_label = ""  # host:port as configured
        self.connected = False
        self.failing_since: float | None = None
        self.last_resolve = -1e9
        self.resolving = False
        self.warned_silent = False
        self.error: BaseException | None = None
        self._nursery: trio.Nursery | None = None
        self._teardown_done = False

    # -- state file ---------------------------------------------------------------------------

    def save(self) -> None:
        write_state(state_path(self.ifname, self.dir), self.state)

    # -- set-up steps ---------------------------------------------------------------------------

    def _open(self) -> None:
        """TUN device, addresses, MTU, UDP socket, engine. Raises LinuxError / TunnelError."""
        i = self.cfg.interface
        if linux.link_exists(self.ifname):
            raise TunnelError(f"an interface named {self.ifname} already exists; "
                              "choose another name with --interface")
        addresses = i.addresses
        if not routes.ipv6_enabled():
            addresses = [a for a in addresses if a.version == 4]
            left_out = [str(a) for a in i.addresses if a.version == 6]
            if left_out:
                log.warning("IPv6 is off on this host: address %s left out", ", ".join(left_out))
        self.plan = routes.plan_for(self.peer_cfg.allowed_ips, addresses, table=i.table,
                                    fwmark=i.fwmark)
        if self.plan.skipped:
            log.warning("IPv6 is off on this host: AllowedIPs %s not routed",
                        ", ".join(self.plan.skipped))
        if self.plan.blocked:
            log.warning("AllowedIPs has 0.0.0.0/0 but not ::/0: IPv6 beyond the local network is "
                        "refused while the tunnel is up, not sent around it")
        warning = routes.dns_warning(self.plan, i.dns)
        if warning:
            log.warning("%s", warning)
        self.state["link"] = True
        self.save()
        self.link = DeviceLink(self.ifname, addresses, self.mtu, port=i.listen_port or 0,
                               mark=self.plan.fwmark)
        self.link.open_tun()
        self.tun_fd, self.ifname = self.link.tun_fd, self.link.ifname
        try:
            self.sock = self.link.open_socket()
        except OSError as exc:
            raise TunnelError(f"cannot open the UDP socket: {exc.strerror or exc}") from None
        p = self.peer_cfg
        self.device = Device(i.private_key, mtu=self.mtu)
        self.peer = self.device.add_peer(p.public_key, preshared_key=p.preshared_key,
                                         allowed_ips=p.allowed_ips,
                                         persistent_keepalive=p.persistent_keepalive, name="hub")
        if p.endpoint is not None:
            host, port = p.endpoint
            self.hub_label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.driver = self.link.driver(self.device, self.on_event)

    def _route(self) -> None:
        """Routes, rules, marks, then DNS; each recorded before it is carried out."""
        self.state["plan"] = self.plan.to_json()
        self.save()
        for warning in routes.apply(self.plan, self.ifname):
            log.warning("%s", warning)
        i = self.cfg.interface
        if i.dns or i.dns_search:
            self.state["dns"] = dns.choose(self.ifname)
            self.save()
            record, warning = dns.apply(self.ifname, i.dns, i.dns_search,
                                        full_tunnel=bool(self.plan.full_tunnel))
            self.state["dns"] = record
            self.save()
            if warning:
                log.warning("%s", warning)

    # -- the hub's address ----------------------------------------------------------------------

    async def _resolve(self, *, first: bool) -> bool:
        """Look the hub's names up once and set the endpoint: the first address the first
        name has, or after a failure the next one, through every address of the Endpoint and
        then of each `# pytun-endpoint` line. True when an address was found."""
        self.last_resolve = self.driver.now()
        again = f"; trying again in {self.resolve_retry:g} s" if first else ""
        candidates: list[tuple[str, int]] = []
        for host, port in [self.peer_cfg.endpoint, *self.peer_cfg.alternate_endpoints]:
            if is_ip(host):
                candidates.append((host.strip("[]"), port))
                continue
            try:
                with trio.fail_after(RESOLVE_TIMEOUT):
                    addresses = await trio.to_thread.run_sync(
                        self.lookup, host, port, self.sock.family, **{_ABANDON: True})
            except trio.TooSlowError:
                log.warning("cannot resolve %s: no answer within %g s%s", host,
                            RESOLVE_TIMEOUT, again)
                continue
            except (OSError, UnicodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.warning("cannot resolve %s: %s%s", host, reason, again)
                continue
            if not addresses:
                log.warning("cannot resolve %s: no usable address%s", host, again)
            candidates += [(address, port) for address in addresses]
        if not candidates:
            return False
        current = self.peer.endpoint
        here = (host_of(current), current[1]) if current is not None else None
        address, port = candidates[0] if first else next_address(candidates, here)
        try:
            endpoint = endpoint_for(self.sock, address, port)
        except ValueError as exc:
            log.warning("cannot use %s for the hub: %s", address, exc)
            return False
        if endpoint != self.peer.endpoint:
            if not first:
                log.info("hub %s: trying %s (was %s)", self.hub_label,
                         format_endpoint((address, port)),
                         format_endpoint(self.peer.endpoint) or "none")
            with self.driver.locked() as device:
                self.peer.endpoint = endpoint
                if not first:
                    # A new place: the initiation goes out now, whenever the last one went to
                    # the old place, and the wait for an answer starts again from it.
                    self.peer.last_sent_handshake = None
                    device.initiate(self.peer, self.driver.now())
                    self.failing_since = None
        return True

    async def _resolve_first(self) -> None:
        host, port = self.peer_cfg.endpoint
        if is_ip(host):
            try:
                endpoint = endpoint_for(self.sock, host.strip("[]"), port)
            except ValueError as exc:
                raise TunnelError(f"cannot use the hub's endpoint {self.hub_label}: "
                                  f"{exc}") from None
            with self.driver.locked():
                self.peer.endpoint = endpoint
        else:
            self.phase = "resolving"
            while not await self._resolve(first=True):
                await trio.sleep(self.resolve_retry)
        log.info("hub at %s%s", self.hub_label,
                 "" if is_ip(host) else f" ({format_endpoint(self.peer.endpoint)})")
        covered = routes.covering(self.peer_cfg.allowed_ips, host_of(self.peer.endpoint))
        if covered is not None and covered.prefixlen > 0:
            log.warning("the hub's address is inside AllowedIPs %s: its own packets would loop "
                        "into the tunnel", covered)

    async def _re_resolve(self) -> None:
        self.resolving = True
        try:
            await self._resolve(first=False)
        finally:
            self.resolving = False

    # -- events and watching -------------------------------------------------------------------

    def on_event(self, kind: Event, peer, detail) -> None:
        if kind is Event.HANDSHAKE:
            self.failing_since = None
            self.warned_silent = False
            self.phase = "up"
            if not self.connected:
                log.info("handshake with hub %s", format_endpoint(peer.endpoint))
                self.connected = True
            else:
                log.debug("handshake with hub %s (new session)", format_endpoint(peer.endpoint))
        elif kind is Event.ENDPOINT:
            log.info("hub now answers from %s", format_endpoint(detail))
        elif kind is Event.GAVE_UP:
            log.warning("no handshake answer from the hub at %s for 90 s; still trying when "
                        "there is traffic", format_endpoint(peer.endpoint))
            self.connected = False
            self.phase = "no answer"
            if self._has_name() and not self.resolving and self._nursery is not None:
                self._nursery.start_soon(self._re_resolve)

    def _has_name(self) -> bool:
        """Is there anywhere else to try: a name (its addresses may change) or more
        endpoints?"""
        return self.peer_cfg.endpoint is not None and (
            not is_ip(self.peer_cfg.endpoint[0]) or bool(self.peer_cfg.alternate_endpoints))

    def check(self, now: float) -> bool:
        """Once a second: are handshakes going unanswered? True: look the name up again."""
        peer = self.peer
        hs = peer.handshake
        failing = hs is not None and (peer.last_handshake is None or peer.last_handshake < hs.sent)
        if not failing:
            self.failing_since = None
            return False
        if self.failing_since is None:
            self.failing_since = hs.sent
        silent = now - self.failing_since
        # With another endpoint to try, move on soon: a live hub answers in milliseconds, or
        # with a cookie reply when it is under load (then it is alive: stay).
        more = bool(self.peer_cfg.alternate_endpoints)
        threshold = FAILOVER_AFTER if more else RERESOLVE_AFTER
        if silent < threshold or more and peer.cookies.fresh(now, 2 * REKEY_TIMEOUT):
            return False
        if self.connected or not self.warned_silent:
            log.warning("the hub at %s has not answered a handshake for %d s",
                        format_endpoint(peer.endpoint), silent)
            self.warned_silent = True
            self.connected = False
            self.phase = "no answer"
        retrying = (peer.last_sent_handshake is not None
                    and now - peer.last_sent_handshake < 2 * REKEY_TIMEOUT + 1)
        return (retrying and self._has_name() and not self.resolving
                and now - self.last_resolve >= threshold)

    async def _watch(self) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL)
            if self.check(self.driver.now()):
                self._nursery.start_soon(self._re_resolve)

    # -- control socket ------------------------------------------------------------------------

    def status(self) -> dict:
        p = self.peer
        i = self.cfg.interface
        return {
            "interface": self.ifname,
            "pid": os.getpid(),
            "state": self.phase,
            "public_key": keys.encode_key(self.device.public_key) if self.device else "",
            "address": ",".join(str(a) for a in i.addresses),
            "hub_public_key": keys.encode_key(self.peer_cfg.public_key),
            "hub": self.hub_label,
            "endpoint": format_endpoint(p.endpoint) if p else "",
            "latest_handshake": int(p.last_handshake_wall or 0) if p else 0,
            "rx_bytes": p.rx_bytes if p else 0,
            "tx_bytes": p.tx_bytes if p else 0,
            "persistent_keepalive": self.peer_cfg.persistent_keepalive,
            "full_tunnel": int(bool(self.plan and self.plan.full_tunnel)),
        }

    def handle_control(self, pairs):
        if [k for k, _ in pairs] == ["get"]:
            return list(self.status().items())
        if [k for k, _ in pairs] == ["stats"] and self.driver is not None:
            # As the hub answers it: drop (and I/O error) counters, then TUN offload counters.
            with self.driver.locked() as device:
                drops = sorted(device.drops.items())
                offload = sorted(self.driver.offload.items())
            return ([(f"drop_{reason}", str(n)) for reason, n in drops]
                    + [(f"tun_{what}", str(n)) for what, n in offload])
        raise control.ControlError(f"unknown request {' '.join(k for k, _ in pairs)!r}")

    # -- running -------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bring the tunnel up and keep it until a signal. Errors land in self.error."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._stop_on_signal, signals, nursery.cancel_scope)
                try:
                    self._hooks("PreUp", self.cfg.interface.pre_up)
                    self._open()
                    await self.link.serve(nursery, socket_path(self.ifname, self.dir),
                                          self.handle_control)
                    if self.peer_cfg.endpoint is not None:
                        await self._resolve_first()
                        self.phase = "handshaking"
                        with self.driver.locked() as device:
                            device.initiate(self.peer, self.driver.now())
                    else:
                        self.phase = "waiting for the hub"
                        log.info("no Endpoint in the config: waiting for the hub to call")
                    self._route()
                    self._hooks("PostUp", self.cfg.interface.post_up)
                    i = self.cfg.interface
                    if i.pre_down or i.post_down:  # kept for `down` after a crash, too
                        self.state["down_hooks"] = {"pre_down": i.pre_down,
                                                    "post_down": i.post_down}
                        self.save()
                except (linux.LinuxError, TunnelError, control.ControlError, OSError) as exc:
                    self.error = exc
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(self._watch)
                log.info("%s is up: %s, %s", self.ifname,
                         ", ".join(str(a) for a in self.cfg.interface.addresses) or "no address",
                         "full tunnel" if self.plan.full_tunnel else
                         f"{len(self.plan.routes)} route(s) through the tunnel")
                task_status.started()

    def _hooks(self, kind: str, commands: list[str]) -> None:
        problems = hooks.run_hooks(kind, commands, self.ifname, stop_at_failure=True)
        if problems:
            raise TunnelError(problems[0])

    async def _stop_on_signal(self, signals, cancel_scope) -> None:
        async for signum in signals:
            log.info("stopping on %s", signal.Signals(signum).name)
            cancel_scope.cancel()
            return

    def teardown(self) -> list[str]:
        """Undo everything, in reverse, as `down` would from the state file; safe to call
        twice. Returns problems."""
        if self._teardown_done:
            return []
        self._teardown_done = True
        problems = undo_recorded(self.state, close=self._close) if self.state else []
        try:
            os.unlink(state_path(self.ifname, self.dir))
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove the state file: {exc.strerror}")
        return problems

    def _close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.sock = self.tun_fd = None
