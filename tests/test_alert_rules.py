"""The shipped Prometheus alert rules and Grafana dashboard: promtool checks the rules and runs
their unit tests (each alert fires on a series made for it); the dashboard is well formed."""

from __future__ import annotations

import json
import pathlib
import subprocess

from .conftest import require_tools

DEPLOY = pathlib.Path(__file__).parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "pytun-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "pytun-alerts.test.yml"
ALERTS = {"PytunHubDown", "PytunPeerHandshakeStale", "PytunDropsRising", "PytunUnderLoad",
          "PytunPeerExpiringSoon"}


def test_promtool_checks_the_rules():
    require_tools("promtool")
    done = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_make_every_alert_fire():
    require_tools("promtool")
    done = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    fired = set()
    text = RULE_TESTS.read_text()
    for alert in ALERTS:
        if f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in text:
            fired.add(alert)
    assert fired == ALERTS  # every alert has a case where it must fire


def test_a_broken_expectation_fails_promtool(tmp_path):
    """The unit tests can fail: the same file with one expected label changed does."""
    require_tools("promtool")
    (tmp_path / RULES.name).write_text(RULES.read_text())
    broken = RULE_TESTS.read_text().replace("peer: alice}", "peer: mallory}", 1)
    (tmp_path / RULE_TESTS.name).write_text(broken)
    done = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "mallory" in done.stdout + done.stderr


def test_dashboard_is_grafana_json_on_pytuns_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "pytun-dashboard.json").read_text())
    assert dashboard["uid"] == "pytun-hub" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "pytun" in target["expr"] or "up{" in target["expr"]
