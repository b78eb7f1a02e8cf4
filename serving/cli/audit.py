"""``medimg audit``: a registered model's test-split performance per cohort and per
intersection of cohorts (n, prevalence, AUROC, sensitivity, specificity, ECE, for
ChestX-ray14 the underdiagnosis rate), 95% CIs from a patient-level bootstrap, each
cohort against the largest in seismometer's bands; ``audit.md``, ``audit.html``,
``audit.json`` and ``forest.png`` in ``--out``, logged to the version's MLflow run under
``audit/<dataset>/`` (computation: ``training.audit``; cohorts: ``training.cohorts``).

medimg audit --model chestxray14-densenet121@champion --data-dir /data/chestxray14
medimg audit --model mednist-densenet121/3 --data-dir ~/MedNIST --cohorts cohorts.csv --by site,sex
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
CXR14 = "chestxray14"


def _by(text: str) -> list[str]:
    return list(dict.fromkeys(b.strip() for b in (text or "").split(",") if b.strip()))


def _available(dataset: str, cohorts_csv: str) -> list[str]:
    """The cohort columns this audit can have, known before any image is read."""
    from training.cohorts import CXR14_COLUMNS, csv_columns
    from training.errors import ConfigError

    found = list(CXR14_COLUMNS) if dataset == CXR14 else []
    if cohorts_csv:
        found += [c for c in csv_columns(cohorts_csv) if c not in found]
    elif dataset != CXR14:
        raise ConfigError(
            f"audit: {dataset} has no cohort metadata of its own; pass --cohorts FILE.csv with "
            "a 'path' column (an 'index' column for MedMNIST), optionally 'patient_id', and "
            "one column per attribute"
        )
    return found


def _training_run(tracking_uri: str, uri: str) -> str:
    """The run that logged the model at ``uri`` (``models:/NAME/V`` or ``runs:/ID/...``)."""
    from mlflow import MlflowClient

    if uri.startswith("runs:/"):
        return uri.split("/")[1]
    name, version = uri.removeprefix("models:/").rsplit("/", 1)
    return MlflowClient(tracking_uri).get_model_version(name, version).run_id or ""


def _logged_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    try:
        return dict(MlflowClient(tracking_uri).get_run(run_id).data.params) if run_id else {}
    except Exception as exc:  # a version registered from elsewhere: the defaults
        log.info("audit: no parameters of run %s (%s); data defaults used", run_id, exc)
        return {}


def _data_options(args: argparse.Namespace, dataset: str, params: dict[str, str]):
    """Where the test split is, split as the model's training run split it."""
    from training.config import default_data_dir
    from training.data import DataOptions

    def pick(flag, name: str, kind, default):
        return flag if flag is not None else kind(params.get(name, default))

    return DataOptions(
        dataset=dataset,
        data_dir=args.data_dir or default_data_dir(),
        size=pick(args.size, "size", int, 28),
        cache_dir=args.cache_dir or "",
        val_fraction=pick(args.val_fraction, "val_fraction", float, 0.1),
        test_fraction=pick(args.test_fraction, "test_fraction", float, 0.2),
    )


def _check_dataset(dataset: str, data_dir: str, spec) -> None:
    from training.data import dataset_info
    from training.errors import ConfigError

    info = dataset_info(dataset, data_dir)
    if info.task != spec.task or tuple(info.class_names) != tuple(spec.class_names):
        raise ConfigError(
            f"audit: {dataset} in {data_dir} ({info.task}, classes {list(info.class_names)}) "
            f"does not match the model ({spec.task}, classes {list(spec.class_names)})"
        )


def _predict(module, split, spec, batch_size: int, device: str) -> np.ndarray:
    """Calibrated probabilities (the loaded module returns them), in batches."""
    import torch

    from training.transforms import normalize

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module = module.to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            x = normalize(split.images[start : start + batch_size], spec.mean, spec.std)
            out.append(module(torch.as_tensor(x, device=device)).float().cpu().numpy())
    return np.concatenate(out)


