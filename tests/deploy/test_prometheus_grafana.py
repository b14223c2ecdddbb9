"""Prometheus config, alert rules and their unit tests; the Grafana dashboard's queries."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from .conftest import COMPOSE, DASHBOARD, DEPLOY, PROMETHEUS_DIR, describe, run
from .promql import metric_names, substitute_grafana_variables, unknown_metrics

pytestmark = pytest.mark.deploy

EXPECTED_ALERTS = {
    "ProxyMQBacklogGrowing",
    "ProxyMQQueueWithoutConsumers",
    "ProxyMQHighErrorRatio",
    "ProxyMQHighTimeoutRatio",
    "ProxyMQDeadLetters",
    "ProxyMQBreakerOpen",
    "ProxyMQServicePaused",
}


# ---------------------------------------------------------------- prometheus ---
def test_promtool_check_config(promtool):
    proc = run([promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")])
    assert proc.returncode == 0, describe(proc)


def test_prometheus_scrapes_every_component():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = set()
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            targets.update(sc["targets"])
        for sd in job.get("dns_sd_configs", []):
            targets.update(f"{n}:{sd['port']}" for n in sd["names"])
    assert {
        "gateway:8000",
        "worker:8001",
        "words-worker:8001",
        "rabbitmq:15692",
        "celery-exporter:9808",
        "localhost:9090",
    } <= targets


def test_promtool_check_rules(promtool):
    proc = run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")])
    assert proc.returncode == 0, describe(proc)


def test_promtool_test_rules(promtool):
    proc = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR)
    assert proc.returncode == 0, describe(proc)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_alerts_present_and_unit_tested():
    names = {rule["alert"] for rule in alert_rules()}
    assert names >= EXPECTED_ALERTS
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    firing, quiet = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert names <= firing, f"alerts never tested firing: {names - firing}"
    assert names <= quiet, f"alerts never tested silent: {names - quiet}"
    for rule in alert_rules():
        assert rule["labels"].get("severity") in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"].get("summary") and rule["annotations"].get("description")


def test_alerts_use_known_metrics():
    """Other exporters' names; ProxyMQ's are held to what the processes export by
    tests/integration/test_exported_metrics.py."""
    for rule in alert_rules():
        unknown = unknown_metrics(rule["expr"])
        assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"


def test_promtool_catches_broken_rules(promtool, tmp_path):
    """A wrong expectation makes `promtool test rules` fail, a bad expr `check rules`."""
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    (tmp_path / "alerts_test.yml").write_text(
        tests.replace("queue: url_fetcher_requests\n", "queue: another_requests\n", 1)
    )
    assert run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path).returncode != 0
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text().replace("> 0.05", "> > 0.05")
    (tmp_path / "alerts.yml").write_text(rules)
    assert run([promtool, "check", "rules", str(tmp_path / "alerts.yml")]).returncode != 0


# ------------------------------------------------------------------- grafana ---
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    return queries


def rules_file_for(queries: list[tuple[str, str]], path):
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute_grafana_variables(expr)}
        for i, (_, expr) in enumerate(queries)
    ]
    for rule, (where, _) in zip(rules, queries, strict=True):
        assert "$" not in rule["expr"], f"unsubstituted Grafana variable in {where}: {rule['expr']}"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))


def test_dashboard_structure():
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["service"]["type"] == "query"
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert variables["DS_PROMETHEUS"]["current"]["value"] in {ds["uid"] for ds in provisioned}
    ids = [p["id"] for p in all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in all_panels(dash["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel[
            "title"
        ]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    # the dashboards provider reads the folder compose mounts
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/proxymq.yml").read_text())[
        "providers"
    ][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert any(v.endswith(":" + provider["options"]["path"] + ":ro") for v in grafana["volumes"])


def test_dashboard_covers_the_required_views():
    exprs = "\n".join(expr for _, expr in dashboard_queries())
    for needle in (
        "proxymq_gateway_requests_total",
        'status=~"5.."',
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "proxymq_gateway_request_duration_seconds_bucket",
        "proxymq_worker_queue_wait_seconds_bucket",
        "proxymq_worker_batch_wait_seconds_bucket",
        "proxymq_worker_downstream_duration_seconds_bucket",
        "proxymq_worker_batch_size_bucket",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_consumers",
        "proxymq_gateway_inflight",
        "proxymq_gateway_timeouts_total",
        "proxymq_gateway_shed_total",
        'reason=~"service-unavailable|deadline-unreachable"',
        "proxymq_worker_expired_total",
        "proxymq_worker_dead_lettered_total",
        "proxymq_worker_dead_letters_purged_total",
        "proxymq_worker_concurrency_limit",
        "proxymq_worker_flow_wait_seconds_bucket",
    ):
        assert needle in exprs, needle
    for where, expr in dashboard_queries():
        if expr.startswith("sum(celery_worker_up"):
            continue
        assert "$service" in expr, f"{where} ignores the service variable"


def test_dashboard_queries_parse(promtool, tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = tmp_path / "dashboard_rules.yml"
    rules_file_for(queries, rules)
    proc = run([promtool, "check", "rules", str(rules)])
    assert proc.returncode == 0, describe(proc)


def test_dashboard_uses_known_metrics():
    """As for the alerts: ProxyMQ's own names are checked against the running processes."""
    for where, expr in dashboard_queries():
        expr = substitute_grafana_variables(expr)
        assert metric_names(expr), f"{where}: no metric in {expr}"
        unknown = unknown_metrics(expr)
        assert not unknown, f"{where} uses unknown metrics {unknown}"


def test_query_checks_catch_mistakes(promtool, tmp_path):
    bad = 'sum(rabbitmq_queue_mesages_ready{queue=~"${service:regex}_requests"})'
    assert unknown_metrics(substitute_grafana_variables(bad)) == {"rabbitmq_queue_mesages_ready"}
    rules = tmp_path / "bad.yml"
    rules_file_for(
        [("syntax", "sum(rate(proxymq_gateway_requests_total[$__rate_interval])")], rules
    )
    assert run([promtool, "check", "rules", str(rules)]).returncode != 0
