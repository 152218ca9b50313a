"""Prometheus metrics for the hub, read from the live device at scrape time.

Nothing here runs on the data plane or adds work per packet: a scrape copies the hub's peer
table (one atomic dict copy under the GIL) and reads the counters the device already keeps
(plain attribute reads, the way `pytun-admin show` reads them). The HTTP server runs in a
thread of its own, bound to exactly the address in the settings, with an optional bearer token.

Two families:

- the names of prometheus_wireguard_exporter, so its Grafana boards work unchanged:
  wireguard_sent_bytes_total, wireguard_received_bytes_total and
  wireguard_latest_handshake_seconds (a Unix time, 0 when never, as that exporter does), with
  the labels interface, public_key, allowed_ips and friendly_name (the peer's name);
- pytun's own, named by Prometheus conventions (see `FAMILIES`). Per-peer series carry one
  label, `peer` (the name); what can change about a peer (its groups, enabled or not) is only
  in pytun_peer_info, so a change never starts new byte-counter series.

Private and preshared keys are never read here; public keys are labels, as in the exporters.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import gzip

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..common.errors import PytunError
from ..common import __version__, files
from ..common.peer import REJECT_AFTER_TIME

log = logging.getLogger("pytun")

DEFAULT_PORT = 9586  # prometheus_wireguard_exporter's port
MAX_TOKEN = 4096

# Drop reasons that are failures of the data path's I/O rather than refused packets.
IO_ERRORS = ("udp_recv_error", "udp_send_error", "tun_read_error", "tun_write_error")
# Drop reasons that are refused handshake messages: counted as handshakes by result too.
HANDSHAKE_RESULTS = {
    "bad_mac1": "bad_mac1", "cookie_sent": "cookie_sent", "rate_limited": "rate_limited",
    "bad_source": "bad_source", "bad_initiation": "invalid", "bad_response": "invalid",
    "unknown_peer": "unknown_peer", "replayed_initiation": "replayed",
    "initiation_flood": "flood",
}

FAMILIES = {
    "pytun_peer_sent_bytes_total": "bytes sent to the peer, WireGuard overhead included",
    "pytun_peer_received_bytes_total": "bytes received from the peer, overhead included",
    "pytun_peer_last_handshake_timestamp_seconds": "Unix time of the latest handshake"
                                                   " (absent when never)",
    "pytun_peer_info": "one per registered peer: public key, groups, enabled",
    "pytun_peers": "registered peers by state (connected: a handshake in the last 180 s)",
    "pytun_sessions": "peers with a live session (a handshake in the last 180 s)",
    "pytun_handshakes_total": "handshake messages by result",
    "pytun_drops_total": "packets dropped, by reason",
    "pytun_under_load": "1 while the hub asks initiators for cookies (handshake flood)",
    "pytun_io_errors_total": "failed reads and writes on the UDP socket and the TUN device",
    "pytun_build_info": "the running pytun's version",
    "pytun_peer_expiry_timestamp_seconds": "Unix time a peer expires at (peers that expire)",
    "pytun_ha_active": "hot standby pair: 1 while this hub holds the service address, 0 standby",
    "pytun_tun_offload_total": "TUN offload on read: large packets read (gso_reads) and the"
                               " packets cut from them (gso_segments)",
    "pytun_handoffs_total": "data-plane workers: packets and initiations handed to the worker"
                            " that owns the peer (out) and taken from another (in)",
    "pytun_workers": "data-plane worker processes",
}


class MetricsError(PytunError):
    """Bad metrics settings; the message is one line."""


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9586', '[::1]:9586' or ':9586' (all addresses: say so explicitly) ->
    (host, port). A bare address takes the default port."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise MetricsError(f"metrics address {text!r}: give an IP address and port,"
                           f" e.g. 127.0.0.1:{DEFAULT_PORT}") from None
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise MetricsError(f"metrics address {text!r}: bad port {port!r}") from None
    if not 1 <= number <= 65535:
        raise MetricsError(f"metrics address {text!r}: port must be from 1 to 65535")
    return host, number


def read_token(path: str) -> str:
    """The bearer token in `path` (first line). Refuses a file others can read."""
    try:
        token = files.read_private(path, limit=MAX_TOKEN, encoding="utf-8").strip()
    except files.ExposedFile as exc:
        raise MetricsError(str(exc)) from None
    except OSError as exc:
        raise MetricsError(f"cannot read the metrics token file {path}: {exc.strerror}") from None
    if not token or "\n" in token:
        raise MetricsError(f"the metrics token file {path} must hold one non-empty line")
    return token


# ---------------------------------------------------------------------------------- collector

_COMPAT_LABELS = ("interface", "public_key", "allowed_ips", "friendly_name")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class PeerFamilies:
    """The per-peer series, in the text format, rendered by hand.

    With 10,000 peers these are some 60,000 series; building them through prometheus_client's
    sample objects takes about half a second of the hub process's CPU, and the data thread
    shares that process's interpreter lock. So each peer's lines are kept, keyed by what they
    show (spec, counters, handshake time), and only the peers whose figures moved since the
    last scrape are formatted again: an idle peer costs a dictionary look-up.
    """

    FAMILIES = (
        ("wireguard_sent_bytes_total", "counter", "Bytes sent to the peer"),
        ("wireguard_received_bytes_total", "counter", "Bytes received from the peer"),
        ("wireguard_latest_handshake_seconds", "gauge",
         "UNIX timestamp seconds of the last handshake"),
        ("pytun_peer_sent_bytes_total", "counter", FAMILIES["pytun_peer_sent_bytes_total"]),
        ("pytun_peer_received_bytes_total", "counter",
         FAMILIES["pytun_peer_received_bytes_total"]),
        ("pytun_peer_last_handshake_timestamp_seconds", "gauge",
         FAMILIES["pytun_peer_last_handshake_timestamp_seconds"]),
    )

    def __init__(self):
        self._lines: dict[str, tuple] = {}  # name -> (key, lines per family)
        self._info: dict[tuple, str] = {}

    def render(self, interface: str, peers, records) -> str:
        cache, fresh = self._lines, {}
        columns: list[list[str]] = [[] for _ in self.FAMILIES]
        for name, (spec, p) in peers:
            tx, rx, wall = p.tx_bytes, p.rx_bytes, p.last_handshake_wall
            key = (spec, tx, rx, wall, interface)
            hit = cache.get(name)
            if hit is None or hit[0] != key:
                hit = (key, self._format(interface, name, spec, tx, rx, wall))
            fresh[name] = hit
            for column, line in zip(columns, hit[1]):
                if line:
                    column.append(line)
        self._lines = fresh  # peers gone from the hub are forgotten
        out = []
        for (family, kind, help_), column in zip(self.FAMILIES, columns):
            out.append(f"# HELP {family} {help_}\n# TYPE {family} {kind}\n")
            out.extend(column)
        out.append(f"# HELP pytun_peer_info {FAMILIES['pytun_peer_info']}\n"
                   "# TYPE pytun_peer_info gauge\n")
        info = {}
        for r in records:
            key = (r.name, r.public_key, tuple(r.groups), bool(r.disabled))
            line = self._info.get(key)
            if line is None:
                line = "pytun_peer_info" + _labels((
                    ("peer", r.name), ("public_key", r.public_key),
                    ("groups", ",".join(r.groups)),
                    ("enabled", "false" if r.disabled else "true"))) + " 1.0\n"
            info[key] = line
            out.append(line)
        self._info = info
        expiring = [(r.name, r.expires) for r in records if getattr(r, "expires", None)]
        if expiring:
            family = "pytun_peer_expiry_timestamp_seconds"
            out.append(f"# HELP {family} {FAMILIES[family]}\n# TYPE {family} gauge\n")
            out.extend(f"{family}{_labels((('peer', name),))} {_number(when)}\n"
                       for name, when in expiring)
        return "".join(out)

    @staticmethod
    def _format(interface, name, spec, tx, rx, wall) -> tuple:
        allowed = ",".join(filter(None, [spec[1], *spec[2]]))
        compat = _labels(zip(_COMPAT_LABELS, (interface, spec[0], allowed, name)))
        own = _labels((("peer", name),))
        return (f"wireguard_sent_bytes_total{compat} {tx}\n",
                f"wireguard_received_bytes_total{compat} {rx}\n",
                f"wireguard_latest_handshake_seconds{compat} {int(wall or 0)}\n",
                f"pytun_peer_sent_bytes_total{own} {tx}\n",
                f"pytun_peer_received_bytes_total{own} {rx}\n",
                f"pytun_peer_last_handshake_timestamp_seconds{own} {_number(wall)}\n"
                if wall else "")


class HubCollector:
    """The hub-wide families (peers by state, sessions, handshakes, drops, load, I/O errors),
    built at the moment of the scrape; `snapshot` is the peer table copied for this scrape."""

    def __init__(self, hub, clock=time.monotonic):
        self.hub = hub
        self.clock = clock
        self.snapshot: list = []

    def describe(self):
        return []  # families depend on the live hub; registering must not scrape it

    def collect(self):
        hub = self.hub
        device = hub.device
        now = self.clock()
        records = list(getattr(hub, "records", None) or ())
        drops = dict(device.drops)
        handshakes = {"completed": device.handshakes_completed,
                      "gave_up": device.handshakes_gave_up}

        connected = idle = never = sessions = 0
        for _, (_, p) in self.snapshot:
            mono = p.last_handshake
            if mono is not None and now - mono < REJECT_AFTER_TIME:
                connected += 1
                current = p.current
                if current is not None and now - current.created < REJECT_AFTER_TIME:
                    sessions += 1
            elif p.last_handshake_wall:
                idle += 1
            else:
                never += 1
        disabled = sum(1 for r in records if r.disabled)
        by_state = GaugeMetricFamily("pytun_peers", FAMILIES["pytun_peers"], labels=["state"])
        for state, n in (("connected", connected), ("idle", idle), ("never", never),
                         ("disabled", disabled)):
            by_state.add_metric([state], n)
        yield by_state

        hs = CounterMetricFamily("pytun_handshakes", FAMILIES["pytun_handshakes_total"],
                                 labels=["result"])
        results = dict(handshakes)
        for reason, result in HANDSHAKE_RESULTS.items():
            if drops.get(reason):
                results[result] = results.get(result, 0) + drops[reason]
        for result in ("completed", "gave_up", *sorted(set(HANDSHAKE_RESULTS.values()))):
            results.setdefault(result, 0)
        for result, n in sorted(results.items()):
            hs.add_metric([result], n)

        dropped = CounterMetricFamily("pytun_drops", FAMILIES["pytun_drops_total"],
                                      labels=["reason"])
        io = CounterMetricFamily("pytun_io_errors", FAMILIES["pytun_io_errors_total"],
                                 labels=["kind"])
        for reason, n in sorted(drops.items()):
            if reason not in IO_ERRORS:
                dropped.add_metric([reason], n)
        for kind in IO_ERRORS:
            io.add_metric([kind], drops.get(kind, 0))

        yield GaugeMetricFamily("pytun_sessions", FAMILIES["pytun_sessions"], value=sessions)
        yield hs
        yield dropped
        yield GaugeMetricFamily("pytun_under_load", FAMILIES["pytun_under_load"],
                                value=1 if device.under_load(now) else 0)
        yield io
        driver = getattr(hub, "driver", None)
        offload = dict(getattr(driver, "offload", None) or getattr(device, "offload", {}))
        tun = CounterMetricFamily("pytun_tun_offload", FAMILIES["pytun_tun_offload_total"],
                                  labels=["what"])
        for what in ("gso_reads", "gso_segments"):
            tun.add_metric([what], offload.get(what, 0))
        yield tun
        workers = getattr(device, "worker", (0, 1))[1]
        if workers > 1:
            yield GaugeMetricFamily("pytun_workers", FAMILIES["pytun_workers"], value=workers)
            handed = CounterMetricFamily("pytun_handoffs", FAMILIES["pytun_handoffs_total"],
                                         labels=["what"])
            for what in ("packets_out", "packets_in", "initiations_out", "initiations_in"):
                handed.add_metric([what], device.handoffs.get(what, 0))
            yield handed
        if getattr(hub.settings, "ha", None):
            yield GaugeMetricFamily("pytun_ha_active", FAMILIES["pytun_ha_active"],
                                    value=1 if getattr(hub, "role", "active") == "active" else 0)
        build = InfoMetricFamily("pytun_build", FAMILIES["pytun_build_info"],
                                 labels=["interface"])
        build.add_metric([hub.settings.interface], {"version": __version__})
        yield build


class Exposition:
    """The whole scrape: the per-peer families rendered by PeerFamilies, then the hub-wide
    ones and the process's own metrics (CPU, memory, file descriptors) by prometheus_client."""

    def __init__(self, hub, clock=time.monotonic):
        self.hub = hub
        self.collector = HubCollector(hub, clock)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.peers = PeerFamilies()
        self._lock = threading.Lock()  # one scrape at a time: they share the caches

    def render(self) -> bytes:
        hub = self.hub
        with self._lock:
            refresh = getattr(hub, "refresh", None)  # a hub with workers asks them first
            if refresh is not None:
                refresh()
            snapshot = list(hub.peers.items())  # one atomic copy; the trio side may change it
            self.collector.snapshot = snapshot
            text = self.peers.render(hub.settings.interface, snapshot,
                                     list(getattr(hub, "records", None) or ()))
            rest = generate_latest(self.registry)
            self.collector.snapshot = []
        return text.encode() + rest


