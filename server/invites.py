"""The hub's side of enrollment by invite (the protocol is in common/enroll.py).

A laptop with a token (`pytun-admin invite NAME`) sends one request datagram to the hub's UDP
port, with a message type WireGuard never uses. It travels like this:

1. The data-plane thread hands it over: Device.receive finds a type it does not know and calls
   `Enroller.on_datagram` (under the device lock; WireGuard's own types never get here). That
   makes the cheap checks only, cheapest first: exact length, mac1, the source's rate
   (enroll.Gate: 1 a second, bursts of 5). A byte-for-byte repeat of a request that enrolled
   within ANSWERED_FOR seconds is answered from memory, so a laptop whose reply was lost gets
   it again and nothing changes; a repeat of a request still being served is dropped. The rest
   is queued for the trio side: at most MAX_PENDING waiting, and MAX_RATE a second from all
   sources together, so a flood from many addresses cannot keep the hub busy with X25519.
2. `Enroller.run`, a trio task, takes the queue and serves one request at a time in a worker
   thread (`handle`): the X25519 work, the registry look-up, and when the token is right and
   the invite pending, the peer's address chosen as add-peer chooses it (allocate_addresses,
   under the registry's allocation lock) and the peer added with the invite marked used in one
   transaction (Registry.enroll).
3. Back on trio: the running hub applies the registry (sync, then the firewall, as `sync=1`
   does), and only then the reply is queued to the data plane, which sends it from the address
   the laptop dialled. The laptop's first handshake thus finds its peer and its access rules.

A request whose invite id and secret do not match a stored invite is counted
(`drop_enroll_bad_invite` in stats=1), answered with a one-line error, makes its source wait
enroll.EnrollLimiter.WRONG_INVITE_WAIT seconds, and is logged at most once per LOG_EVERY seconds
per source address (with a count of the others). A used, revoked or expired invite is
`drop_enroll_refused`. The hub never sees the laptop's private key: the request carries only its
public key (and a DH proof of holding the private one).
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import time
from dataclasses import dataclass

import trio

from ..common import config, control, enroll, keys
from ..common.driver import format_endpoint
from .admin import _peer_config, allocate_addresses
from .registry import Peer, RegistryError

log = logging.getLogger("pytun")

MAX_PENDING = 32  # requests waiting for the trio side; more are dropped (enroll_busy)
MAX_RATE = 20.0  # requests a second, all sources together, that get to the X25519 work ...
MAX_BURST = 20.0  # ... in bursts of this many; the rest are dropped (enroll_busy)
ANSWERED_FOR = 60.0  # seconds a request that enrolled is answered again from memory
MAX_ANSWERED = 256
LOG_EVERY = 5.0  # seconds between log lines about failed enrollments from one source address
MAX_LOGGED_SOURCES = 4096
WRONG_INVITE = ("the hub knows no invite with this token's id and secret: ask for a new"
                " token")


@dataclass
class Outcome:
    """What serving one request came to; applied on the trio side."""
    reply: bytes | None = None
    drop: str | None = None  # the drop counter to raise
    penalize: bool = False  # a wrong invite: the source waits
    enrolled: Peer | None = None
    message: str | None = None  # for the log
    kind: str = "refused"  # what is logged at most once per LOG_EVERY per source address


class Enroller:
    def __init__(self, hub):
        self.hub = hub
        self.device = hub.device
        self.gate = enroll.Gate(hub.device.public_key)
        self.rng = os.urandom
        self.wallclock = time.time  # invites expire by the wall clock
        self.monotonic = time.monotonic  # the device's clock (rate limits, the memory of replies)
        self.enrolled = 0
        self._pending: collections.deque = collections.deque()
        self._in_progress: set[bytes] = set()  # digests of requests queued or being served
        # digest -> (reply, until)
        self._answered: collections.OrderedDict = collections.OrderedDict()
        self._token = None  # trio's, while run() runs
        self._wake: trio.Event | None = None
        self._scheduled = False
        self._logged: dict[tuple, list] = {}  # (source address, kind) -> [last line, not logged]
        self._budget = [MAX_BURST, 0.0]  # all sources' token bucket: [tokens, last refill]

    # -- on the data-plane thread, under the device lock ------------------------------------------

    def on_datagram(self, data, src, now: float) -> bool:
        """Device.other_handler: True when the datagram was an enrollment request (taken)."""
        if not enroll.is_request(data):
            return False
        drops = self.device.drops
        if len(data) != enroll.REQUEST_LEN:
            drops["enroll_bad_length"] += 1
            return True
        if not self.gate.check_mac1(data):
            drops["enroll_bad_mac1"] += 1
            return True
        if not self.gate.allow(src, now):
            drops["enroll_rate_limited"] += 1
            return True
        data = bytes(data)
        digest = enroll.request_digest(data)
        kept = self._answered.get(digest)
        if kept is not None and now < kept[1]:
            self.device.net_out.append((kept[0], src))  # a lost reply: the same bytes again
            return True
        if digest in self._in_progress:
            return True  # a retransmission of one being served: it gets that one's reply
        if self._token is None or len(self._pending) >= MAX_PENDING or not self._spend(now):
            drops["enroll_busy"] += 1
            return True
        self._in_progress.add(digest)
        self._pending.append((data, digest, src))
        if not self._scheduled:
            self._scheduled = True
            try:
                self._token.run_sync_soon(self._wake_up)
            except trio.RunFinishedError:
                pass
        return True

    def _spend(self, now: float) -> bool:
        """A token of the bucket all sources share: a flood from many addresses (each within
        its own rate) still gets MAX_RATE requests a second to the X25519 work, no more."""
        tokens, last = self._budget
        tokens = min(MAX_BURST, tokens + (now - last) * MAX_RATE)
        if tokens < 1.0:
            self._budget = [tokens, now]
            return False
        self._budget = [tokens - 1.0, now]
        return True

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # -- on trio --------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._wake = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                with self.hub._device():
                    batch = list(self._pending)
                    self._pending.clear()
                    self._scheduled = False
                for data, digest, src in batch:
                    await self.serve(data, digest, src)
        finally:
            self._token = None

    async def serve(self, data: bytes, digest: bytes, src) -> None:
        """One request, start to end: worker thread, then the running hub, then the reply."""
        try:
            outcome = await trio.to_thread.run_sync(self.handle, data, self.wallclock())
        except RegistryError as exc:  # the registry could not be read
            outcome = Outcome(drop="enroll_failed", message=f"registry: {exc}")
        except Exception as exc:  # a bug here must not stop the hub
            log.exception("enrollment failed")
            outcome = Outcome(drop="enroll_failed", message=f"{type(exc).__name__}")
        if outcome.enrolled is not None:
            self.enrolled += 1
            try:
                self.hub.sync()
                await self.hub.apply_firewall()
            except (RegistryError, control.ControlError) as exc:
                log.warning("peer %s enrolled, but the hub did not apply it yet: %s",
                            outcome.enrolled.name, exc)
        with self.hub._device() as device:
            self._in_progress.discard(digest)
            now = self.monotonic()
            if outcome.drop:
                device.drops[outcome.drop] += 1
            if outcome.penalize:
                self.gate.penalize(src, now)
            if outcome.reply is not None:
                device.net_out.append((outcome.reply, src))
                if outcome.enrolled is not None:
                    self._remember(digest, outcome.reply, now)
        if outcome.enrolled is not None:
            log.info("%s", outcome.message)
        elif outcome.message:
            self._log_limited(src, outcome.kind, outcome.message)

    def _remember(self, digest: bytes, reply: bytes, now: float) -> None:
        answered = self._answered
        for key, (_, until) in list(answered.items()):
            if until > now and len(answered) < MAX_ANSWERED:
                break
            del answered[key]  # oldest first: expired, or room for the new one
        answered[digest] = (reply, now + ANSWERED_FOR)

    def _log_limited(self, src, kind: str, message: str) -> None:
        """One line per source address and kind of failure per LOG_EVERY; the others are
        counted in the next."""
        host, now = (src[0], kind), self.monotonic()
        seen = self._logged.get(host)
        if seen is not None and now - seen[0] < LOG_EVERY:
            seen[1] += 1
            return
        more = f" ({seen[1]} more from there not logged)" if seen and seen[1] else ""
        if len(self._logged) >= MAX_LOGGED_SOURCES:
            self._logged.clear()
        self._logged[host] = [now, 0]
        log.warning("enrollment from %s refused: %s%s", format_endpoint(src), message, more)

    # -- in a worker thread ---------------------------------------------------------------------

    def handle(self, data: bytes, now: float) -> Outcome:
        """Open a request and answer it; enroll the laptop when its token is right. `now` is
        the wall clock. Never raises for bad input: the outcome says what happened."""
        try:
            request = enroll.open_request_untrusted(self.device.private_key, data)
        except enroll.EnrollFailure as exc:
            return Outcome(drop="enroll_bad_request", kind="unreadable",
                           message=f"unreadable request ({exc.reason})")
        registry, settings = self.hub.registry, self.hub.settings
        invite = registry.get_invite(request.invite_id.hex())
        check = enroll.verifier(request.invite_id, request.secret)
        if invite is None or not hmac.compare_digest(invite.verifier, check):
            return Outcome(reply=self._reply(request, False, WRONG_INVITE),
                           drop="enroll_bad_invite", penalize=True, kind="wrong",
                           message=f"wrong invite (id {request.invite_id.hex()})")
        if invite.state(now) != "pending":
            return self._refuse(request, invite.refusal())
        public = keys.encode_key(request.laptop_public)
        try:
            with registry.allocation_lock():
                address, address6, reserved = allocate_addresses(registry, settings)
                peer = Peer(name=invite.name, public_key=public, address=address,
                            address6=address6, full_tunnel=invite.full_tunnel,
                            keepalive=invite.keepalive, groups=invite.groups,
                            expires=invite.peer_expiry(now))
                text = config.render(_peer_config(settings, self.device.public_key, peer,
                                                  None, None))
                reply = self._reply(request, True, text)  # before storing: it must fit
                registry.enroll(invite.id, peer, subnet=settings.subnet, reserved=reserved,
                                subnet6=settings.subnet6, now=now)
        except RegistryError as exc:
            return self._refuse(request, f"invite {invite.id} for {invite.name}: {exc}")
        except ValueError as exc:  # the config is longer than one reply can hold
            return self._refuse(request, f"invite {invite.id} for {invite.name}: {exc}")
        addresses = ", ".join(str(a.ip) for a in peer.addresses)
        return Outcome(reply=reply, enrolled=peer,
                       message=f"peer {peer.name} enrolled with invite {invite.id} at "
                               f"{addresses}, public key {public}")

    def _refuse(self, request: enroll.Request, why: str) -> Outcome:
        return Outcome(reply=self._reply(request, False, why), drop="enroll_refused",
                       message=why)

    def _reply(self, request: enroll.Request, ok: bool, text: str) -> bytes:
        if not ok:
            text = text.splitlines()[0][:300] if text else "refused"
        return enroll.create_reply(request, self.rng(32), ok, text)
