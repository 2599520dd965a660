"""The short fault campaign: `drawbridge-chaos` with 30 requests and 10 worker kills, as CI runs it. The
long one (1,000 requests, 100 kills) is run by hand; see the README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ADMIN_URL, _postgres_or_skip


def test_a_short_fault_campaign_breaks_no_promise(tmp_path: Path) -> None:
    _postgres_or_skip()
    report_path = tmp_path / "report.json"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.chaos",
            "--requests",
            "30",
            "--kills",
            "10",
            "--workers",
            "2",
            "--seed",
            "6",
            "--database-url",
            ADMIN_URL,
            "--json",
            str(report_path),
            "--logs",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report_path.exists(), finished.stderr[-5000:]
    report = json.loads(report_path.read_text())
    assert report["invariants"] == {
        "rules_left_at_heroku": 0,
        "requests_not_final": 0,
        "audit_gaps": 0,
        "audit_chain_broken": 0,
        "rules_created_twice": 0,
        "foreign_rule_deletes": 0,
        "foreign_rules_missing": 0,
        "rules_taken_for_missing": 0,
    }, (report["examples"], finished.stderr[-3000:])
    assert report["settled"] and report["ok"]
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert report["kills"] == {"sigkill": 10, "restarts": 10}
    assert sum(report["faults_injected"].values()) > 0  # the campaign really was hostile
    assert report["requests"]["filed"] == 30
    assert report["expiry_lag_s"]["count"] > 0 and report["expiry_lag_s"]["max"] is not None