# ---------------------------------------------------------------------------------- server


def make_app(exposition: Exposition):
    """A WSGI app: GET /metrics (or /) answers the scrape, gzipped when the scraper asks."""
    def app(environ, start_response):
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"see /metrics\n"]
        body = exposition.render()
        headers = [("Content-Type", CONTENT_TYPE_LATEST)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body, compresslevel=1)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response("200 OK", headers)
        return [body]
    return app



def _with_token(app, token: str | None):
    if token is None:
        return app
    expected = f"Bearer {token}".encode()

    def checked(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="pytun"')])
            return [b"a bearer token is required\n"]
        return app(environ, start_response)
    return checked


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per scrape in the journal
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """The HTTP endpoint (/metrics and /), in threads of its own."""

    def __init__(self, hub, listen: str, token_file: str | None = None):
        self.host, self.port = parse_listen(listen)
        token = read_token(token_file) if token_file else None
        self.app = _with_token(make_app(Exposition(hub)), token)
        self.token = token is not None
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        cls = _Server6 if ":" in self.host else _Server
        try:
            self._server = make_server(self.host, self.port, self.app, server_class=cls,
                                       handler_class=_Quiet)
        except OSError as exc:
            raise MetricsError(f"metrics on {self.address}: {exc.strerror}") from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="pytun-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
