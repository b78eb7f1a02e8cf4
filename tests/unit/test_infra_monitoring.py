"""Monitoring and the one-GPU-host Compose stack under infra/: the Prometheus alerts and their
promtool unit tests, the Compose stack's Prometheus config, the Grafana dashboard, the
Kubernetes copies of both (infra/k8s/base/monitoring) and infra/compose/compose.yaml.

Checked offline with the real tools where they are installed: promtool (Debian's
``prometheus`` package, as in CI), kubectl (kustomize) and check-jsonschema (in the venv,
with the Compose specification's schema vendored in it); a test skips, saying why, where its
tool is missing. Metric names are checked against what the bundled tritonserver exports
(:data:`TRITON_METRICS`). Seconds in all::

    python -m pytest -q tests/unit/test_infra_monitoring.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "infra" / "monitoring"
RULES = MONITORING / "rules" / "triton.rules.yml"
RULE_TESTS = MONITORING / "rules" / "triton.rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "medimg-triton.json"
K8S_MONITORING = ROOT / "infra" / "k8s" / "base" / "monitoring"
PROMETHEUS_RULE = K8S_MONITORING / "prometheusrule.yaml"
COMPOSE = ROOT / "infra" / "compose" / "compose.yaml"
ENV_EXAMPLE = ROOT / "infra" / "compose" / ".env.example"
INFRA_README = ROOT / "infra" / "README.md"

JOB = "triton-metrics"
NAMESPACE = "medimg"
ALERTS = {"TritonNotReady", "TritonInferenceFailureRatio", "TritonQueueTimeP95OverBudget"}
ADAPTER_METRIC = "triton_queue_time_per_request_us"  # prometheus-adapter's rule, for the HPA

# Every metric family tritonserver 2.51.0 (server_version in its log; the one bundled in the
# nvidia-pytriton 0.7.0 wheel) exported on its real :8002/metrics, read with curl after
# inference requests (and one failing request) to the tiny classifier's ensemble, started as
# `medimg serve` starts it plus --metrics-config=summary_latencies=true, on CPU. Its labels:
# model, version; nv_inference_request_failure also reason (OTHER, BACKEND, REJECTED,
# CANCELED); the *_summary_us families quantile (below). GPU hosts add nv_gpu_* and
# nv_energy_consumption, which this CPU machine could not show: nothing here uses them.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_inference_pending_request_count",
        "nv_pinned_memory_pool_total_bytes",
        "nv_pinned_memory_pool_used_bytes",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
        *(
            f"nv_inference_{part}_summary_us{suffix}"
            for part in ("request", "queue", "compute_input", "compute_infer", "compute_output")
            for suffix in ("", "_count", "_sum")
        ),
    }
)
TRITON_QUANTILES = frozenset({"0.5", "0.9", "0.95", "0.99", "0.999"})
# labels a query may name: Triton's own, the scrape's, and the Prometheus Operator's
KNOWN_LABELS = frozenset(
    {"model", "version", "reason", "quantile", "job", "instance", "namespace", "pod"}
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian/Ubuntu: apt-get install prometheus; CI has it)",
)
KUBECTL = shutil.which("kubectl")
CHECK_JSONSCHEMA = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))

# no network for the tools: a download would fail instead of passing unnoticed
OFFLINE_ENV = {
    **os.environ,
    **dict.fromkeys(
        ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), "http://127.0.0.1:9"
    ),
    "NO_PROXY": "",
    "no_proxy": "",
}


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=OFFLINE_ENV,
        check=False,
    )


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


# --- PromQL: the metric and label names a query uses ------------------------------------

_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
    | {"group_left", "group_right", "inf", "nan"}
)


def promql_names(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(metric names, label names, quantile values) that a PromQL (or Grafana) query names.
    Enough for the queries here: selectors, ranges, by/on clauses, functions, operators."""
    labels: set[str] = set()
    quantiles: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        for name, _op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            labels.add(name)
            if name == "quantile":
                quantiles.update(value.split("|"))
    rest = re.sub(r"\{[^}]*\}", " ", expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)  # string arguments (label_replace, ...)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # [5m], [$__rate_interval]
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for group in re.findall(grouping, rest):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    rest = re.sub(grouping, " ", rest)
    metrics = {
        name
        for name, call in re.findall(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", rest)
        if not call and name not in _KEYWORDS
    }
    return metrics, labels, quantiles


def rule_exprs() -> dict[str, str]:
    return {
        rule["alert"]: rule["expr"]
        for group in load_yaml(RULES)["groups"]
        for rule in group["rules"]
    }


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_promql_names_reads_metrics_labels_and_quantiles():
    expr = (
        'sum by (model, reason) (rate(nv_made_up{job="x", quantile=~"0.5|0.97"}[5m])) '
        "/ on (instance) group_left up unless absent(other_metric)"
    )
    metrics, labels, quantiles = promql_names(expr)
    assert metrics == {"nv_made_up", "up", "other_metric"}
    assert labels == {"model", "reason", "job", "quantile", "instance"}
    assert quantiles == {"0.5", "0.97"}
    assert not metrics <= TRITON_METRICS | {"up"}  # what the name checks below would catch


# --- alert rules -----------------------------------------------------------------------


def test_rule_file_defines_the_three_alerts_with_for_severity_and_summary():
    rules = [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} == ALERTS
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        # every selector names the scrape job that the other manifests use
        selectors = re.findall(r"\b(?:nv_\w+|up)\{([^}]*)\}", rule["expr"])
        assert selectors and all(f'job="{JOB}"' in s for s in selectors), rule["alert"]


def test_alerts_use_the_failure_and_success_counters_and_the_queue_p95():
    exprs = rule_exprs()
    failure = promql_names(exprs["TritonInferenceFailureRatio"])[0]
    assert failure == {"nv_inference_request_failure", "nv_inference_request_success"}
    metrics, _labels, quantiles = promql_names(exprs["TritonQueueTimeP95OverBudget"])
    assert metrics == {"nv_inference_queue_summary_us"} and quantiles == {"0.95"}
    assert "up" in promql_names(exprs["TritonNotReady"])[0]


def test_rules_and_dashboard_name_only_what_triton_exports():
    """Every metric the alerts and the dashboard query is one the bundled Triton exports
    (or ``up``, or the adapter's metric); so are the labels and the summary quantiles."""
    exprs = [*rule_exprs().values(), *dashboard_exprs(json.loads(DASHBOARD.read_text()))]
    used_metrics, used_labels, used_quantiles = set(), set(), set()
    for expr in exprs:
        metrics, labels, quantiles = promql_names(expr)
        used_metrics |= metrics
        used_labels |= labels
        used_quantiles |= quantiles
    assert used_metrics - (TRITON_METRICS | {"up", ADAPTER_METRIC}) == set()
    assert used_labels - KNOWN_LABELS == set()
    assert used_quantiles and used_quantiles <= TRITON_QUANTILES
    # the dashboard's variables query Triton's metrics too
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    for variable in (v for v in variables if v["type"] == "query"):
        inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
        assert inner and promql_names(inner[1])[0] <= TRITON_METRICS | {"up"}
        assert inner[2] in KNOWN_LABELS


@needs_promtool
def test_promtool_check_rules():
    result = run(PROMTOOL, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    result = run(PROMTOOL, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_rejects_a_broken_rule_file(tmp_path):
    broken = tmp_path / "triton.rules.yml"
    broken.write_text(RULES.read_text().replace("[5m]))", "[5m])", 1))  # unbalanced
    result = run(PROMTOOL, "check", "rules", broken)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_catch_an_alert_that_would_not_fire(tmp_path):
    """The unit tests have teeth: with a 50 % threshold the failure-ratio alert stays silent
    on the synthetic 4.8 % failures, and ``promtool test rules`` fails."""
    rules = RULES.read_text()
    assert rules.count(") > 0.01") == 1
    (tmp_path / RULES.name).write_text(rules.replace(") > 0.01", ") > 0.5"))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(PROMTOOL, "test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0
    assert "TritonInferenceFailureRatio" in result.stdout + result.stderr


# --- Prometheus config (Compose) -------------------------------------------------------


@needs_promtool
def test_promtool_check_config_resolves_rule_files_next_to_the_config(tmp_path):
    result = run(PROMTOOL, "check", "config", PROMETHEUS_CONFIG, cwd=tmp_path)  # not ROOT
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_prometheus_config_scrapes_triton_as_the_compose_service():
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["rules/triton.rules.yml"]
    assert (PROMETHEUS_CONFIG.parent / config["rule_files"][0]).resolve() == RULES
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    (targets,) = [static["targets"] for static in job["static_configs"]]
    assert targets == ["triton:8002"]
    assert "--metrics-port=8002" in load_yaml(COMPOSE)["services"]["triton"]["command"]


# --- Kubernetes: PrometheusRule and the dashboard's ConfigMap --------------------------


def test_prometheusrule_groups_equal_the_rule_file():
    rule = load_yaml(PROMETHEUS_RULE)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "medimg-triton"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"]


def test_kustomization_dashboard_is_the_monitoring_dashboard():
    assert (K8S_MONITORING / DASHBOARD.name).read_bytes() == DASHBOARD.read_bytes()
    kustomization = load_yaml(K8S_MONITORING / "kustomization.yaml")
    assert kustomization["namespace"] == NAMESPACE
    assert kustomization["resources"] == [PROMETHEUS_RULE.name]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [DASHBOARD.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_rule_and_the_dashboard_configmap():
    result = run(KUBECTL, "kustomize", K8S_MONITORING)
    assert result.returncode == 0, result.stderr
    objects = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(result.stdout)}
    assert set(objects) == {
        ("PrometheusRule", "medimg-triton"),
        ("ConfigMap", "medimg-triton-dashboard"),
    }
    assert {o["metadata"]["namespace"] for o in objects.values()} == {NAMESPACE}
    configmap = objects["ConfigMap", "medimg-triton-dashboard"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    rendered = objects["PrometheusRule", "medimg-triton"]["spec"]["groups"]
    assert rendered == load_yaml(RULES)["groups"]


# --- Grafana dashboard -----------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "medimg-triton" and dashboard["title"]
    assert dashboard["id"] is None  # import assigns it
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["title"] and panel["type"] in {"timeseries", "stat"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert promql_names(target["expr"])[0], target["expr"]
            for variable in re.findall(r"\$(\w+)", target["expr"]):
                assert variable in variables or variable.startswith("__"), variable


def test_dashboard_has_throughput_latency_queue_compute_and_batch_panels():
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    flat = [re.sub(r"\s+", " ", expr) for expr in exprs]

    def per(numerator: str, denominator: str) -> bool:
        return any(
            re.search(rf"rate\({numerator}\{{[^}}]*\}}[^/]*/[^/]*rate\({denominator}\{{", e)
            for e in flat
        )

    assert any(re.search(r"rate\(nv_inference_count\{", e) for e in flat)  # inferences/s
    assert any("nv_inference_request_summary_us{" in e and "quantile" in e for e in flat)
    assert per("nv_inference_queue_duration_us", "nv_inference_request_success")
    assert per("nv_inference_compute_infer_duration_us", "nv_inference_request_success")
    assert per("nv_inference_count", "nv_inference_exec_count")  # batch size


# --- Compose ---------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
_ANY_VARIABLE = r"\$\{[^}]*\}"


def compose() -> dict:
    return load_yaml(COMPOSE)


def interpolate_defaults(value: str) -> str:
    """A Compose value with every ``${VAR:-default}`` at its default (no .env)."""
    return _VARIABLE.sub(lambda m: m[3] if m[2] in {"-", ":-"} else f"<{m[1]}>", value)


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` arguments as {name: value}; a bare ``--name`` gives ""."""
    given = {}
    for arg in command:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            given[name] = value
    return given


def readme_restricted_flags() -> dict[str, str]:
    """The two repository-API flags of infra/README.md's docker run, token as <TOKEN>."""
    found = re.findall(r"--((?:http|grpc)-restricted-\w+)=(\S+)", INFRA_README.read_text())
    return {name: value.replace("$MEDIMG_REPOSITORY_TOKEN", "<TOKEN>") for name, value in found}


@pytest.mark.skipif(CHECK_JSONSCHEMA is None, reason="check-jsonschema is not in the venv")
def test_compose_file_validates_against_the_compose_spec_offline(tmp_path):
    result = run(CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    shm_size: 1gb", "    shm_sise: 1gb"))
    result = run(CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", broken)
    assert result.returncode != 0 and "shm_sise" in result.stdout


def test_compose_triton_runs_the_deployment_flags():
    triton = compose()["services"]["triton"]
    command = triton["command"]
    assert command[0] == "tritonserver"
    given = flags(command)
    assert set(given) == {
        "model-repository",
        "model-control-mode",
        "http-restricted-api",
        "grpc-restricted-protocol",
        "metrics-config",
        "http-port",
        "grpc-port",
        "metrics-port",
    }
    assert given["model-control-mode"] == "none"  # poll unloads all when S3 is unreachable
    assert given["metrics-config"] == "summary_latencies=true"
    assert (given["http-port"], given["grpc-port"], given["metrics-port"]) == (
        "8000",
        "8001",
        "8002",
    )
    # exactly infra/README.md's two restrictions, the token from .env (required)
    readme = readme_restricted_flags()
    assert set(readme) == {"http-restricted-api", "grpc-restricted-protocol"}
    for name, value in readme.items():
        token = re.fullmatch(r"(.*)=\$\{MEDIMG_REPOSITORY_TOKEN:\?[^}]*\}", given[name])
        assert token and f"{token[1]}=<TOKEN>" == value, given[name]
    # Triton's s3://HOST:PORT/BUCKET/PATH form (the regex of triton core's s3.h), on the
    # S3-compatible store's service and port
    repository = re.fullmatch(
        r"s3://([0-9a-zA-Z\-.]+):([0-9]+)/([0-9a-z.\-]+)((/[0-9a-zA-Z.\-_]+)*)",
        given["model-repository"],
    )
    assert repository, given["model-repository"]
    host, port, bucket = repository[1], repository[2], repository[3]
    assert host == "minio" and port == "9000" and bucket == "medimg-models"
    assert f"local/{bucket}" in compose()["services"]["minio-init"]["entrypoint"][-1]
    assert triton["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${TRITON_S3_SECRET_KEY:?")


def test_compose_triton_gets_a_gpu_and_its_image_from_the_triton_dockerfile():
    triton = compose()["services"]["triton"]
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    context = (COMPOSE.parent / triton["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / triton["build"]["dockerfile"]) == ROOT / "infra" / "triton" / "Dockerfile"
    assert "TRITON_VERSION" in triton["build"]["args"]


def test_compose_mlflow_on_postgres_with_proxied_s3_artifacts():
    services = compose()["services"]
    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    given = flags(command)
    assert given["artifacts-destination"].startswith("s3://medimg-mlflow/")
    allowed = given["allowed-hosts"].split(",")
    assert "mlflow" in allowed and "mlflow:5000" in allowed  # other containers' Host header
    store = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert re.fullmatch(
        r"postgresql\+psycopg2://mlflow:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres:5432/mlflow", store
    )
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")  # the official image
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    init = services["minio-init"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    for user in ("triton", "mlflow"):
        assert services[user]["depends_on"]["minio-init"]["condition"] == (
            "service_completed_successfully"
        )
    for policy in re.findall(r"/policies/(\S+\.json)", init["entrypoint"][-1]):
        json.loads((COMPOSE.parent / "minio" / policy).read_text())


def test_compose_prometheus_mounts_infra_monitoring():
    prometheus = compose()["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.split(":")[0] == "../monitoring"]
    source, target = mount.split(":")[:2]
    assert (COMPOSE.parent / source).resolve() == MONITORING
    assert f"--config.file={target}/prometheus.yml" in prometheus["command"]


def test_compose_ports_are_published_on_loopback_by_default():
    published = []
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, dict), f"{name}: long syntax with host_ip, got {port!r}"
            assert interpolate_defaults(port["host_ip"]) == "127.0.0.1", (name, port)
            published.append(int(port["target"]))
    assert {8000, 8001, 8002, 5000, 9090} <= set(published)
    assert "ports" not in compose()["services"]["postgres"]


def literal_secrets(document) -> list[str]:
    """Where ``document`` (a parsed Compose file) holds a secret that is not a ${VAR}:
    PASSWORD/SECRET/TOKEN variables, a URL's password, a --...token=... argument."""
    problems = []

    def only_variable(value: str) -> bool:
        match = _VARIABLE.fullmatch(value)
        return bool(match) and match[2] not in {"-", ":-"}  # no default value either

    def visit(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                secret = re.search(r"PASSWORD|SECRET|TOKEN", str(key))
                if secret and isinstance(value, str | int) and not only_variable(str(value)):
                    problems.append(f"{where}.{key}")
                visit(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                visit(item, f"{where}[{i}]")
        elif isinstance(node, str):
            for password in re.findall(rf"://[^:/@\s]+:({_ANY_VARIABLE}|[^@\s]+)@", node):
                if not only_variable(password):
                    problems.append(f"{where}: URL password")
            for secret in re.findall(rf"token=({_ANY_VARIABLE}|[^\s,]+)", node):
                if not only_variable(secret):
                    problems.append(f"{where}: token")

    visit(document, "compose")
    return problems


def test_compose_holds_no_literal_secret():
    assert literal_secrets(compose()) == []
    # and the check can fail
    leaky = compose()
    leaky["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] = "hunter22"
    leaky["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"] = (
        "postgresql+psycopg2://mlflow:hunter22@postgres:5432/mlflow"
    )
    leaky["services"]["triton"]["command"][4] = "--http-restricted-api=model-repository:x-token=abc"
    assert len(literal_secrets(leaky)) == 3


def test_env_example_defines_every_required_variable_with_change_me_secrets():
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    required = {m[1] for m in _VARIABLE.finditer(COMPOSE.read_text()) if m[2] in {"?", ":?"}}
    assert required and required <= set(example)
    for name, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN", name):
            assert value == "CHANGE-ME", name
    ignored = run("git", "check-ignore", "-q", COMPOSE.parent / ".env", cwd=ROOT)
    assert ignored.returncode == 0, "infra/compose/.env must be git-ignored"
