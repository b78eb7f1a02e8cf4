"""The subgroup audit (:mod:`training.audit`) as people read it: a Markdown and a
self-contained HTML table, a forest plot (each metric with its CI per cohort), JSON; and
:func:`log_audit`, which logs them to MLflow under ``audit/``::

    python -c "import numpy as np; from training.audit import audit; from training.audit_report import write_audit; \
r = np.random.default_rng(0); y = (r.random(400) < .3).astype(int)[:, None]; p = r.random((400, 1)); \
print(write_audit(audit('binary-class', y, np.c_[1 - p, p], {'sex': r.choice(['F', 'M'], 400)}), 'audit-out'))"
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path

from training.audit import ALL, METRICS, AuditResult, CohortRow
from training.errors import RegistryError
from training.metrics import Estimate

FILES = ("audit.md", "audit.html", "audit.json", "forest.png")
COLORS = {"fine": "tab:green", "flagged": "tab:orange", "critical": "tab:red", "reference": "k"}
SEISMOMETER = (
    "seismometer's fairness audit (epic-open-source/seismometer, "
    "src/seismometer/table/fairness.py, FairnessIcons.get_fairness_icon)"
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, as training.plots
    import matplotlib.pyplot as plt

    return plt


def _num(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


def _value(e: Estimate) -> str:
    if not math.isfinite(e.value):
        return e.note or "n/a"
    ci = f" ({_num(e.ci_low)}–{_num(e.ci_high)})" if math.isfinite(e.ci_low) else " (no CI)"
    return _num(e.value) + ci


def cell(row: CohortRow, metric: str) -> str:
    """One table cell: value (CI), then the ratio to the reference and its band."""
    if row.censored:
        return "censored"
    text = _value(row.metrics[metric])
    b = row.bands.get(metric, "")
    if metric in row.ratios:
        return f"{text} · ×{row.ratios[metric].value:.3f} {b}"
    if b and math.isfinite(row.metrics[metric].value):
        return f"{text} · {b}"
    return text


def _head(result: AuditResult) -> list[str]:
    return ["attribute", "cohort", "n", "patients"] + (
        [] if result.kind == "multi-class" else ["positives"]
    )


def _fixed(result: AuditResult, row: CohortRow) -> list[str]:
    value = row.value + (" ★" if row.reference else "")
    out = [row.attribute, value, str(row.n), str(row.patients)]
    return out + ([] if row.positives is None else [str(row.positives)])


def explanation(result: AuditResult, meta: Mapping[str, str] | None = None) -> list[str]:
    """The paragraphs above the table: what was audited and how to read it."""
    meta = dict(meta or {})
    lo2, lo, hi, hi2 = result.band_edges()
    t = ", ".join(f"{x:.4f}" for x in result.thresholds)
    what = meta.pop("title", f"{result.task} model")
    sources = meta.pop("sources", "")
    lines = [
        f"Subgroup audit: {what}",
        f"{result.n_images} test images of {result.n_patients} patients; task {result.task}. "
        f"Operating point: {result.threshold_source}" + (f" ({t})." if t else "."),
        f"{round(result.ci * 100)}% CIs: percentile bootstrap over {result.n_boot} resamples "
        f"of patients (all images of a patient drawn together; seed {result.seed}). Cohorts "
        f"of fewer than {result.min_cases} images are censored (n only).",
        f"Ratio (×): the cohort's value over its reference's (★, the largest cohort of the "
        f"same attribute or intersection), banded as in {SEISMOMETER} with limit "
        f"{result.limit:g}: fine within {lo:.2f}–{hi:.2f}, flagged within {lo2:.2f}–{hi2:.2f}, "
        "critical beyond. Prevalence is a property of the data: shown, not rated.",
    ]
    if result.kind == "multi-label":
        lines.append(
            "Underdiagnosis rate: images with any finding for which no finding reaches its "
            "threshold (predicted 'No Finding'), as in Seyyed-Kalantari et al., Nature "
            "Medicine 2021."
        )
    if sources:
        lines.append(f"Cohorts from: {sources}.")
    return lines + [f"{k}: {v}" for k, v in meta.items()]


def flagged(result: AuditResult) -> list[str]:
    """One line per flagged or critical ratio, critical first."""
    found = [
        (row.bands[m], f"{row.attribute} = {row.value}: {METRICS[m][0]} ×{r.value:.3f}")
        for row in result.rows
        for m, r in row.ratios.items()
        if row.bands.get(m) in ("flagged", "critical")
    ]
    return [f"{b}: {text}" for b, text in sorted(found, key=lambda x: x[0] != "critical")]


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(result: AuditResult, meta: Mapping[str, str] | None = None) -> str:
    title, *paragraphs = explanation(result, meta)
    head = _head(result) + [METRICS[m][0] for m in result.metrics]
    lines = [f"## {title}", "", *[f"{p}\n" for p in paragraphs]]
    lines += ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    for row in result.rows:
        cells = _fixed(result, row) + [cell(row, m) for m in result.metrics]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    marks = flagged(result)
    lines += ["", "Flagged:" if marks else "Flagged: none.", *[f"- {_md(m)}" for m in marks]]
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.num{text-align:right}tr.all td{font-weight:bold}
.fine{background:#e8f5e9}.flagged{background:#fff3cd}.critical{background:#f8d7da}
.censored{color:#888}.reference{background:#eef}p{max-width:60em}"""


