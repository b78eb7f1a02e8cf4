"""The model card of a registered version, gathered from what training logged to MLflow.

Fields follow the Coalition for Health AI's Applied Model Card (draft v0.2 schema,
github.com/coalition-for-health-ai/mc-schema): BasicInfo, ReleaseInfo, ModelSummary,
UsesAndDirections, Warnings, TrustIngredients, KeyMetrics (UsefulnessUsabilityEfficacy,
FairnessEquity, SafetyReliability; each result a ``ValueJson`` of kind ``estimate_ci``),
Resources; medimg's own numbers (recipe, data checksums, calibration, review guarantee)
are under ``Medimg``. Nothing here is typed by hand: a field without evidence says so::

    python -c "from training.card import gather_card; import json; \
print(json.dumps(gather_card('sqlite:///mlruns/mlflow.db', 'pneumoniamnist-densenet121@champion'), indent=1)[:600])"
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from training.errors import RegistryError
from training.spec import ModelSpec

SCHEMA = "CHAI Applied Model Card, draft v0.2 (https://mc.chai.org/v0.2/schema.xsd)"
ARTIFACTS = {
    "clinical": "reports/clinical_report.json",
    "calibration": "calibration/calibration.json",
    "gate": "gate/decision.json",
    "config": "config/train_config.json",  # the whole TrainConfig, paths included
}
REVIEW_TARGETS = (0.95, 0.99)
REVIEW_DELTA = 0.05
NOT_FOR_CLINICAL_USE = (
    "Research tool. Not a medical device: not cleared or approved by any regulator, not "
    "validated for clinical decisions, diagnosis or treatment."
)


def _artifact(run_id: str, path: str) -> dict | None:
    import mlflow

    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))
    except Exception:  # not logged for this run
        return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_facts(spec: ModelSpec, params: dict[str, str]) -> dict[str, Any]:
    """Split sizes, class counts and file checksums of the data the version was trained on
    (read from the files named by the run's parameters; missing files are said, not guessed)."""
    import numpy as np

    from training.data import FILE_DATASETS, DataOptions, _file_split, npz_path

    data_dir = params.get("data_dir", "")
    facts: dict[str, Any] = {"dataset": spec.dataset, "splits": {}, "files": {}}
    if spec.dataset in FILE_DATASETS:
        opts = DataOptions(
            spec.dataset,
            data_dir,
            val_fraction=float(params.get("val_fraction", 0.1)),
            test_fraction=float(params.get("test_fraction", 0.2)),
        )
        try:
            for split in ("train", "val", "test"):
                files = _file_split(opts, split)
                manifest = "\n".join(files.paths).encode()
                facts["splits"][split] = _counts(spec, files.labels)
                facts["files"][f"{split} file list"] = hashlib.sha256(manifest).hexdigest()
        except Exception as exc:
            facts["unavailable"] = f"{type(exc).__name__}: {exc}"
        return facts
    path = npz_path(spec.dataset, data_dir, int(params.get("size", 28)))
    if not path.is_file():
        facts["unavailable"] = f"{path} is not on this machine"
        return facts
    facts["files"][path.name] = sha256(path)
    with np.load(path) as npz:
        for split in ("train", "val", "test"):
            facts["splits"][split] = _counts(spec, npz[f"{split}_labels"])
    return facts


def _counts(spec: ModelSpec, labels) -> dict[str, Any]:
    import numpy as np

    labels = np.asarray(labels).reshape(len(labels), -1)
    counts = np.bincount(labels[:, 0].astype(int), minlength=spec.num_classes)
    per = labels.sum(0) if spec.multi_label else counts
    return {
        "n": len(labels),
        "per_class": {n: int(c) for n, c in zip(spec.class_names, per, strict=True)},
    }


def estimate(label: str, e: dict | None, unit: str = "") -> dict[str, Any]:
    """A CHAI ``MetricResult``: ``ValueJson`` of kind estimate_ci (or single)."""
    if not e or e.get("value") is None:
        return {
            "Label": label,
            "ValueJson": {"kind": "single", "value": None, "note": "not available"},
        }
    value = {
        "kind": "estimate_ci",
        "estimate": e["value"],
        "lower": e.get("ci_low"),
        "upper": e.get("ci_high"),
    }
    return {"Label": label, "ValueJson": {**value, "level": 95, **({"unit": unit} if unit else {})}}


def review_table(spec: ModelSpec) -> list[dict[str, Any]]:
    """Coverage of the auto-labelling guarantee at the standard targets (calibration split)."""
    if not spec.review:
        return []
    from training.review import label_thresholds

    rows = []
    for target in REVIEW_TARGETS:
        try:
            t = label_thresholds(spec.review, target, REVIEW_DELTA)
            rows.append({"target_accuracy": target, "delta": REVIEW_DELTA, **_jsonable(t)})
        except Exception as exc:  # unreachable at this target: say so
            rows.append({"target_accuracy": target, "delta": REVIEW_DELTA, "unreachable": str(exc)})
    return rows


def _jsonable(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    data = asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else dict(obj)
    return json.loads(json.dumps(data, default=str), parse_constant=lambda _: None)


def gather_card(tracking_uri: str, model_ref: str, data_dir: str = "") -> dict[str, Any]:
    """The card of ``NAME``, ``NAME/VERSION`` or ``NAME@ALIAS`` as a JSON-able dict; the
    data files are looked for in ``data_dir``, else where the run's config says."""
    import mlflow
    from mlflow import MlflowClient

    from training.registry import load_model, resolve_model_uri

    uri, what = resolve_model_uri(tracking_uri, model=model_ref)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    mv = client.get_model_version(name, version)
    if not mv.run_id:
        raise RegistryError(f"{what} has no training run in MLflow: nothing to build a card from")
    run = client.get_run(mv.run_id)
    spec = load_model(tracking_uri, uri).spec
    params, metrics = dict(run.data.params), dict(run.data.metrics)
    found = {key: _artifact(mv.run_id, path) for key, path in ARTIFACTS.items()}
    from training.gate import run_audits

    audits = run_audits(tracking_uri, mv.run_id)
    audit = audits.get(spec.dataset) or next(iter(audits.values()), None)
    clinical, calibration = found["clinical"] or {}, found["calibration"] or {}
    overall = clinical.get("overall", {})
    finding = spec.finding or "each class (one-vs-rest, macro)"
    config = found["config"] or {}
    data = data_facts(
        spec, {**config, **params, "data_dir": data_dir or config.get("data_dir", "")}
    )
    summary = (
        f"DenseNet-121 ({spec.channels}-channel, {spec.image_size} px input) classifying "
        f"{spec.dataset} images ({spec.task}) into {list(spec.class_names)}; the finding is "
        f"{finding}. Outputs calibrated probabilities"
        f"{' (temperature ' + ', '.join(f'{t:.3f}' for t in spec.temperature) + ')' if spec.temperature else ''}"
        f"{' and class activation maps' if spec.cam_name else ''}."
    )
    limitations = _limitations(spec, metrics, data, calibration, audit)
    created = time.strftime("%Y-%m-%d", time.gmtime(mv.creation_timestamp / 1000))
    return {
        "schema": SCHEMA,
        "BasicInfo": {
            "ModelName": name,
            "ModelDeveloper": run.data.tags.get("mlflow.user", ""),
            "DeveloperContact": "",
        },
        "ReleaseInfo": {
            "ReleaseStage": "Research",
            "ReleaseDate": created,
            "ReleaseVersion": str(version),
            "GlobalAvailability": "n/a",
            "RegulatoryApproval": "None",
        },
        "ModelSummary": {
            "Summary": summary,
            "Keywords": [spec.dataset, spec.task, "DenseNet-121", "medimg"],
        },
        "UsesAndDirections": {
            "IntendedUseAndWorkflow": (
                "Research and engineering: auto-labelling a collection with human review of "
                "flagged items, ordering research worklists, validating a model before a "
                "clinical study. " + NOT_FOR_CLINICAL_USE
            ),
            "PrimaryIntendedUsers": "ML engineers and researchers in hospitals and research groups.",
            "HowToUse": "Served by Triton (`medimg serve`); `medimg classify | label | triage | explain`.",
            "TargetedPatientPopulation": _population(spec),
            "CautionedOutOfScopeSettings": (
                "Clinical diagnosis or treatment decisions; patients, devices, sites or image "
                "types unlike the training data; images of another modality or view."
            ),
        },
        "Warnings": {
            "KnownRisksAndLimitations": limitations,
            "KnownBiasesOrEthicalConsiderations": _biases(audit),
            "ClinicalRiskLevel": "Not for clinical use",
        },
        "TrustIngredients": {
            "AISystemFacts": {
                "OutcomesAndOutputs": summary,
                "ModelType": "DenseNet-121 convolutional network (torchvision), trained with Ray Train",
                "InputDataSource": data,
                "OutputAndInputDataTypes": (
                    f"Input: an image (PNG, JPEG, DICOM, .npy), resized to {spec.image_size} px, "
                    f"{spec.channels} channel(s). Output: {spec.num_classes} probabilities."
                ),
                "DevelopmentDataCharacterization": data.get("splits", {}),
                "BiasMitigationApproaches": f"class_weighting={params.get('class_weighting', '?')}, "
                f"sampler={params.get('sampler', '?')}",
                "OngoingMaintenance": "None: retrain and re-audit when the data or site changes.",
                "Security": "See docs/security.md (loopback binding, HTTP guard, repository token).",
                "Transparency": "Open source; every number on this card comes from the MLflow run.",
            },
            "TransparencyInformation": {"FundingSource": "", "StakeholdersConsulted": ""},
        },
        "KeyMetrics": {
            "UsefulnessUsabilityEfficacy": {
                "MetricGoal": f"Discrimination of {finding} on the held-out test split, once.",
                "Results": [
                    estimate("AUROC", overall.get("auc")),
                    *(
                        estimate(k.upper() if len(k) == 3 else k.title(), overall.get(k))
                        for k in ("sensitivity", "specificity", "ppv", "npv")
                    ),
                ],
                "Interpretation": f"At the operating threshold chosen on validation ({_thresholds(spec)}).",
                "TestType": "Retrospective, held-out test split of the public data set.",
                "TestingDataDescription": data.get("splits", {}).get("test", {}),
                "ValidationProcessAndJustification": "95% percentile bootstrap CIs over test cases.",
            },
            "FairnessEquity": _fairness(audit),
            "SafetyReliability": {
                "MetricGoal": "Calibration of the served probabilities (temperature fitted on validation).",
                "Results": [
                    estimate(f"{m.upper()} {when}", (calibration.get(when) or {}).get(m))
                    for when in ("before", "after")
                    for m in ("ece", "brier", "nll")
                ],
            },
        },
        "Resources": {
            "EvaluationReferences": f"MLflow run {mv.run_id}",
            "PeerReviewedPublications": "",
            "PatientConsentOrDisclosure": "N/A (public data set)",
        },
        "Medimg": {
            "model": what,
            "run_id": mv.run_id,
            "recipe": params,
            "config": {
                k: config[k]
                for k in ("data_dir", "size", "val_fraction", "test_fraction")
                if k in config
            },
            "temperature": list(spec.temperature),
            "thresholds": list(spec.thresholds),
            "per_class": clinical.get("per_class", {}),
            "calibration": calibration,
            "review_guarantee": review_table(spec),
            "audit": audit,
            "gate": found["gate"],
            "val": {k: metrics.get(k) for k in ("best_val_auc", "best_val_acc")},
            "test": {k: metrics.get(k) for k in ("test_auc", "test_acc")},
        },
    }


def _population(spec: ModelSpec) -> str:
    try:
        import medmnist

        return str(medmnist.INFO[spec.dataset]["description"])
    except Exception:  # folder / chestxray14: described by its data
        return f"The population of the {spec.dataset} training data."


def _thresholds(spec: ModelSpec) -> str:
    if not spec.thresholds:
        return "arg-max"
    return ", ".join(f"{t:.4f}" for t in spec.thresholds)


def _limitations(spec, metrics, data, calibration, audit) -> list[str]:
    out = [NOT_FOR_CLINICAL_USE]
    val, test = metrics.get("best_val_auc"), metrics.get("test_auc")
    if (
        isinstance(val, float)
        and isinstance(test, float)
        and math.isfinite(val)
        and val - test > 0.01
    ):
        out.append(
            f"Validation and test differ: val AUROC {val:.4f} vs test {test:.4f}. Thresholds, the "
            "temperature and the review guarantee were fitted on validation; their promises "
            "hold only for images exchangeable with it."
        )
    if spec.image_size <= 64:
        out.append(f"Trained on low-resolution images ({spec.image_size} px input).")
    if not calibration:
        out.append("Not calibrated: probabilities are the network's raw outputs.")
    if not audit:
        out.append("No subgroup audit: the data set carries no patient metadata, or none was run.")
    if "unavailable" in data:
        out.append(f"Data facts unavailable: {data['unavailable']}.")
    return out


def _biases(audit: dict | None) -> str:
    if not audit:
        return "Not assessed (no subgroup metadata)."
    flagged = [r for r in audit.get("rows", []) if r.get("band") in ("flagged", "critical")]
    if not flagged:
        return "No cohort outside seismometer's 0.8–1.25 band."
    return "; ".join(f"{r.get('cohort')}: {r.get('band')}" for r in flagged)


def _fairness(audit: dict | None) -> dict[str, Any]:
    if not audit:
        return {
            "MetricGoal": "Subgroup performance",
            "Results": [],
            "Interpretation": "Not evaluated.",
        }
    results = [
        estimate(f"AUROC {r.get('cohort')}", (r.get("metrics") or {}).get("auc"))
        for r in audit.get("rows", [])
    ]
    return {
        "MetricGoal": "AUROC per cohort with patient-level bootstrap CIs",
        "Results": results,
        "Interpretation": _biases(audit),
    }
