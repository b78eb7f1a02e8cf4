"""NIH ChestX-ray14 as distributed (``dataset="chestxray14"``), 14 findings multi-label::

    DIR/Data_Entry_2017.csv          (or Data_Entry_2017_v2020.csv, either .csv.gz)
    DIR/images/*.png                 (or DIR/images_001/images/*.png, images_002/..., ...)
    DIR/train_val_list.txt, DIR/test_list.txt   (optional: the official patient-wise split)

Labels are the 14 findings of :data:`FINDINGS` in the standard (CheXNet) order, 0/1
each; "No Finding" is all zeros. The split is patient-wise: the official lists when
present (a patient found in both is reported; rows in neither are left out), else a ``GroupShuffleSplit`` by
``Patient ID`` with the fixed seed :data:`SPLIT_SEED` (``test_fraction`` of the
patients); val is carved out of train+val by patient the same way (``val_fraction`` of
the whole). The split is made over every row of the label file and only then are rows
without an image file dropped (one warning with their count), so a patient's split never
depends on which image archives were downloaded::

    python -c "from training.chestxray14 import split_files; print(len(split_files('DIR', 'test').paths))"
"""

from __future__ import annotations

import csv
import functools
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import DataError
from training.folder import FileSplit

log = logging.getLogger(__name__)

FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
TASK = "multi-label, binary-class"
LABEL_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
_warned: set[tuple] = set()


@dataclass(frozen=True)
class Entries:
    """The rows of the label file: image names, (N, 14) 0/1 labels, patient IDs."""

    path: Path
    names: np.ndarray
    labels: np.ndarray
    patients: np.ndarray


def label_file(data_dir: str | Path) -> Path:
    """The label file in ``data_dir``; a missing one names every name looked for."""
    root = Path(data_dir).expanduser()
    candidates = [root / f"{n}{gz}" for n in LABEL_FILES for gz in ("", ".gz")]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"chestxray14: no label file in {root}; expected one of "
        f"{', '.join(p.name for p in candidates)}"
    )


def read_csv_rows(path: Path) -> list[list[str]]:
    """Every row of a CSV file (``.gz`` too, a UTF-8 BOM dropped); unreadable: DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            return list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc


@functools.lru_cache(maxsize=4)
def _read(path: Path, mtime_ns: int) -> Entries:
    rows = read_csv_rows(path)
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; required {list(REQUIRED)}, found {header}"
        )
    col = [header.index(c) for c in REQUIRED]
    index = {f: i for i, f in enumerate(FINDINGS)}
    names, patients = [], []
    labels = np.zeros((len(rows) - 1, len(FINDINGS)), dtype=np.int64)
    for n, row in enumerate(rows[1:]):
        if len(row) <= max(col):
            raise DataError(f"{path}: line {n + 2} has {len(row)} field(s), expected {len(header)}")
        name, findings, patient = (row[c].strip() for c in col)
        for finding in findings.split("|"):
            finding = finding.strip()
            if finding in index:
                labels[n, index[finding]] = 1
            elif finding != NO_FINDING:
                raise DataError(
                    f"{path}: line {n + 2} ({name}): unknown finding {finding!r}; expected "
                    f"{NO_FINDING!r} or {', '.join(FINDINGS)}"
                )
        names.append(name)
        patients.append(patient)
    if not names:
        raise DataError(f"{path}: no rows below the header")
    return Entries(path, np.asarray(names), labels, np.asarray(patients))


def read_entries(data_dir: str | Path) -> Entries:
    """The label file's rows (parsed once per process while the file is unchanged)."""
    path = label_file(data_dir).resolve()  # one parse for every link to the same file
    return _read(path, path.stat().st_mtime_ns)


def image_files(data_dir: str | Path) -> dict[str, str]:
    """{image name: path} of the PNGs in ``images/`` and ``images_*/images/``."""
    root = Path(data_dir).expanduser()
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    found: dict[str, str] = {}
    for folder in folders:
        if folder.is_dir():
            found.update((p.name, str(p)) for p in folder.iterdir() if p.suffix.lower() == ".png")
    return found


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _group_split(rows: np.ndarray, groups: np.ndarray, fraction: float) -> tuple:
    from sklearn.model_selection import GroupShuffleSplit

    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=SPLIT_SEED)
    keep, held = next(splitter.split(rows, groups=groups[rows]))
    return rows[keep], rows[held]


def assign_splits(entries: Entries, data_dir: str | Path, val: float, test: float) -> np.ndarray:
    """Split code per row of the label file: 0 train, 1 val, 2 test, -1 in neither list."""
    root = Path(data_dir).expanduser()
    lists = {n: root / f"{n}_list.txt" for n in ("train_val", "test")}
    codes = np.full(len(entries.names), -1, dtype=np.int64)
    if lists["test"].is_file() or lists["train_val"].is_file():
        in_test = np.isin(
            entries.names, sorted(_read_list(lists["test"])) if lists["test"].is_file() else []
        )
        if lists["train_val"].is_file():
            in_trval = np.isin(entries.names, sorted(_read_list(lists["train_val"]))) & ~in_test
        else:
            in_trval = ~in_test
        if not lists["test"].is_file():
            in_test = ~in_trval
        both = np.intersect1d(entries.patients[in_test], entries.patients[in_trval])
        if len(both):
            log.warning(
                "%s: %d patient(s) appear in both %s and %s (e.g. %s): the lists are not "
                "patient-wise",
                root,
                len(both),
                lists["test"].name,
                lists["train_val"].name,
                ", ".join(both[:5]),
            )
        codes[in_test] = 2
        trval = np.flatnonzero(in_trval)
    else:
        trval, held = _group_split(np.arange(len(codes)), entries.patients, test)
        codes[held] = 2
    share = val / max(1e-9, 1.0 - float((codes == 2).mean()))
    if not 0 < share < 1:
        raise DataError(f"chestxray14: val_fraction {val} leaves no training rows in {root}")
    train, held = _group_split(trval, entries.patients, share)
    codes[train], codes[held] = 0, 1
    return codes


def split_files(
    data_dir: str | Path, split: str, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> FileSplit:
    """The image files and (N, 14) labels of one split (rows without an image dropped)."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}")
    entries = read_entries(data_dir)
    files = image_files(data_dir)
    present = np.fromiter((n in files for n in entries.names), bool, len(entries.names))
    root = Path(data_dir).expanduser()
    if not present.any():
        raise DataError(
            f"chestxray14: none of the {len(present)} images of {entries.path.name} found in "
            f"{root / 'images'} or {root / 'images_*' / 'images'}"
        )
    key = (str(entries.path), str(root), int((~present).sum()))
    if key[2] and key not in _warned:
        _warned.add(key)
        log.warning(
            "chestxray14: %d of %d rows of %s have no image file under %s: skipped",
            key[2],
            len(present),
            entries.path.name,
            root,
        )
    codes = assign_splits(entries, root, val_fraction, test_fraction)
    rows = np.flatnonzero((codes == SPLITS.index(split)) & present)
    return FileSplit([files[n] for n in entries.names[rows]], entries.labels[rows])
