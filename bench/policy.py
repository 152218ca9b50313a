"""What access rules cost: applying a change, and the data path with 50 rules and 1,000 peers.

    sudo python3 bench/policy.py [--peers 1000] [--groups 20] [--rules 50] [--seconds 8] [--json]

On bench/rig.py's rig (a pytun-server hub and a wireguard-go laptop in namespaces) it measures,
in one run:

    apply       the time to plan and carry out a change with `peers` registry rows in `groups`
                groups and `rules` access rules: `firewall.plan` in-process, `nat.apply` in a
                process of its own as the hub runs it, and `pytun-admin access add` and
                `set-groups` end to end (the command returns once the hub's kernel holds the
                change; pytun-admin's own start-up is about 0.2 s of it);
    data path   TCP laptop->hub throughput (saturated) and the hub's CPU seconds per GB at a
                fixed 100 Mbit/s, four times: with the default rules only, with the extra
                rules (placed before the rule that lets iperf3 through, so every packet the
                laptop sends passes all of them), without them again, and with them again.

The hub's own CPU is the pytun-server process; the rules run in the kernel, in softirq context,
which the process's counters mostly do not see, so the throughput columns are the ones that
show a kernel cost. Root only; namespaces and processes are removed also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sqlite3
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.rig import PY, Leg  # noqa: E402

GROUP_COUNT = 20


def fill(db_path: str, peers: int, groups: int, rules: int, seed: int = 7) -> list[str]:
    """`peers` registry rows spread over `groups` groups, and `rules` access rules, inserted
    straight into the registry in one commit (pytun-admin would take 0.2 s a command)."""
    from pytun.common import keys

    rnd = random.Random(seed)
    names = [f"g{i:02d}" for i in range(groups)]
    now = int(time.time())
    db = sqlite3.connect(db_path, isolation_level=None, timeout=10.0)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR IGNORE INTO groups (name, created) VALUES (?, ?)",
                       [(n, now) for n in names])
        rows = []
        for i in range(peers):
            raw = keys.public_from_private(keys.generate_private())
            address = f"10.78.{i // 250}.{i % 250 + 2}/32"
            rows.append((f"pb-{i}", keys.encode_key(raw), address, now,
                         json.dumps(sorted(rnd.sample(names, 2)))))
        db.executemany("INSERT INTO peers (name, public_key, address, created, groups) "
                       "VALUES (?, ?, ?, ?, ?)", rows)
        for i in range(rules):
            proto = rnd.choice(["tcp", "udp", "any"])
            first = rnd.randrange(1000, 60000) if proto != "any" else None
            db.execute("INSERT INTO rules (source, destination, protocol, port_first,"
                       " port_last, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (rnd.choice(names), f"10.{100 + i % 100}.{i}.0/24", proto, first, first,
                        "bench", now))
        db.execute("COMMIT")
    finally:
        db.close()
    return names


def rule_ids(leg, comment: str) -> list[int]:
    rows = json.loads(leg.hub.admin("access", "list", "--json").stdout)
    return [r["id"] for r in rows if r["comment"] == comment]


def iperf_last(leg) -> None:
    """Move iperf3's rules behind all others, so the laptop's packets pass every rule first;
    pytun-admin's sync=1 answers once the hub's kernel holds the change."""
    for rule_id in rule_ids(leg, "iperf3"):
        leg.hub.admin("access", "remove", rule_id)
    for service in ("tcp/5201", "udp/5201"):
        leg.hub.admin("access", "add", "everyone", "hub", service, "--comment", "iperf3")


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def measure(args, tmp: pathlib.Path) -> dict:
    out: dict = {"peers": args.peers, "groups": args.groups, "rules": args.rules}
    with Leg("p", "pytun", "wg-go", tmp) as leg:
        hub = leg.hub
        db = os.path.join(hub.state_dir, "registry.db")

        def data_path(label: str) -> None:
            r = leg.iperf(args.seconds)
            out[f"{label}_tcp_mbps"] = r["bits_per_second"] / 1e6
            r, cpu = leg.iperf_with_cpu(args.seconds, rate="100M")
            out[f"{label}_cpu_s_per_gb"] = cpu / (r["bytes"] / 1e9)

        data_path("none1")
        groups = fill(db, args.peers, args.groups, args.rules)
        iperf_last(leg)
        # In-process: plan; in a process of its own: apply (what the running hub does).
        script = f"""
