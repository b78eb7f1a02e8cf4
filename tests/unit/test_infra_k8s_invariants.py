"""What no schema sees in the manifests of infra/k8s, one test each (the rendering and the
strict schema checks: test_infra_k8s.py): Ray versions, GPU limits and requests, Triton's S3
repository syntax and restricted-API flags, port and metric names across
Deployment/Services/ServiceMonitor/adapter rule/HPA, MLflow's allowed hosts, no runtime-env
downloads, credentials from Secrets only, Compose and the Deployment alike. Each check is a
function that returns the problems it finds; the tests show it also catches a broken copy."""

from __future__ import annotations

import functools
import json
import re
import shlex
import warnings
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tests.fixtures.k8s import (
    GPU,
    GPU_TOLERATION,
    HPA_METRIC,
    INFRA,
    NAMESPACE,
    RESTRICTED_API_FLAGS,
    RUNTIME_ENV_DOWNLOADS,
    SENSITIVE_ENV,
    TRITON_PORTS,
    TRITON_S3_AWS,
    TRITON_S3_ENDPOINT,
    all_pod_templates,
    command_line,
    container,
    containers,
    expand,
    find,
    flag_value,
    gpus,
    image_name_and_tag,
    of_kind,
    ref,
    render,
)


def ray_version_problems(objs: list[dict[str, Any]], version: str, overlay: str) -> list[str]:
    problems = []
    for obj in of_kind(objs, "RayJob") + of_kind(objs, "RayCluster"):
        spec = obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]
        if str(spec.get("rayVersion")) != version:
            problems.append(f"{ref(obj)}: rayVersion {spec.get('rayVersion')!r} != ray {version}")
    want = version + ("-gpu" if overlay == "gpu" else "")
    seen = 0
    for where, template in all_pod_templates(objs):
        for c in containers(template):
            name, tag = image_name_and_tag(c["image"])
            if name.rsplit("/", 1)[-1] == "medimg-ray":
                seen += 1
                if tag != want:
                    problems.append(f"{where}: image {c['image']} (tag should be {want})")
    if not seen:
        problems.append("no container runs the medimg-ray image")
    return problems


def test_ray_version_matches_installed_ray(objs: list[dict[str, Any]], overlay: str) -> None:
    import ray

    assert ray_version_problems(objs, ray.__version__, overlay) == []
    job = find(objs, "RayJob", "medimg-train")
    job["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"
    assert len(ray_version_problems(objs, ray.__version__, overlay)) == 1
    assert ray_version_problems(objs, "0.0.1", overlay)


def test_ray_dockerfile_builds_the_installed_ray() -> None:
    import ray

    text = (INFRA / "ray" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, flags=re.M))
    assert args.get("RAY_VERSION") == ray.__version__
    assert "RAY_FLAVOUR" in args  # "-gpu" for the CUDA flavour
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311\$\{RAY_FLAVOUR\}$", text, re.M)
    assert re.search(r"pip install [^\n]*\s\.\s", text), "the image installs medimg (pip install .)"
    assert "psycopg2-binary" in text, "MLflow on PostgreSQL runs this image"