def to_html(result: AuditResult, meta: Mapping[str, str] | None = None) -> str:
    """A self-contained page (inline CSS, no scripts); every value HTML-escaped."""
    esc = html.escape
    title, *paragraphs = explanation(result, meta)
    head = _head(result) + [METRICS[m][0] for m in result.metrics]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h2>{esc(title)}</h2>",
        *[f"<p>{esc(p)}</p>" for p in paragraphs],
        "<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead>",
        "<tbody>",
    ]
    for row in result.rows:
        fixed = _fixed(result, row)
        tds = [f"<td>{esc(c)}</td>" for c in fixed[:2]]
        tds += [f'<td class="num">{esc(c)}</td>' for c in fixed[2:]]
        for m in result.metrics:
            b = "censored" if row.censored else row.bands.get(m, "")
            cls = (
                f' class="{b}"'
                if b in ("fine", "flagged", "critical", "reference", "censored")
                else ""
            )
            tds.append(f"<td{cls}>{esc(cell(row, m))}</td>")
        cls = ' class="all"' if row.attribute == ALL else ""
        out.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    marks = flagged(result)
    out += ["</tbody></table>", f"<h3>Flagged{'' if marks else ': none'}</h3>"]
    out += ["<ul>" + "".join(f"<li>{esc(m)}</li>" for m in marks) + "</ul>"] if marks else []
    return "\n".join([*out, "</body></html>"]) + "\n"


def forest_figure(result: AuditResult):
    """One panel per metric: value and CI per uncensored cohort (colour: the band; black:
    the reference), the value over all images as a dashed line."""
    plt = _pyplot()
    rows = [r for r in result.rows if not r.censored]
    metrics = result.metrics or ("n/a",)
    height = 1.6 + 0.27 * max(1, len(rows))
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(2.6 * len(metrics) + 2.2, height), sharey=True
    )
    axes = list(axes) if len(metrics) > 1 else [axes]
    labels = [("all images" if r.attribute == ALL else f"{r.attribute}: {r.value}") for r in rows]
    for ax, m in zip(axes, metrics, strict=True):
        for y, row in enumerate(rows):
            e = row.metrics.get(m)
            if e is None or not math.isfinite(e.value):
                continue
            color = COLORS.get(row.bands.get(m, ""), "tab:blue" if row.attribute == ALL else "grey")
            lo = e.value - e.ci_low if math.isfinite(e.ci_low) else 0.0
            hi = e.ci_high - e.value if math.isfinite(e.ci_high) else 0.0
            marker = "s" if row.reference or row.attribute == ALL else "o"
            ax.errorbar(e.value, y, xerr=[[lo], [hi]], fmt=marker, color=color, ms=4, capsize=2)
        overall = rows[0].metrics.get(m) if rows and rows[0].attribute == ALL else None
        if overall is not None and math.isfinite(overall.value):
            ax.axvline(overall.value, color="tab:blue", linestyle="--", linewidth=0.8)
        ax.set_title(METRICS.get(m, (m,))[0], fontsize="medium")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels, fontsize="small")
    axes[0].invert_yaxis()
    fig.suptitle(f"Subgroup audit ({round(result.ci * 100)}% CI, patient-level bootstrap)")
    fig.tight_layout()
    return fig


def write_audit(
    result: AuditResult, out_dir: str | Path, meta: Mapping[str, str] | None = None
) -> dict[str, Path]:
    """``audit.md``, ``audit.html``, ``audit.json`` and ``forest.png`` in ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    paths["audit.md"].write_text(to_markdown(result, meta), encoding="utf-8")
    paths["audit.html"].write_text(to_html(result, meta), encoding="utf-8")
    data = {**result.to_dict(), "meta": dict(meta or {}), "flagged": flagged(result)}
    paths["audit.json"].write_text(json.dumps(data, indent=1), encoding="utf-8")
    fig = forest_figure(result)
    fig.savefig(paths["forest.png"], dpi=110)
    _pyplot().close(fig)
    return paths


def log_audit(
    out_dir: str | Path, *, tracking_uri: str = "", run_id: str = "", artifact_path: str = "audit"
) -> str:
    """Log the files of ``out_dir`` under ``artifact_path`` of the run ``run_id`` (the model
    version's training run) or, without one, of the active run; returns the run id."""
    import mlflow

    try:
        if run_id:
            mlflow.MlflowClient(tracking_uri or None).log_artifacts(
                run_id, str(out_dir), artifact_path
            )
            return run_id
        run = mlflow.active_run()
        if run is None:
            raise RegistryError("audit: no MLflow run to log to (no run id, no active run)")
        mlflow.log_artifacts(str(out_dir), artifact_path)
        return run.info.run_id
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"audit: cannot log {out_dir} to MLflow run {run_id}: {exc}") from exc
