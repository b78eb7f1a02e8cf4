"""``medimg label --target-accuracy`` and ``medimg triage --target-ppv`` against a real
tritonserver serving the tiny classifier whose spec carries review statistics of its val
answers (``reviewed_classifier_repository``): the CSVs follow the thresholds Learn then
Test chooses from the served spec, their sidecars state the guarantee, and an unreachable
target or a model without statistics fails before any image is sent, writing nothing::

    python -m pytest tests/integration/test_label_guarantee.py -q
"""

from __future__ import annotations

import csv
import json
import stat
import subprocess

import pytest
import tritonclient.http as httpclient

from serving.repository.layout import read_config, spec_from_config
from tests.fixtures.triton import reviewed_classifier_repository, server_fixture  # noqa: F401
from training.review import UnreachableTarget, label_thresholds, triage_thresholds

pytestmark = pytest.mark.timeout(300)
REVIEWED, PLAIN = "pneumoniamnist-densenet121", "noreview-densenet121"
DELTA = 0.1

served = server_fixture("reviewed_classifier_repository")


@pytest.fixture(scope="module")
def stats(reviewed_classifier_repository) -> dict:  # noqa: F811
    """The review statistics as the served config holds them."""
    return spec_from_config(read_config(reviewed_classifier_repository / REVIEWED)).review


def _best(compute) -> float:
    """The most that can be guaranteed: what an unreachable target's error names."""
    with pytest.raises(UnreachableTarget) as info:
        compute(0.9999)
    assert 0.0 < info.value.best < 0.9999
    return info.value.best


def _run(medimg_cmd, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*medimg_cmd, *map(str, args)], capture_output=True, text=True, timeout=120
    )


def _on(served, model: str) -> list[str]:
    return ["--url", served.http_url.removeprefix("http://"), "--model", model]


def _inferences(served) -> int:
    client = httpclient.InferenceServerClient(served.http_url.removeprefix("http://"))
    answers = [client.get_inference_statistics(m)["model_stats"][0] for m in (REVIEWED, PLAIN)]
    return sum(int(a["inference_count"]) for a in answers)


def _refused(served, medimg_cmd, out, args: list) -> subprocess.CompletedProcess:
    """Run ``args`` (PLAIN unless they name a model): exit 1, no file, no inference."""
    before = _inferences(served)
    model = [] if "--model" in args else _on(served, PLAIN)
    result = _run(medimg_cmd, *args, *model, "--out", out)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".json").exists()
    assert _inferences(served) == before  # the thresholds came first: nothing was sent
    return result


def test_label_with_a_target_accuracy(served, stats, data_dir, medimg_cmd, tmp_path) -> None:
    target = _best(lambda t: label_thresholds(stats, t, DELTA))
    plan = label_thresholds(stats, target, DELTA)
    out = tmp_path / "labels.csv"
    npz = data_dir / "pneumoniamnist.npz"
    args = ["label", npz, "--split", "test", "--target-accuracy", target, "--delta", DELTA]
    result = _run(medimg_cmd, *args, "--out", out, *_on(served, REVIEWED))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    header = "file label probability needs_review review_threshold prob_normal prob_pneumonia"
    assert list(rows[0]) == header.split() and rows
    for r in rows:
        cut, p = plan.thresholds[r["label"]], float(r["probability"])
        assert r["review_threshold"] == ("" if cut is None else f"{cut:.9g}")
        if cut is None or abs(p - cut) > 1e-6:  # the CSV rounds to 6 decimals
            assert r["needs_review"] == str(cut is None or p < cut).lower(), r
    flagged = sum(r["needs_review"] == "true" for r in rows)
    how = json.loads(out.with_name("labels.csv.json").read_text())
    assert (how["target_accuracy"], how["delta"], how["model"]) == (target, DELTA, REVIEWED)
    assert how["thresholds"] == plan.thresholds and how["needs_review"] == flagged
    assert how["calibration"] == {"split": "val", "n": stats["n"]}
    assert how["expected_auto_fraction"] == pytest.approx(plan.expected_auto_fraction)
    assert "exchangeable" in how["guarantee"]
    assert f"auto-labelled: {len(rows) - flagged} " in result.stdout
    assert f"needs review: {flagged}" in result.stdout

    never = tmp_path / "never" / "labels.csv"
    unreachable = ["label", npz, "--target-accuracy", "0.9999", "--delta", DELTA]
    result = _refused(served, medimg_cmd, never, [*unreachable, *_on(served, REVIEWED)])
    assert f"the highest that can is {target:.4f}" in result.stderr
    result = _refused(served, medimg_cmd, never, ["label", npz, "--target-accuracy", "0.9"])
    assert f"model {PLAIN!r} has no review statistics" in result.stderr
    assert "retrain it" in result.stderr
    both = ["label", npz, "--out", never, "--review-below", "0.9", "--target-accuracy", "0.9"]
    result = _run(medimg_cmd, *both)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_triage_with_a_target_ppv_and_the_models_finding(
    served, stats, data_dir, medimg_cmd, tmp_path
) -> None:
    def ppv(t: float):
        return triage_thresholds(stats, "pneumonia", target_ppv=t, target_npv=None, delta=DELTA)

    target = _best(ppv)
    plan = ppv(target)
    assert plan.urgent_at is not None
    out = tmp_path / "worklist.csv"
    npz = data_dir / "pneumoniamnist.npz"
    args = ["triage", npz, "--split", "test", "--target-ppv", target, "--delta", DELTA]
    result = _run(medimg_cmd, *args, "--out", out, *_on(served, REVIEWED))  # no --finding
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:5] == ["rank", "file", "prob_pneumonia", "label", "bucket"]
    for r in rows:
        p = float(r["prob_pneumonia"])
        if abs(p - plan.urgent_at) > 1e-6:
            assert r["bucket"] == ("urgent" if p >= plan.urgent_at else "uncertain"), r
    sidecar = out.with_name("worklist.csv.json")
    how = json.loads(sidecar.read_text())
    assert (how["finding"], how["target_ppv"], how["urgent_at"]) == (
        "pneumonia",
        target,
        plan.urgent_at,
    )
    urgent = sum(r["bucket"] == "urgent" for r in rows)
    assert how["buckets"] == {"urgent": urgent, "routine": 0, "uncertain": len(rows) - urgent}
    assert f"urgent (P >= {plan.urgent_at:.6g}, PPV >= {target:g}): {urgent}" in result.stdout
    for path in (out, sidecar):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    never = tmp_path / "never.csv"
    unreachable = ["triage", npz, "--target-npv", "0.9999", *_on(served, REVIEWED)]
    result = _refused(served, medimg_cmd, never, unreachable)
    assert "target NPV 0.9999 for pneumonia cannot be guaranteed" in result.stderr