def runtime_env_problems(objs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for job in of_kind(objs, "RayJob"):
        if "runtimeEnvYAML" in job["spec"]:
            runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"]) or {}
            downloads = sorted(RUNTIME_ENV_DOWNLOADS & set(runtime_env))
            if downloads:
                problems.append(f"{ref(job)}: runtimeEnvYAML downloads {downloads}")
        entrypoint = job["spec"]["entrypoint"]
        for bad in ("pip install", "--runtime-env", "--working-dir", "uv run", "--py-modules"):
            if bad in entrypoint:
                problems.append(f"{ref(job)}: the entrypoint has {bad!r}")
    return problems


def test_no_runtime_env_downloads(objs: list[dict[str, Any]]) -> None:
    assert runtime_env_problems(objs) == []
    job = find(objs, "RayJob", "medimg-train")
    job["spec"]["runtimeEnvYAML"] = "pip:\n  - medimg\nworking_dir: ."
    assert runtime_env_problems(objs) == [
        "RayJob/medimg-train: runtimeEnvYAML downloads ['pip', 'working_dir']"
    ]


def quantity(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def rayjob_problems(job: dict[str, Any]) -> list[str]:
    """What KubeRay's webhook/CEL rules and Ray's scheduler would reject, and what no schema
    sees: a cluster too small for the run waits forever."""
    problems = []
    spec = job["spec"]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true (the cluster would outlive the job)")
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        if not isinstance(spec.get(key), int) or spec[key] <= 0:
            problems.append(f"{key} is not a positive integer")
    if "clusterSelector" in spec:
        problems.append("clusterSelector and rayClusterSpec together")
    for unchecked in ("deletionStrategy", "managedBy"):  # CEL rules jsonschema does not run
        if unchecked in spec:
            problems.append(f"{unchecked}: its CEL rules are not checked offline")
    argv = shlex.split(spec["entrypoint"])
    if argv[:2] != ["medimg", "train"]:
        problems.append(f"entrypoint {argv[:2]} is not `medimg train`")
    if flag_value(argv, "--ray-address") != "auto":
        problems.append("the entrypoint does not join its cluster (--ray-address auto)")
    storage = flag_value(argv, "--storage-path") or ""
    if not storage.startswith("s3://"):
        problems.append(f"--storage-path {storage!r}: multi-node training needs shared storage")
    workers = int(flag_value(argv, "--workers") or 1)
    cpus_per_worker = float(flag_value(argv, "--cpus-per-worker") or 0)
    gpus_per_worker = float(flag_value(argv, "--gpus-per-worker") or 0)
    fit = 0
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        name, replicas = group["groupName"], group.get("replicas", 0)
        if not group["minReplicas"] <= replicas <= group["maxReplicas"]:
            problems.append(f"group {name}: replicas outside [minReplicas, maxReplicas]")
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        per_pod = []
        if cpus_per_worker:
            per_pod.append(int(quantity(limits.get("cpu", 0)) // cpus_per_worker))
        if gpus_per_worker:
            per_pod.append(int(quantity(limits.get(GPU, 0)) // gpus_per_worker))
        fit += replicas * (min(per_pod) if per_pod else workers)
    if fit < workers:
        problems.append(f"--workers {workers} but the worker pods fit {fit} Ray Train workers")
    return problems


def test_rayjob_runs_to_completion_on_its_cluster(objs: list[dict[str, Any]]) -> None:
    job = find(objs, "RayJob", "medimg-train")
    assert rayjob_problems(job) == []
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].replace("--workers 2", "--workers 3")
    assert rayjob_problems(job) == ["--workers 3 but the worker pods fit 2 Ray Train workers"]


# ---------------------------------------------------------------------------------------------
# GPUs


def gpu_problems(objs: list[dict[str, Any]], overlay: str) -> list[str]:
    problems = []
    with_gpu = set()
    for where, template in all_pod_templates(objs):
        pod_gpus = False
        for c in containers(template):
            limit, request = gpus(c, "limits"), gpus(c, "requests")
            if limit is None and request is None:
                continue
            pod_gpus = True
            if limit is None or request is None or quantity(limit) != quantity(request):
                problems.append(f"{where} {c['name']}: {GPU} limit {limit} != request {request}")
            elif quantity(limit) < 1:
                problems.append(f"{where} {c['name']}: {GPU} {limit}")
        tolerates = GPU_TOLERATION in template["spec"].get("tolerations", [])
        if pod_gpus:
            with_gpu.add(where)
            if not tolerates:
                problems.append(f"{where}: GPUs without the toleration {GPU_TOLERATION}")
        elif tolerates:
            problems.append(f"{where}: tolerates GPU nodes without asking for a GPU")
    entrypoint = shlex.split(find(objs, "RayJob", "medimg-train")["spec"]["entrypoint"])
    gpus_per_worker = float(flag_value(entrypoint, "--gpus-per-worker") or 0)
    if overlay == "gpu":
        expected = {
            "Deployment/triton",
            "RayJob/medimg-train group gpu-workers",
            "RayCluster/medimg-ray group gpu-workers",
        }
        if with_gpu != expected:
            problems.append(f"GPUs in {sorted(with_gpu)}, expected {sorted(expected)}")
        if gpus_per_worker <= 0:
            problems.append("the gpu overlay trains without --gpus-per-worker")
    else:
        if with_gpu:
            problems.append(f"the cpu overlay asks for GPUs in {sorted(with_gpu)}")
        if gpus_per_worker:
            problems.append("the cpu overlay trains with --gpus-per-worker")
    return problems


def test_gpu_limits_equal_requests(objs: list[dict[str, Any]], overlay: str) -> None:
    assert gpu_problems(objs, overlay) == []
    triton = container(find(objs, "Deployment", "triton"), "triton")
    triton.setdefault("resources", {}).setdefault("limits", {})[GPU] = 2
    assert gpu_problems(objs, overlay)


def test_gpu_overlay_checks_catch_a_missing_gpu() -> None:
    objs = render("overlays/gpu")
    del container(find(objs, "Deployment", "triton"), "triton")["resources"]["requests"][GPU]
    assert gpu_problems(objs, "gpu") == [
        f"Deployment/triton triton: {GPU} limit 1 != request None",
    ]
    objs = render("overlays/cpu")
    find(objs, "Deployment", "triton")["spec"]["template"]["spec"]["tolerations"] = [GPU_TOLERATION]
    assert gpu_problems(objs, "cpu") == [
        "Deployment/triton: tolerates GPU nodes without asking for a GPU"
    ]


# ---------------------------------------------------------------------------------------------
# Triton: model repository, restricted API, wiring to monitoring and autoscaling


def model_repository_problems(objs: list[dict[str, Any]]) -> list[str]:
    c = container(find(objs, "Deployment", "triton"), "triton")
    argv = command_line(c)
    values = [a.split("=", 1)[1] for a in argv if a.startswith("--model-repository=")]
    if len(values) != 1:
        return [f"expected one --model-repository=..., found {len(values)}"]
    uri = expand(values[0], c)
    if not (TRITON_S3_AWS.fullmatch(uri) or TRITON_S3_ENDPOINT.fullmatch(uri)):
        return [
            f"--model-repository={uri}: not Triton's s3://bucket/path or s3://host:port/bucket/path"
        ]
    return []


def repository_uri(objs: list[dict[str, Any]]) -> str:
    c = container(find(objs, "Deployment", "triton"), "triton")
    return expand(flag_value(command_line(c), "--model-repository") or "", c)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/path/to/model/repository",
        "s3://medimg-models",
        "s3://minio.medimg.svc.cluster.local:9000/medimg-models/triton/cpu",
        "s3://https://s3.us-west-004.backblazeb2.com:443/bucket/path/to/model/repository",
        "s3://http://10.0.0.5:9000/models",
    ],
)
def test_triton_s3_syntax_accepts(uri: str) -> None:
    assert TRITON_S3_AWS.fullmatch(uri) or TRITON_S3_ENDPOINT.fullmatch(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://https://minio:9000",  # no bucket
        "s3://minio:9000/",
        "s3://Medimg_Models/x",  # not a bucket name
        "s3:/bucket/path",
        "https://minio:9000/bucket",
        "/models",
        "s3://$(TRITON_MODEL_REPOSITORY)",
    ],
)
def test_triton_s3_syntax_rejects(uri: str) -> None:
    assert not (TRITON_S3_AWS.fullmatch(uri) or TRITON_S3_ENDPOINT.fullmatch(uri))


def test_triton_model_repository_uses_triton_s3_syntax(objs: list[dict[str, Any]]) -> None:
    assert model_repository_problems(objs) == []
    c = container(find(objs, "Deployment", "triton"), "triton")
    (env,) = [e for e in c["env"] if e["name"] == "TRITON_MODEL_REPOSITORY"]
    env["value"] = "s3://minio:9000"
    assert model_repository_problems(objs)
    del c["env"][c["env"].index(env)]  # $(TRITON_MODEL_REPOSITORY) stays unexpanded
    assert model_repository_problems(objs)


def test_overlays_serve_their_own_repository() -> None:
    cpu, gpu = repository_uri(render("overlays/cpu")), repository_uri(render("overlays/gpu"))
    assert cpu != gpu
    assert cpu.rstrip("/").endswith("cpu") and gpu.rstrip("/").endswith("gpu")


def restricted_api_problems(objs: list[dict[str, Any]]) -> list[str]:
    c = container(find(objs, "Deployment", "triton"), "triton")
    argv = command_line(c)
    problems = [f"missing {flag}" for flag in RESTRICTED_API_FLAGS if flag not in argv]
    if argv[:1] != ["tritonserver"]:
        problems.append(f"the container runs {argv[:1]}, not tritonserver")
    # not poll: Triton 2.51 unloads every model when a poll cannot list the bucket
    if flag_value(argv, "--model-control-mode") != "none":
        problems.append("--model-control-mode is not none")
    token = [e for e in c.get("env", []) if e["name"] == "MEDIMG_REPOSITORY_TOKEN"]
    key_ref = token[0].get("valueFrom", {}).get("secretKeyRef", {}) if len(token) == 1 else {}
    if key_ref.get("name") != "triton-repository-token" or key_ref.get("optional"):
        problems.append("MEDIMG_REPOSITORY_TOKEN does not come from Secret triton-repository-token")
    return problems


def test_triton_keeps_both_restricted_api_flags(objs: list[dict[str, Any]]) -> None:
    assert restricted_api_problems(objs) == []
    c = container(find(objs, "Deployment", "triton"), "triton")
    c["args"] = [a for a in c["args"] if not a.startswith("--grpc-restricted-protocol")]
    assert restricted_api_problems(objs) == [f"missing {RESTRICTED_API_FLAGS[1]}"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def wiring_problems(objs: list[dict[str, Any]]) -> list[str]:
    """Port and metric names from Triton through Services, ServiceMonitor, adapter rule, HPA."""
    problems = []
    deployment = find(objs, "Deployment", "triton")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(deployment, "triton")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    if ports != TRITON_PORTS:
        problems.append(f"Triton's container ports {ports} != {TRITON_PORTS}")
    if "--metrics-config=summary_latencies=true" not in command_line(c):
        problems.append("no --metrics-config=summary_latencies=true (the alerts read *_summary_us)")
    for probe, path in (
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "http":
            problems.append(f"{probe}: not GET {path} on port http")
    startup = c.get("startupProbe", {})
    if startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) < 600:
        problems.append("startupProbe gives Triton under 10 minutes (S3 download, TensorRT warmup)")

    services = {
        "triton": {"http": 8000, "grpc": 8001},
        "triton-metrics": {"metrics": 8002},
    }
    for name, want in services.items():
        service = find(objs, "Service", name)
        got = {p.get("name"): p["port"] for p in service["spec"]["ports"]}
        if got != want:
            problems.append(f"Service {name}: ports {got} != {want}")
        for p in service["spec"]["ports"]:
            if p.get("targetPort") not in (p.get("name"), ports.get(p.get("name"))):
                problems.append(
                    f"Service {name}: port {p.get('name')} targets {p.get('targetPort')}"
                )
        if not selects(service["spec"].get("selector", {}), pod_labels):
            problems.append(f"Service {name} does not select Triton's pods")
    metrics_service = find(objs, "Service", "triton-metrics")
    if metrics_service["metadata"]["labels"].get("app.kubernetes.io/name") != "triton-metrics":
        problems.append("Service triton-metrics lacks app.kubernetes.io/name: triton-metrics")

    monitor = find(objs, "ServiceMonitor", "triton")
    spec = monitor["spec"]
    match = spec["selector"].get("matchLabels", {})
    for service in of_kind(objs, "Service"):
        chosen = selects(match, service["metadata"].get("labels", {}))
        if chosen != (service["metadata"]["name"] == "triton-metrics"):
            problems.append(
                f"ServiceMonitor triton {'selects' if chosen else 'misses'} {ref(service)}"
            )
    if NAMESPACE not in spec.get("namespaceSelector", {}).get("matchNames", [NAMESPACE]):
        problems.append("ServiceMonitor triton looks in another namespace")
    if spec.get("jobLabel"):
        problems.append("ServiceMonitor jobLabel set: job would not be triton-metrics")
    endpoints = spec["endpoints"]
    if [(e.get("port"), e.get("path"), e.get("interval")) for e in endpoints] != [
        ("metrics", "/metrics", "15s")
    ]:
        problems.append(f"ServiceMonitor endpoints {endpoints}")

    hpa = find(objs, "HorizontalPodAutoscaler", "triton")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", "triton"):
        problems.append(f"HPA scales {target}")
    pods_metrics = [
        m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"
    ]
    if pods_metrics != [HPA_METRIC]:
        problems.append(f"HPA Pods metrics {pods_metrics} != [{HPA_METRIC}]")
    if not 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]:
        problems.append("HPA min/max replicas")
    if "replicas" in deployment["spec"]:
        problems.append("Deployment triton sets replicas: each apply would undo the HPA")

    config = yaml.safe_load(
        find(objs, "ConfigMap", "prometheus-adapter-medimg")["data"]["config.yaml"]
    )
    rules = [r for r in config.get("rules", []) if r.get("name", {}).get("as") in pods_metrics]
    if len(rules) != 1:
        problems.append(f"prometheus-adapter rules naming {pods_metrics}: {len(rules)}")
    for rule in rules:
        overrides = rule.get("resources", {}).get("overrides", {})
        if {k: v.get("resource") for k, v in overrides.items()} != {
            "namespace": "namespace",
            "pod": "pod",
        }:
            problems.append(f"adapter rule overrides {overrides}: the HPA needs namespace and pod")
        if "nv_inference_queue_duration_us" not in rule.get("seriesQuery", ""):
            problems.append("adapter seriesQuery does not discover nv_inference_queue_duration_us")
        query = rule.get("metricsQuery", "")
        for needed in (
            "nv_inference_queue_duration_us",
            "nv_inference_request_success",
            "<<.LabelMatchers>>",
            "<<.GroupBy>>",
        ):
            if needed not in query:
                problems.append(f"adapter metricsQuery lacks {needed}")

    for rule_obj in of_kind(objs, "PrometheusRule"):
        exprs = [
            str(r.get("expr", ""))
            for g in rule_obj["spec"].get("groups", [])
            for r in g.get("rules", [])
        ]
        for job in sorted({j for e in exprs for j in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', e)}):
            if not re.fullmatch(job, "triton-metrics"):
                problems.append(f"{ref(rule_obj)}: job={job!r} but the Service is triton-metrics")
    return problems


def test_port_and_metric_names_agree(objs: list[dict[str, Any]]) -> None:
    assert wiring_problems(objs) == []
    find(objs, "HorizontalPodAutoscaler", "triton")["spec"]["metrics"][0]["pods"]["metric"][
        "name"
    ] = "triton_queue_time_us"
    assert wiring_problems(objs) == [
        f"HPA Pods metrics ['triton_queue_time_us'] != [{HPA_METRIC}]",
        "prometheus-adapter rules naming ['triton_queue_time_us']: 0",
    ]


def test_port_name_checks_catch_a_renamed_port() -> None:
    objs = render("overlays/cpu")
    find(objs, "Service", "triton-metrics")["spec"]["ports"][0]["name"] = "prometheus"
    problems = wiring_problems(objs)
    assert "Service triton-metrics: ports {'prometheus': 8002} != {'metrics': 8002}" in problems


def test_triton_image_is_built_from_its_dockerfile(objs: list[dict[str, Any]]) -> None:
    text = (INFRA / "triton" / "Dockerfile").read_text()
    (version,) = re.findall(r"^ARG TRITON_VERSION=(\S+)$", text, flags=re.M)
    image = container(find(objs, "Deployment", "triton"), "triton")["image"]
    name, tag = image_name_and_tag(image)
    assert name.rsplit("/", 1)[-1] == "medimg-triton" and tag == version


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_host_problems(objs: list[dict[str, Any]]) -> list[str]:
    """Every Host header a client in the cluster sends must pass MLflow's own check."""
    with warnings.catch_warnings():  # importing mlflow.server configures SQLAlchemy models
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow.server.security_utils import is_allowed_host_header

    service = find(objs, "Service", "mlflow")
    c = container(find(objs, "Deployment", "mlflow"), "mlflow")
    argv = command_line(c)
    allowed = [
        h.strip() for h in (flag_value(argv, "--allowed-hosts") or "").split(",") if h.strip()
    ]
    if not allowed:
        return ["mlflow server without --allowed-hosts"]
    if "*" in allowed:
        return ["--allowed-hosts '*' turns the Host check off"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    dns = [
        name,
        f"{name}.{namespace}",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}.svc.cluster.local",
    ]
    ports = [p["port"] for p in service["spec"]["ports"]]
    hosts = [f"{d}:{p}" if p != 80 else d for d in dns for p in ports]
    for where, template in all_pod_templates(objs):  # MLFLOW_TRACKING_URI of the Ray pods
        for ct in containers(template):
            for e in ct.get("env", []):
                if e["name"] == "MLFLOW_TRACKING_URI":
                    uri = urlparse(e["value"])
                    hosts.append(uri.netloc)
                    if uri.hostname not in dns or (uri.port or 80) not in ports:
                        return [f"{where}: MLFLOW_TRACKING_URI {e['value']} is not Service mlflow"]
    return [
        f"MLflow answers 403 to Host: {h}" for h in hosts if not is_allowed_host_header(allowed, h)
    ]


def test_mlflow_allows_its_service_names(objs: list[dict[str, Any]]) -> None:
    assert mlflow_host_problems(objs) == []
    args = container(find(objs, "Deployment", "mlflow"), "mlflow")["args"]
    i = args.index("--allowed-hosts") + 1
    args[i] = args[i].replace(":5000", "")  # the Host header carries the port
    assert (
        "MLflow answers 403 to Host: mlflow.medimg.svc.cluster.local:5000"
        in mlflow_host_problems(objs)
    )


# ---------------------------------------------------------------------------------------------
# Credentials


@functools.cache
def example_secrets() -> dict[str, dict[str, str]]:
    secrets = of_kind(render("examples"), "Secret")
    return {s["metadata"]["name"]: s.get("stringData", {}) for s in secrets}


def secret_problems(objs: list[dict[str, Any]], examples: dict[str, dict[str, str]]) -> list[str]:
    problems = [f"{ref(o)} in the render" for o in of_kind(objs, "Secret")]
    literal_secret = re.compile(r"://[^/\s:@]+:[^/\s@]+@|AKIA[0-9A-Z]{16}")
    for where, template in all_pod_templates(objs):
        for c in containers(template):
            for e in c.get("env", []):
                if SENSITIVE_ENV.search(e["name"]) or e["name"] == "AWS_DEFAULT_REGION":
                    key_ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if key_ref is None:
                        problems.append(f"{where} {c['name']}: {e['name']} is not from a Secret")
                if "value" in e and literal_secret.search(str(e["value"])):
                    problems.append(f"{where} {c['name']}: {e['name']} holds a literal credential")
                key_ref = e.get("valueFrom", {}).get("secretKeyRef")
                optional = not key_ref or key_ref.get("optional")
                if not optional and key_ref["key"] not in examples.get(key_ref["name"], {}):
                    problems.append(
                        f"{where}: Secret {key_ref['name']} key {key_ref['key']} is not in "
                        "infra/k8s/examples"
                    )
            if c.get("envFrom"):
                problems.append(f"{where} {c['name']}: envFrom (name each variable instead)")
            for arg in command_line(c):
                if literal_secret.search(arg):
                    problems.append(f"{where} {c['name']}: literal credential in {arg!r}")
    return problems


def test_credentials_come_from_secrets(objs: list[dict[str, Any]]) -> None:
    examples = example_secrets()
    assert secret_problems(objs, examples) == []
    c = container(find(objs, "Deployment", "triton"), "triton")
    (token,) = [e for e in c["env"] if e["name"] == "MEDIMG_REPOSITORY_TOKEN"]
    del token["valueFrom"]
    token["value"] = "s3cr3t"
    c["args"].append("--foo=postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow")
    assert secret_problems(objs, examples) == [
        "Deployment/triton triton: MEDIMG_REPOSITORY_TOKEN is not from a Secret",
        "Deployment/triton triton: literal credential in "
        "'--foo=postgresql+psycopg2://mlflow:hunter2@db:5432/mlflow'",
    ]


def test_example_secrets_are_marked_examples() -> None:
    secrets = of_kind(render("examples"), "Secret")
    assert {s["metadata"]["name"] for s in secrets} == {
        "ray-s3",
        "triton-s3",
        "triton-repository-token",
        "mlflow-db",
        "mlflow-s3",
    }
    for secret in secrets:
        assert "EXAMPLE" in json.dumps(secret["metadata"].get("annotations", {}))
        assert "data" not in secret, "examples use stringData"
        for key, value in secret["stringData"].items():
            if SENSITIVE_ENV.search(key.upper().replace("-", "_")):
                assert "CHANGE-ME" in value, f"{ref(secret)} {key}"
    assert example_secrets()["mlflow-db"]["backend-store-uri"] == (
        "postgresql+psycopg2://mlflow:CHANGE-ME@postgres.example.internal:5432/mlflow"
    )


def test_compose_runs_triton_with_the_deployments_flags() -> None:
    """One GPU host (infra/compose) and the cluster serve alike: the same tritonserver flags
    but for the repository's address and the ports Compose names explicitly."""
    compose = yaml.safe_load((INFRA / "compose" / "compose.yaml").read_text())
    deployment = find(render("overlays/gpu"), "Deployment", "triton")

    def flags(argv: list[str]) -> set[str]:
        skip = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")
        return {re.sub(r"\$[({][^)}]*[)}]", "$TOKEN", a) for a in argv if not a.startswith(skip)}

    in_compose = flags(compose["services"]["triton"]["command"])
    in_cluster = flags(command_line(container(deployment, "triton")))
    assert in_compose == in_cluster
