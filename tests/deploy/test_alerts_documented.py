"""Every alert of deploy/prometheus/alerts.yml is documented, and nothing else: in
docs/operating.md's list of the rules and in deploy/README.md's table of what each
means and what to do (issue 22: three alerts were missing from both)."""

from __future__ import annotations

import re

import pytest
import yaml

from .conftest import DEPLOY, PROMETHEUS_DIR, REPO

pytestmark = pytest.mark.deploy

NAME = re.compile(r"`(ProxyMQ[A-Za-z]+)`")


def alerts() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_operating_lists_every_alert_in_the_rules_order():
    text = (REPO / "docs" / "operating.md").read_text()
    paragraph = text[text.index("the alert rules with promtool unit tests:") :]
    listed = NAME.findall(paragraph[: paragraph.index("What each means")])
    assert listed == alerts()


def test_the_deploy_readme_table_has_a_row_for_every_alert_in_the_rules_order():
    text = (DEPLOY / "README.md").read_text()
    table = text[text.index("## Alerts (`deploy/prometheus/alerts.yml`)") :]
    table = table[: table.index("\n## ")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [NAME.match(row[2:]).group(1) for row in rows] == alerts()
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 3 and all(cells), row  # alert, fires when, what to do
