"""Offline checks of the Kubernetes manifests in infra/k8s/ (and a lint of all YAML in infra/).

Without a cluster or a network:

- yamllint (``infra/.yamllint.yaml``) on every YAML file under infra/, ``--strict`` on infra/k8s;
- both overlays (and the example Secrets) render with ``kubectl kustomize``; skipped where
  kubectl is absent;
- every core object validates strictly (an unknown field is an error) against the upstream
  schemas of Kubernetes 1.29 and of the newest version ``kubernetes-validate`` bundles; a kind
  without a schema is a failure;
- RayJob, RayCluster, ServiceMonitor and PrometheusRule validate strictly against their CRD
  schemas in ``../shared/k8s-schemas`` (skipped where that folder is absent): the schemas allow
  unknown fields, so ``additionalProperties: false`` is added wherever an object lists
  ``properties`` without ``x-kubernetes-preserve-unknown-fields``;
- what no schema sees: tests/unit/test_infra_k8s_invariants.py.
"""

from __future__ import annotations

import copy
import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.fixtures.k8s import (
    CRD_SCHEMAS,
    EXPECTED_OBJECTS,
    GPU,
    INFRA,
    K8S,
    K8S_VERSIONS,
    NAMESPACE,
    OVERLAYS,
    container,
    core_schema_problems,
    find,
    is_custom_resource,
    of_kind,
    pod_templates,
    ref,
    render,
)


def test_yamllint_infra() -> None:
    config = INFRA / ".yamllint.yaml"
    lint = [sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(config)]
    # every YAML file under infra/ without errors; ours (infra/k8s) without warnings either
    runs = [[*lint, str(INFRA)], [*lint, "--strict", str(K8S), str(config)]]
    for argv in runs:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{shlex.join(argv[1:])}:\n{done.stdout}{done.stderr}"


def test_overlay_renders_the_named_objects(objs: list[dict[str, Any]]) -> None:
    present = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert present >= EXPECTED_OBJECTS, f"missing: {sorted(EXPECTED_OBJECTS - present)}"
    assert not of_kind(objs, "Secret"), (
        "Secrets belong in infra/k8s/examples only: `kubectl apply -k` of an overlay must never "
        "replace real credentials with example values"
    )
    problems = []
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "medimg":
            problems.append(f"{ref(obj)}: label app.kubernetes.io/part-of is not medimg")
        if not labels.get("app.kubernetes.io/name"):
            problems.append(f"{ref(obj)}: no app.kubernetes.io/name label")
        if obj["kind"] != "Namespace" and obj["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{ref(obj)}: namespace is not {NAMESPACE}")
        for where, template in pod_templates(obj):
            pod_labels = template.get("metadata", {}).get("labels", {})
            if pod_labels.get("app.kubernetes.io/part-of") != "medimg" or not pod_labels.get(
                "app.kubernetes.io/name"
            ):
                problems.append(f"{where}: pod labels lack part-of=medimg or name")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Schemas: core kinds (kubernetes-validate) and custom resources (CRD schemas)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("folder", [*(f"overlays/{o}" for o in OVERLAYS), "examples"])
def test_core_objects_validate_strictly(folder: str, version: str) -> None:
    objs = render(folder)
    assert objs
    problems = core_schema_problems(objs, version)
    assert not problems, "\n".join(problems)


def test_core_validation_is_strict() -> None:
    objs = render("overlays/gpu")
    triton = container(find(objs, "Deployment", "triton"), "triton")
    triton["imagePullPolicyy"] = "Always"
    problems = core_schema_problems(objs, "1.29")
    assert len(problems) == 1 and "imagePullPolicyy" in problems[0], problems
    objs.append({"apiVersion": "apps/v1", "kind": "Deploymentt", "metadata": {"name": "x"}})
    assert any("no schema" in p for p in core_schema_problems(objs, "1.29"))


def strict(schema: Any) -> Any:
    """The CRD schema with ``additionalProperties: false`` on every object that lists
    ``properties`` and does not preserve unknown fields (recipe: ../shared/k8s-schemas)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
        if (
            not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


@functools.cache
def crd_validator(api_version: str, kind: str, *, strict_fields: bool = True) -> Any:
    group, _, version = api_version.rpartition("/")
    path = CRD_SCHEMAS / f"{group}_{version}_{kind}.json"
    if not path.is_file():
        return None
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(strict(schema) if strict_fields else schema)


def crd_problems(objs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objs:
        if not is_custom_resource(obj):
            continue
        validator = crd_validator(obj["apiVersion"], obj["kind"])
        if validator is None:
            problems.append(f"{ref(obj)}: no CRD schema for {obj['apiVersion']} {obj['kind']}")
            continue
        for e in sorted(validator.iter_errors(obj), key=str):
            path = "/".join(str(p) for p in e.absolute_path)
            problems.append(f"{ref(obj)} at /{path}: {e.message}")
    return problems


@pytest.fixture
def crd_schemas() -> Path:
    if not CRD_SCHEMAS.is_dir():
        pytest.skip(f"no CRD schemas at {CRD_SCHEMAS} (a ../shared checkout beside the repository)")
    return CRD_SCHEMAS


@pytest.mark.usefixtures("crd_schemas")
def test_custom_resources_validate_strictly(objs: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objs if is_custom_resource(o)}
    assert {"RayJob", "RayCluster", "ServiceMonitor"} <= kinds
    problems = crd_problems(objs)
    assert not problems, "\n".join(problems)


@pytest.mark.usefixtures("crd_schemas")
def test_strict_crd_validation_catches_typos() -> None:
    job = find(render("overlays/gpu"), "RayJob", "medimg-train")
    assert crd_problems([job]) == []
    lax = crd_validator("ray.io/v1", "RayJob", strict_fields=False)

    typo = copy.deepcopy(job)
    group = typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["template"]["spec"]["containers"][0]["resourcez"] = {"limits": {GPU: 1}}
    assert lax.is_valid(typo), "the upstream schema allows unknown fields"
    assert any("resourcez" in p for p in crd_problems([typo]))

    top = copy.deepcopy(job)
    top["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in p for p in crd_problems([top]))

    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    assert any("'four'" in p for p in crd_problems([wrong_type]))

    unknown_kind = copy.deepcopy(job)
    unknown_kind["kind"] = "RayJobb"
    assert any("no CRD schema" in p for p in crd_problems([unknown_kind]))


# ---------------------------------------------------------------------------------------------
# Ray: versions, images, no downloads, the cluster fits the run