def cmd_audit(args: argparse.Namespace) -> int:
    from training.audit import audit
    from training.audit_report import log_audit, to_markdown, write_audit
    from training.audit_run import file_cohorts, split_cohorts
    from training.config import default_tracking_uri
    from training.data import open_split
    from training.errors import ConfigError, RegistryError
    from training.registry import load_model, resolve_model_uri

    by = _by(args.by)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    uri, what = resolve_model_uri(tracking_uri, model=args.model or "", run_id=args.run_id or "")
    loaded = load_model(tracking_uri, uri)
    spec = loaded.spec
    dataset = (args.dataset or spec.dataset).lower()
    available = _available(dataset, args.cohorts)
    unknown = [b for b in by if b not in available]
    if unknown:
        raise ConfigError(f"--by: no cohort column {', '.join(unknown)}; available: {available}")
    run_id = _training_run(tracking_uri, uri)
    opts = _data_options(args, dataset, _logged_params(tracking_uri, run_id))
    _check_dataset(dataset, opts.data_dir, spec)

    found, paths = file_cohorts(opts, args.cohorts)  # a missing row fails before decoding
    if found is None and args.max_samples:
        raise ConfigError("audit: --max-samples with a MedMNIST data set would renumber rows")
    size, channels = spec.image_size, spec.channels
    split = open_split(
        opts, "test", image_size=size, channels=channels, max_samples=args.max_samples
    )
    cohorts = split_cohorts(split, args.cohorts, found, paths)
    probs = _predict(loaded.module, split, spec, args.batch_size, args.device)
    result = audit(
        spec.task,
        split.labels,
        probs,
        cohorts.select(by),
        patients=cohorts.patients,
        thresholds=spec.thresholds,
        positive_index=spec.positive_index if spec.task.startswith("binary") else 0,
        intersections=args.intersections,
        min_cases=args.min_cases,
        limit=args.limit,
        n_boot=args.n_boot,
        ci=args.ci,
        seed=args.seed,
    )
    used = by or list(cohorts.columns)
    meta = {
        "title": f"{what} on {dataset} (test split)",
        "sources": "; ".join(f"{c}: {s}" for c, s in cohorts.sources.items() if c in used),
        "model": uri,
        "data": f"{dataset} in {opts.data_dir}"
        + (f" ({split.skipped} undecodable skipped)" if split.skipped else ""),
    }
    slug = re.sub(r"[^0-9A-Za-z._-]+", "-", what).strip("-")
    out = Path(args.out or Path("audits") / f"{slug}-{dataset}")
    write_audit(result, out, meta)
    print(to_markdown(result, meta))
    print(f"wrote {out}/ (audit.md, audit.html, audit.json, forest.png)")
    if not args.no_mlflow:
        if not run_id:
            raise RegistryError(
                f"audit: {what} has no MLflow run to log to; the files are in {out} "
                "(--no-mlflow skips logging)"
            )
        log_audit(out, tracking_uri=tracking_uri, run_id=run_id, artifact_path=f"audit/{dataset}")
        print(f"logged to MLflow run {run_id} under audit/{dataset}/")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="performance per cohort and intersection (sex, age band, view, CSV columns) "
        "with patient-level bootstrap CIs and seismometer's ratio bands",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="NAME, NAME/VERSION or NAME@ALIAS of a registered model")
    which.add_argument("--run-id", help="MLflow run id of a training run")
    p.add_argument("--dataset", default="", help="(default: the model's data set)")
    p.add_argument("--data-dir", default="", help="(default $MEDIMG_DATA_DIR or ~/.medmnist)")
    p.add_argument(
        "--cohorts",
        default="",
        help="CSV: 'path' (relative to --data-dir or absolute; MedMNIST: 'index'), optional "
        "'patient_id', one column per attribute (ChestX-ray14: added to its own metadata)",
    )
    p.add_argument(
        "--by",
        default="",
        help="comma-separated cohort columns (default: all; ChestX-ray14: sex,age_band,view)",
    )
    p.add_argument(
        "--intersections",
        choices=("pairs", "all", "none"),
        default="pairs",
        help="also audit each pair of --by columns (default), every combination, or none",
    )
    p.add_argument("--min-cases", type=int, default=10, help="censor smaller cohorts (default 10)")
    p.add_argument(
        "--limit", type=float, default=0.25, help="seismometer's fairness ratio (default 0.25)"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--ci", type=float, default=0.95, help="CI level (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default audits/MODEL-DATASET)")
    p.add_argument("--tracking-uri", default="")
    p.add_argument("--no-mlflow", action="store_true", help="write the files only")
    p.add_argument("--cache-dir", default="", help="decoded image cache (file-based data sets)")
    p.add_argument("--size", type=int, default=None, help="MedMNIST resolution (default: run's)")
    p.add_argument("--val-fraction", type=float, default=None, help="(default: the run's)")
    p.add_argument("--test-fraction", type=float, default=None, help="(default: the run's)")
    p.add_argument("--max-samples", type=int, default=0, help="subsample the test split (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_audit)
