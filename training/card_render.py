"""The model card (``training.card``) as Markdown and as one self-contained HTML page,
written next to its JSON and attached to the registered version in MLflow::

    python -c "from training.card import gather_card; from training.card_render import write_card; \
print(write_card(gather_card('sqlite:///mlruns/mlflow.db', 'pneumoniamnist-densenet121@champion'), 'card'))"
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FILES = ("model_card.md", "model_card.html", "model_card.json")


def _value(result: dict) -> str:
    v = result.get("ValueJson", {})
    if v.get("kind") != "estimate_ci" or v.get("estimate") is None:
        return "n/a" + (f" ({v['note']})" if v.get("note") else "")
    lo, hi = v.get("lower"), v.get("upper")
    ci = f" (95% CI {lo:.3f}–{hi:.3f})" if isinstance(lo, float) and isinstance(hi, float) else ""
    return f"{v['estimate']:.4f}{ci}"


def _results(section: dict) -> list[tuple[str, str]]:
    return [(r["Label"], _value(r)) for r in section.get("Results", [])]


def sections(card: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]] | str]]:
    """(title, text or (label, value) rows) in reading order: what both renderers show."""
    uses, warn, facts = (
        card["UsesAndDirections"],
        card["Warnings"],
        card["TrustIngredients"]["AISystemFacts"],
    )
    metrics, medimg = card["KeyMetrics"], card["Medimg"]
    data = facts["InputDataSource"]
    splits = [
        (split, f"{s['n']} images; " + ", ".join(f"{k}: {v}" for k, v in s["per_class"].items()))
        for split, s in data.get("splits", {}).items()
    ]
    review = [
        (
            f"target accuracy {r['target_accuracy']}, δ {r['delta']}",
            r.get("unreachable")
            or json.dumps({k: v for k, v in r.items() if k not in ("target_accuracy", "delta")}),
        )
        for r in medimg.get("review_guarantee", [])
    ]
    recipe = medimg.get("recipe", {})
    keys = (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "weight_decay",
        "scheduler",
        "augment",
        "image_size",
        "seed",
    )
    return [
        ("Summary", card["ModelSummary"]["Summary"]),
        ("Release", [(k, str(v)) for k, v in card["ReleaseInfo"].items()]),
        ("Intended use", uses["IntendedUseAndWorkflow"]),
        ("Out of scope", uses["CautionedOutOfScopeSettings"]),
        ("Population", uses["TargetedPatientPopulation"]),
        ("Data", splits + [(f"sha256 {k}", v) for k, v in data.get("files", {}).items()]),
        ("Recipe", [(k, str(recipe[k])) for k in keys if k in recipe]),
        ("Discrimination (test split)", _results(metrics["UsefulnessUsabilityEfficacy"])),
        ("Calibration (test split)", _results(metrics["SafetyReliability"])),
        ("Review guarantee (auto-labelling, calibration split)", review or "No review statistics."),
        (
            "Subgroups",
            _results(metrics["FairnessEquity"]) or metrics["FairnessEquity"]["Interpretation"],
        ),
        ("Limitations", [("-", x) for x in warn["KnownRisksAndLimitations"]]),
        ("Biases", warn["KnownBiasesOrEthicalConsiderations"]),
    ]


def to_markdown(card: dict[str, Any], examples: Sequence[str] = ()) -> str:
    title = f"# Model card: {card['BasicInfo']['ModelName']} version {card['ReleaseInfo']['ReleaseVersion']}\n"
    out = [title, f"_{card['schema']}_\n"]
    for name, body in sections(card):
        out.append(f"## {name}\n")
        if isinstance(body, str):
            out.append(body + "\n")
        elif body and body[0][0] == "-":
            out.extend(f"- {v}" for _, v in body)
            out.append("")
        else:
            out += ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in body), ""]
    if examples:
        out.append("## Class activation maps (test images)\n")
        out.extend(f"![CAM example]({e})" for e in examples)
    return "\n".join(out) + "\n"


def to_html(card: dict[str, Any], examples: Sequence[str] = ()) -> str:
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Model card: {e(card['BasicInfo']['ModelName'])}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}td,th{border:1px solid #ccc;"
        "padding:2px 6px}table{border-collapse:collapse}</style></head><body>",
        f"<h1>Model card: {e(card['BasicInfo']['ModelName'])} version {e(card['ReleaseInfo']['ReleaseVersion'])}</h1>",
        f"<p><em>{e(card['schema'])}</em></p>",
    ]
    for name, body in sections(card):
        parts.append(f"<h2>{e(name)}</h2>")
        if isinstance(body, str):
            parts.append(f"<p>{e(body)}</p>")
        elif body and body[0][0] == "-":
            parts.append("<ul>" + "".join(f"<li>{e(v)}</li>" for _, v in body) + "</ul>")
        else:
            parts.append(
                "<table>"
                + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in body)
                + "</table>"
            )
    if examples:
        parts.append("<h2>Class activation maps (test images)</h2>")
        parts.extend(f"<img src='{e(x)}' width='320'>" for x in examples)
    return "\n".join([*parts, "</body></html>"]) + "\n"


def write_card(
    card: dict[str, Any], out_dir: str | Path, examples: Sequence[str] = ()
) -> list[Path]:
    """``model_card.md``, ``.html`` and ``.json`` in ``out_dir``; ``examples``: image files
    in ``out_dir`` (relative names) shown in the card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = (
        to_markdown(card, list(examples)),
        to_html(card, list(examples)),
        json.dumps(card, indent=2, default=str),
    )
    paths = [out / name for name in FILES]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text)
    return paths


def attach_card(tracking_uri: str, card: dict[str, Any], out_dir: str | Path) -> str:
    """Log ``out_dir`` under ``model_card/`` of the version's run and tag the version with
    where it is; returns that artifact URI."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = card["Medimg"]["run_id"]
    client.log_artifacts(run_id, str(out_dir), "model_card")
    uri = f"runs:/{run_id}/model_card"
    name, version = card["BasicInfo"]["ModelName"], card["ReleaseInfo"]["ReleaseVersion"]
    client.set_model_version_tag(name, version, "model_card", uri)
    return uri
