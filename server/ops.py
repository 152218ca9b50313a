"""What the hub does for the people who run it: Prometheus metrics, systemd's notify protocol
and watchdog, and the session log. The hub calls these at a few points of its life:

    ops = Operations(hub)
    ops.prepare(driver)      before the data thread starts: it pings the watchdog
    ops.start_metrics()      after the TUN device, firewall and UDP socket are up
    ops.ready()              READY=1 and the first STATUS=
    nursery.start_soon(ops.run)   session ends, STATUS= when the counts change
    ops.stop()               STOPPING=1, the metrics server down, open sessions logged as ended
"""

from __future__ import annotations

import logging

import trio

from ..common.sdnotify import Notifier
from .metrics import MetricsError, MetricsServer  # noqa: F401 (MetricsError: for the hub)
from .sessions import SessionLog

log = logging.getLogger("pytun")

CHECK_EVERY = 1.0  # seconds between session-end checks and STATUS= updates


class Operations:
    def __init__(self, hub, notifier: Notifier | None = None):
        self.hub = hub
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.sessions = SessionLog()
        self.metrics: MetricsServer | None = None
        self._status = ""

    def prepare(self, driver) -> None:
        """Before the data thread starts: the session log sees the device's events before
        the hub does, and the thread pings the watchdog."""
        hub_events = driver.on_event

        def on_event(kind, peer, detail) -> None:
            self.sessions.on_event(kind, peer, detail)
            if hub_events is not None:
                hub_events(kind, peer, detail)
        driver.on_event = on_event
        interval = self.notifier.watchdog_interval
        if interval:
            driver.heartbeat = self.notifier.watchdog
            driver.heartbeat_interval = interval

    def start_metrics(self) -> None:
        s = self.hub.settings
        if not s.metrics:
            return
        server = MetricsServer(self.hub, s.metrics, s.metrics_token_file)
        server.start()
        self.metrics = server
        log.info("metrics on http://%s/metrics%s", server.address,
                 " (bearer token required)" if server.token else "")

    def status_line(self) -> str:
        peers, sessions = len(self.hub.peers), len(self.sessions.active)
        return (f"{peers} peer{'s' if peers != 1 else ''},"
                f" {sessions} session{'s' if sessions != 1 else ''}")

    def ready(self) -> None:
        self._status = self.status_line()
        self.notifier.notify("READY=1", f"STATUS={self._status}")

    async def run(self) -> None:
        while True:
            await trio.sleep(CHECK_EVERY)
            self.check()

    def check(self) -> None:
        hub = self.hub
        disabled = {r.name for r in getattr(hub, "records", ()) if r.disabled}
        self.sessions.check(hub.peers, disabled)
        status = self.status_line()
        if status != self._status:
            self._status = status
            self.notifier.notify(f"STATUS={status}")

    def stop(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping")
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        self.sessions.close()