import json, time, sys
sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent.parent)!r})
from pytun.server import firewall, nat, policy, state
from pytun.server.registry import SqliteRegistry
settings = state.load_settings({hub.state_dir!r})
reg = SqliteRegistry({db!r}, create=False)
peers, rules = reg.list(), reg.rules()
view = policy.HubView.from_settings(settings)
t0 = time.perf_counter()
plan = firewall.plan(view, peers, rules, time.time(), 4)
t1 = time.perf_counter()
nat.apply_apart(plan.to_dict())
t2 = time.perf_counter()
print(json.dumps({{"plan_s": t1 - t0, "apply_s": t2 - t1,
                  "sets": len(plan.sets), "entries": sum(map(len, plan.sets.values())),
                  "kernel_rules": sum(map(len, plan.chains.values()))}}))
"""
        done = leg.hub_ns.run([PY, "-c", script], timeout=120)
        out.update(json.loads(done.stdout))
        adds, moves = [], []
        for i in range(args.repeat):
            adds.append(timed(lambda: hub.admin("access", "add", groups[i % len(groups)],
                                                f"10.250.{i}.0/24", "tcp/443", "--comment",
                                                "timed")))
            moves.append(timed(lambda: hub.admin("set-groups", f"pb-{i}", groups[-1 - i])))
        for rule_id in rule_ids(leg, "timed"):
            hub.admin("access", "remove", rule_id)
        out["access_add_s"] = statistics.median(adds)
        out["set_groups_s"] = statistics.median(moves)
        log = hub.log_path.read_text()
        if "firewall change failed" in log or "Traceback" in log:
            raise RuntimeError(f"the hub reported a failure:\n{log[-2000:]}")

        data_path("rules1")
        for rule_id in rule_ids(leg, "bench"):
            hub.admin("access", "remove", rule_id)
        data_path("none2")
        fill(db, 0, args.groups, args.rules)
        iperf_last(leg)  # its sync=1 also applies the rules just written
        data_path("rules2")
    return out


ROWS = [
    ("plan_s", "firewall.plan, {peers} peers {groups} groups {rules} rules, ms", 1e3),
    ("apply_s", "nat.apply in its own process, ms", 1e3),
    ("access_add_s", "pytun-admin access add, applied, ms", 1e3),
    ("set_groups_s", "pytun-admin set-groups, applied, ms", 1e3),
    ("kernel_rules", "kernel rules in the plan", 1),
    ("sets", "ipsets in the plan", 1),
    ("entries", "ipset entries", 1),
    ("none1_tcp_mbps", "TCP laptop->hub Mbit/s, default rules", 1),
    ("rules1_tcp_mbps", "TCP laptop->hub Mbit/s, +{rules} rules", 1),
    ("none2_tcp_mbps", "TCP laptop->hub Mbit/s, default rules again", 1),
    ("rules2_tcp_mbps", "TCP laptop->hub Mbit/s, +{rules} rules again", 1),
    ("none1_cpu_s_per_gb", "hub CPU s/GB at 100M, default rules", 1),
    ("rules1_cpu_s_per_gb", "hub CPU s/GB at 100M, +{rules} rules", 1),
    ("none2_cpu_s_per_gb", "hub CPU s/GB at 100M, default rules again", 1),
    ("rules2_cpu_s_per_gb", "hub CPU s/GB at 100M, +{rules} rules again", 1),
]


def report(r: dict) -> str:
    lines = []
    for key, label, scale in ROWS:
        value = r.get(key)
        text = "-" if value is None else (f"{value * scale:.1f}" if scale != 1 or
                                          isinstance(value, float) else str(value))
        lines.append(f"{label.format(**r):<58} {text:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/policy.py", description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--groups", type=int, default=GROUP_COUNT)
    p.add_argument("--rules", type=int, default=50)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per iperf3 run")
    p.add_argument("--repeat", type=int, default=5, help="timed admin commands of each kind")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/policy.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pytun-bench-policy-") as tmp:
        try:
            r = measure(args, pathlib.Path(tmp))
        except Exception as exc:  # noqa: BLE001 - one line, then exit 1
            print(f"bench/policy.py: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
            return 1
    print(json.dumps(r, indent=2) if args.json else report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
