"""Operations end to end: the hub serves metrics to Debian's real Prometheus, tells a notify
socket (standing in for systemd) when it is ready and that its data plane is alive, and logs
sessions as JSON lines.

    +------------------------------- hub namespace -------------------------------+
    | pytun-server --log-format json       metrics 127.0.0.1:9586 (bearer token)  |
    |   NOTIFY_SOCKET=<tmp>/notify.sock    prometheus 127.0.0.1:9090, 1 s scrapes  |
    +-----------------------------------------------------------------------------+
       | veth 198.51.100.17/28
    alice (pytun-client)

Prometheus keeps its storage in the test's temporary directory and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

from .conftest import require_tools
from .hubnet import HUB_INNER, PY, Hub, OurLaptop
from .netns import wait_until
from .test_hub_netns import tcp_transfer

pytestmark = pytest.mark.netns

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "deploy")
METRICS = "127.0.0.1:9586"
PROMETHEUS = "127.0.0.1:9090"
WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
TRANSFER = 2 << 20

# pytun-server, plus a way to wedge its data-plane thread alone: on SIGUSR1 another thread
# takes the driver's lock and never gives it back, as a deadlock would.
WEDGEABLE = r"""
import signal, sys, threading
from pytun.common import driver
made = []
init = driver.Driver.__init__
def record(self, *a, **k):
    init(self, *a, **k)
    made.append(self)
driver.Driver.__init__ = record
signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(
    target=made[0].lock.acquire, daemon=True).start())
from pytun.server.main import main
sys.exit(main(sys.argv[1:]))
"""

GET = r"""
import json, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    with urllib.request.urlopen(req, timeout=10) as r:
        print(json.dumps([r.status, r.read().decode()]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode()]))
except OSError as e:
    print(json.dumps([0, str(e)]))
"""


class NotifySocket:
    """What systemd would receive: (monotonic time, message) for every datagram."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, m in list(self.messages) for line in m.split("\n")
                if line.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


