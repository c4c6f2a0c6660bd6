"""The alert rules, checked and unit-tested by the real promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from obs_support import REPO, RULES, RULES_TEST, alert_rules

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool is missing (Debian package `prometheus`)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_fixture_makes_each_alert_fire_and_stay_silent() -> None:
    fixture = yaml.safe_load(RULES_TEST.read_text())
    fired: set[str] = set()
    silent: set[str] = set()
    for test in fixture["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - silent == set(), "alerts never shown silent"
    assert fired | silent <= names, "the fixture tests alerts that do not exist"


def test_promtool_test_can_fail(tmp_path: Path) -> None:
    """Guard: the fixture constrains the rules (a loosened threshold or a lost `for` breaks it)."""
    mutants = {
        "kv threshold": ("parallama_kv_cache_usage_ratio) > 0.9", "parallama_kv_cache_usage_ratio) > 0.5"),
        "no for on runtime down": ("for: 2m", "for: 0m"),
        "drift margin": ("> 1.10 *", "> 1.30 *"),
        "any limit, not capacity": (
            'limited{reason="capacity"}) == 1',
            'limited{reason=~"capacity|max"}) == 1',
        ),
    }
    text = RULES.read_text()
    for name, (old, new) in mutants.items():
        assert old in text, name
        (tmp_path / "rules.yaml").write_text(text.replace(old, new))
        fixture: dict[str, Any] = yaml.safe_load(RULES_TEST.read_text())
        fixture["rule_files"] = [str(tmp_path / "rules.yaml")]
        (tmp_path / "test.yaml").write_text(yaml.safe_dump(fixture, sort_keys=False))
        result = promtool("test", "rules", str(tmp_path / "test.yaml"))
        assert result.returncode != 0, f"mutant '{name}' survived the fixture"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: str(rule["alert"]))
def test_alert_has_severity_text_and_docs(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Parallama")
    assert rule.get("for"), "every alert waits before firing"
    assert rule["labels"]["severity"] in {"warning", "critical"}
    for key in ("summary", "description", "runbook"):
        assert len(str(rule["annotations"].get(key, ""))) > 20, key
    anchor = f"docs/observability.md#{rule['alert'].lower()}"
    assert anchor in rule["annotations"]["runbook"]
    docs = (REPO / "docs" / "observability.md").read_text()
    assert f"### {rule['alert']}" in docs, "docs/observability.md explains every alert"
