"""CAM examples for the model card: overlays of the first few test images of a
version's data set, drawn in process (``LocalExplainer``), as files beside the card::

    python -c "from serving.explain.card import card_examples; \
print(card_examples('sqlite:///mlruns/mlflow.db', 'pneumoniamnist-densenet121', '1', \
'model_card', count=2, data_dir='../shared/data', params={}))"
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.clients.inputs import collect_items
from serving.explain.maps import LocalExplainer
from serving.explain.overlay import write_overlays
from training.errors import MedimgError

log = logging.getLogger(__name__)
FOLDER = "cam"


def test_paths(
    dataset: str, data_dir: str, size: int, val_fraction: float, test_fraction: float
) -> list[str]:
    """What to hand ``collect_items`` for the test split: the ``.npz`` or the test files."""
    from training.data import FILE_DATASETS, DataOptions, _file_split, npz_path

    if dataset in FILE_DATASETS:
        opts = DataOptions(
            dataset, data_dir, val_fraction=val_fraction, test_fraction=test_fraction
        )
        return list(_file_split(opts, "test").paths)
    return [str(npz_path(dataset, data_dir, size))]


def card_examples(
    tracking_uri: str,
    name: str,
    version: str,
    out_dir: str | Path,
    *,
    count: int,
    data_dir: str,
    params: dict,
) -> list[str]:
    """Overlay PNGs of the first ``count`` test images in ``out_dir/cam/``; their names
    relative to ``out_dir``. [] (with a warning) when the data or the maps are unavailable."""
    from training.registry import load_model

    try:
        loaded = load_model(tracking_uri, f"models:/{name}/{version}")
        spec = loaded.spec
        paths = test_paths(
            spec.dataset,
            data_dir or str(params.get("data_dir", "")),
            int(params.get("size", 28)),
            float(params.get("val_fraction", 0.1)),
            float(params.get("test_fraction", 0.2)),
        )
        items, errors = collect_items(paths[:count] if len(paths) > 1 else paths, "test")
        if errors or not items:
            raise MedimgError("; ".join(errors) or "no test image")
        explained = write_overlays(
            LocalExplainer(loaded), items[:count], Path(out_dir) / FOLDER, mode=0o644
        )
    except MedimgError as exc:
        log.warning("model card: no CAM examples: %s", exc)
        return []
    return [f"{FOLDER}/{e.path.name}" for e in explained if e.path is not None]
