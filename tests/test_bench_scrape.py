"""bench/scrape.py with small numbers prints every figure and leaves nothing behind."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from .conftest import require_tools
from .test_bench import run_bench


@pytest.mark.netns
def test_scrape_bench_small_prints_every_figure_and_leaves_nothing(netns_ok):
    require_tools("wireguard-go", "wg", "iperf3", "ping", "ss")
    proc = run_bench(["bench/scrape.py", "--rows", "200", "--sessions", "20", "--scrapes", "3",
                      "--seconds", "1", "--rounds", "1", "--json"], timeout=120)
    assert proc.returncode == 0, f"{proc.out}\n{proc.err[-3000:]}"
    r = json.loads(proc.out)
    assert r["rows"] == 200 and r["scrape_sessions"] >= 20 and r["scrapes"] == 3
    # 200 rows and the iperf3 laptop: 6 per-peer series each (5 for a peer never seen).
    assert r["scrape_series"] > 5 * 201
    assert 0 < r["scrape_median_ms"] <= r["scrape_max_ms"] < 30_000
    assert len(r["tcp_without_mbps"]) == len(r["tcp_with_mbps"]) == 1
    assert min(r["tcp_without_mbps"] + r["tcp_with_mbps"]) > 1
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    mine = re.compile(rf"^[a-z]+{proc.pid}-[0-9a-f]+\b")
    assert not [n for n in left.splitlines() if mine.match(n)], left