class OpsHub(Hub):
    def start_notified(self, notify_path: str) -> None:
        env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        log = open(self.log_path, "a")
        self.proc = self.ns.popen([PY, "-c", WEDGEABLE, "--state-dir", self.state_dir,
                                   "--log-format", "json"], stdout=log,
                                  stderr=subprocess.STDOUT, env=env)
        log.close()
        wait_until(self.running, timeout=15, what=f"the hub to answer (log: {self.log_path})")

    def json_lines(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out


def _prometheus_config(tmp, token_file: str) -> str:
    path = tmp / "prometheus.yml"
    path.write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: [{os.path.abspath(os.path.join(DEPLOY, "prometheus", "pytun-alerts.yml"))}]
scrape_configs:
  - job_name: pytun
    scrape_interval: 1s
    authorization: {{type: Bearer, credentials_file: {token_file}}}
    static_configs: [{{targets: ["{METRICS}"]}}]
""")
    return str(path)


@pytest.fixture(scope="module")
def ops(tmp_path_factory, netns_ok):
    require_tools("prometheus", "wireguard-go", "wg", "ping", "iptables-legacy-save", "ss")
    from .netns import Topology
    tmp = tmp_path_factory.mktemp("opsnet")
    token = tmp / "metrics.token"
    token.write_text("scrape-me-7f3a\n")
    os.chmod(token, 0o600)
    notify = NotifySocket(str(tmp / "notify.sock"))
    try:
        with Topology() as topo:
            hub = OpsHub(topo, tmp, init_args=("--metrics", METRICS,
                                               "--metrics-token-file", str(token)))
            hub.admin("access", "add", "everyone", "hub", "tcp/5001")
            hub.admin("add-peer", "idle-ivan")  # registered, never connects
            alice_conf = hub.add_peer("alice")
            hub.start_notified(notify.path)
            ns, _ = hub.connect_laptop()
            alice = OurLaptop(ns, tmp, alice_conf, "alice")
            prom = hub.ns.popen(["prometheus", f"--config.file={_prometheus_config(tmp, token)}",
                                 f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                                 f"--web.listen-address={PROMETHEUS}", "--log.level=warn"],
                                stdout=open(tmp / "prometheus.log", "a"),
                                stderr=subprocess.STDOUT)
            wait_until(lambda: _get(hub, f"http://{PROMETHEUS}/-/ready")[0] == 200, timeout=30,
                       what=f"prometheus to be ready ({tmp / 'prometheus.log'})")
            yield hub, ns, alice, notify, prom, "scrape-me-7f3a"
    finally:
        notify.close()


def _get(hub, url: str, token: str | None = None) -> tuple[int, str]:
    done = hub.ns.run([PY, "-c", GET, url, *([token] if token else [])])
    status, body = json.loads(done.stdout)
    return status, body


def query(hub, expr: str) -> list:
    status, body = _get(hub, f"http://{PROMETHEUS}/api/v1/query?"
                        + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body) if body.startswith("{") else {"status": "http", "error": body}
    assert status == 200 and answer["status"] == "success", (expr, status, body)
    return answer["data"]["result"]


def test_ready_only_once_tun_firewall_and_udp_are_up(ops):
    hub, _, _, notify, _, _ = ops
    ready = notify.lines("READY=1")
    assert len(ready) == 1
    # The hub sends READY=1 after these are up; it answered its control socket since, so
    # they are all there now and were there at READY.
    assert hub.ifname in hub.ns.run("ip", "-o", "link", "show").stdout
    assert ":51820 " in hub.ns.run("ss", "-Hulnp").stdout
    assert f"PYTUN-{hub.ifname}-FWD" in hub.ns.run("iptables-legacy-save").stdout
    status = notify.lines("STATUS=")
    assert status and status[0][1] == "STATUS=2 peers, 0 sessions"
    assert status[0][0] == ready[0][0]  # in the same datagram as READY=1


def test_prometheus_reads_the_laptops_byte_counters_after_a_transfer(ops):
    hub, ns, _, notify, _, _ = ops
    assert wait_until(lambda: subprocess.run(
        ns.exec_argv(["ping", "-c1", "-W1", HUB_INNER]), capture_output=True).returncode == 0,
        timeout=15, what="alice to ping the hub")
    tcp_transfer(ns, hub.ns, HUB_INNER, TRANSFER)
    shown = hub.show()["alice"]["rx_bytes"]
    assert shown > TRANSFER

    def scraped(expr):
        result = query(hub, expr)
        return result and float(result[0]["value"][1]) >= shown and result

    compat = wait_until(lambda: scraped('wireguard_received_bytes_total{friendly_name="alice"}'),
                        timeout=20, what="prometheus to scrape alice's bytes")
    labels = compat[0]["metric"]
    assert labels["interface"] == hub.ifname and labels["allowed_ips"] == "10.77.0.3/32"
    assert labels["public_key"] == hub.show()["alice"]["public_key"]
    own = wait_until(lambda: scraped('pytun_peer_received_bytes_total{peer="alice"}'),
                     timeout=20, what="pytun's own byte counter")
    assert own[0]["metric"]["job"] == "pytun"
    handshake = query(hub, 'wireguard_latest_handshake_seconds{friendly_name="alice"}')
    assert abs(float(handshake[0]["value"][1]) - time.time()) < 300  # a Unix time
    assert query(hub, 'pytun_peer_last_handshake_timestamp_seconds{peer="idle-ivan"}') == []
    states = {r["metric"]["state"]: float(r["value"][1]) for r in query(hub, "pytun_peers")}
    assert states["never"] == 1 and states["connected"] == 1
    assert wait_until(lambda: notify.lines("STATUS=2 peers, 1 session"), timeout=10,
                      what="STATUS= with alice's session")


def test_every_dashboard_query_runs_against_prometheus(ops):
    hub = ops[0]
    with open(os.path.join(DEPLOY, "grafana", "pytun-dashboard.json")) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 12
    wait_until(lambda: query(hub, "count_over_time(pytun_sessions[1m]) >= 3"), timeout=20,
               what="three scrapes (a rate needs two)")
    empty = []
    for expr in exprs:
        concrete = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
        assert "$" not in concrete, concrete
        if not query(hub, concrete):
            empty.append(concrete)
    # Every panel but the error rates has data on a hub that served a laptop.
    assert all("io_errors" in e or "drops" in e for e in empty), empty
    variable = dashboard["templating"]["list"][1]["definition"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()
    status, body = _get(hub, f"http://{PROMETHEUS}/api/v1/label/{label}/values?"
                        + urllib.parse.urlencode({"match[]": metric}))
    assert status == 200 and json.loads(body)["data"] == [METRICS]


def test_the_shipped_alert_rules_load_and_evaluate(ops):
    hub = ops[0]

    def rules():
        status, body = _get(hub, f"http://{PROMETHEUS}/api/v1/rules")
        found = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        return len(found) == 5 and all(r.get("health") == "ok" for r in found) and found
    found = wait_until(rules, timeout=20, what="the alert rules to evaluate")
    assert {r["name"] for r in found} >= {"PytunHubDown", "PytunPeerHandshakeStale"}


def test_metrics_need_the_token_and_are_only_on_the_address_given(ops):
    hub, ns, _, _, _, token = ops
    assert _get(hub, f"http://{METRICS}/metrics")[0] == 401
    status, body = _get(hub, f"http://{METRICS}/metrics", token)
    assert status == 200 and "process_resident_memory_bytes" in body
    for address in ("198.51.100.17", HUB_INNER):  # the hub's underlay and inner addresses
        done = ns.run([PY, "-c", GET, f"http://{address}:9586/metrics", token])
        assert json.loads(done.stdout)[0] == 0, done.stdout  # nothing listens there


def test_session_lines_are_json_and_disabling_ends_the_session(ops):
    hub, _, _, _, _, _ = ops
    starts = [r for r in hub.json_lines() if r.get("event") == "session_start"]
    assert [r["peer"] for r in starts] == ["alice"]
    assert starts[0]["endpoint"].startswith("198.51.100.") and starts[0]["level"] == "info"
    hub.admin("disable-peer", "alice")
    ended = wait_until(lambda: [r for r in hub.json_lines() if r.get("event") == "session_end"],
                       timeout=10, what="the session_end line")
    assert ended[0]["peer"] == "alice" and ended[0]["reason"] == "disabled"
    assert ended[0]["rx_bytes"] > TRANSFER and ended[0]["duration_seconds"] > 0
    for line in hub.log().splitlines():  # no key in any line
        assert not re.search(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=", line), line


def test_a_wedged_data_thread_misses_its_watchdog(ops):
    hub, _, _, notify, _, _ = ops
    interval = WATCHDOG_USEC / 2e6
    wait_until(lambda: len(notify.lines("WATCHDOG=1")) >= 4, timeout=10, what="pings")
    beats = [t for t, _ in notify.lines("WATCHDOG=1")]
    assert max(b - a for a, b in zip(beats, beats[1:])) < interval + 0.4
    hub.proc.send_signal(signal.SIGUSR1)
    wedged = time.monotonic()  # in effect within one loop turn: at most `interval` later
    deadline = wedged + 3 * WATCHDOG_USEC / 1e6
    wait_until(lambda: time.monotonic() >= deadline, timeout=10, what="three watchdog periods")
    late = [t for t, _ in notify.lines("WATCHDOG=1") if t > wedged + interval + 0.2]
    assert late == []  # systemd would have killed and restarted it
    assert hub.proc.poll() is None  # alive, only its data plane is stuck
    hub.proc.kill()  # its shutdown would wait for the wedged thread
    hub.proc.wait(10)
