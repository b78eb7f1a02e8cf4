"""Who each test image belongs to, for ``medimg audit``: cohort columns and patient ids.

- ChestX-ray14: its own label file (``Data_Entry_2017*.csv``), used automatically:
  ``sex`` (``Patient Gender``, M/F), ``age_band`` (``Patient Age`` in years, :data:`AGE_BANDS`;
  an age over :data:`MAX_AGE` -- the 2017 file has a few, data-entry errors the v2020 file
  corrects, its ages are 0..95 -- or an unreadable one is "unknown") and ``view``
  (``View Position``, PA/AP); patients from ``Patient ID``.
- Any file-based data set: a CSV with a ``path`` column (relative to the data directory, or
  absolute; for ChestX-ray14 the image name will do), an optional ``patient_id`` column
  (all images of a patient are resampled together) and one column per attribute. MedMNIST
  ``.npz`` data sets: an ``index`` column (the image's row in the test split) instead.
  An empty value is the cohort "(missing)". A test image without a row is an error naming it::

    python -c "from training.cohorts import age_band; print([age_band(a) for a in ('7', '058Y', '61', '148')])"
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import chestxray14
from training.errors import ConfigError, DataError

log = logging.getLogger(__name__)
AGE_BANDS = ((0, 19, "0-19"), (20, 39, "20-39"), (40, 59, "40-59"), (60, 79, "60-79"))
OLDEST_BAND = "80+"
MAX_AGE = 120  # older: a data error, "unknown"
UNKNOWN = "unknown"
MISSING = "(missing)"
PATH_KEY, INDEX_KEY, PATIENT_KEY = "path", "index", "patient_id"
CXR14_COLUMNS = {"sex": "Patient Gender", "age_band": "Patient Age", "view": "View Position"}
_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*", re.I)
_PER_YEAR = {"": 1, "Y": 1, "M": 12, "W": 52, "D": 365}


@dataclass(frozen=True)
class Cohorts:
    """Per test image: a value per attribute, and the patient (None: each image its own)."""

    columns: dict[str, np.ndarray]
    patients: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)  # column: where its values came from

    def merged(self, other: Cohorts) -> Cohorts:
        """These columns with ``other``'s added (``other`` wins a name both have)."""
        patients = other.patients if other.patients is not None else self.patients
        return Cohorts(
            {**self.columns, **other.columns}, patients, {**self.sources, **other.sources}
        )

    def take(self, index: np.ndarray) -> Cohorts:
        """The rows ``index`` (the images that decoded, or a subsample)."""
        patients = None if self.patients is None else self.patients[index]
        return Cohorts({k: v[index] for k, v in self.columns.items()}, patients, self.sources)

    def select(self, by: Sequence[str]) -> dict[str, np.ndarray]:
        """The columns named in ``by`` (all when empty); an unknown name is an error."""
        unknown = [b for b in by if b not in self.columns]
        if unknown:
            have = ", ".join(f"{c} ({s})" for c, s in self.sources.items()) or "none"
            raise ConfigError(f"--by: no cohort column {', '.join(unknown)}; available: {have}")
        return {b: self.columns[b] for b in (by or self.columns)}


def age_band(age: str) -> str:
    """ "0-19" .. "60-79", "80+" for an age in years ("58", "058Y"; "M", "W", "D": months,
    weeks, days); "unknown" when unreadable or over :data:`MAX_AGE`."""
    match = _AGE.fullmatch(str(age))
    if not match:
        return UNKNOWN
    years = float(match[1]) / _PER_YEAR[match[2].upper()]
    if years > MAX_AGE:
        return UNKNOWN
    return next((label for lo, hi, label in AGE_BANDS if years < hi + 1), OLDEST_BAND)


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = chestxray14.read_csv_rows(path)
    if not rows:
        raise DataError(f"{path}: empty (expected a header row)")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if any(v.strip() for v in r)]
    for row in body:
        if len(row) != len(header):
            raise DataError(f"{path}: a row has {len(row)} field(s), expected {len(header)}: {row}")
    return header, body


def csv_columns(csv_path: str | Path) -> list[str]:
    """The attribute columns of a cohort CSV (its header less the key and patient columns),
    read before any image is: a ``--by`` it lacks fails fast."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"--cohorts {csv_path}: no such file")
    header = _read_csv(path)[0]
    return [h for h in header if h not in (PATH_KEY, INDEX_KEY, PATIENT_KEY)]


def _missing(path: Path, what: str, absent: list[str], total: int) -> DataError:
    shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    return DataError(f"{path}: no row for {len(absent)} of the {total} {what}: {shown}")


def chestxray14_cohorts(data_dir: str | Path, paths: Sequence[str]) -> Cohorts:
    """``sex``, ``age_band``, ``view`` and the patients of the images ``paths`` from the
    data set's own label file."""
    path = chestxray14.label_file(data_dir)
    header, rows = _read_csv(path)
    need = ("Image Index", "Patient ID", *CXR14_COLUMNS.values())
    absent_cols = [c for c in need if c not in header]
    if absent_cols:
        raise DataError(f"{path}: missing column(s) {absent_cols} for the audit; found {header}")
    col = {c: header.index(c) for c in need}
    by_name = {r[col["Image Index"]].strip(): r for r in rows}
    names = [Path(p).name for p in paths]
    absent = [n for n in names if n not in by_name]
    if absent:
        raise _missing(path, "test images", absent, len(names))
    picked = [by_name[n] for n in names]

    def values(column: str) -> np.ndarray:
        return np.array([r[col[column]].strip() or MISSING for r in picked])

    ages = values("Patient Age")
    bands = np.array([age_band(a) for a in ages])
    if (bands == UNKNOWN).any():
        log.warning(
            "%s: %d test image(s) with an age over %d years or unreadable (e.g. %s): age band %r",
            path.name,
            int((bands == UNKNOWN).sum()),
            MAX_AGE,
            ages[bands == UNKNOWN][0],
            UNKNOWN,
        )
    columns = {
        "sex": np.char.upper(values("Patient Gender")),
        "age_band": bands,
        "view": np.char.upper(values("View Position")),
    }
    sources = {k: f"{path.name}: {v}" for k, v in CXR14_COLUMNS.items()}
    return Cohorts(columns, values("Patient ID"), sources)


def _real(path: str | Path) -> str:
    return os.path.realpath(Path(path).expanduser())


def csv_cohorts(
    csv_path: str | Path,
    paths: Sequence[str] | None,
    data_dir: str | Path = "",
    *,
    n: int = 0,
    by_name: bool = False,
) -> Cohorts:
    """Cohort columns from ``csv_path`` for the test images ``paths`` (keyed by ``path``:
    relative to ``data_dir`` or absolute; ``by_name``: a bare file name matches too) or,
    without paths (MedMNIST), for ``n`` images keyed by ``index``."""
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise DataError(f"--cohorts {csv_path}: no such file")
    header, rows = _read_csv(path)
    key = PATH_KEY if paths is not None else INDEX_KEY
    if key not in header:
        what = "each test image's path, relative to --data-dir or absolute"
        what = what if key == PATH_KEY else "each image's row in the test split, from 0"
        raise DataError(f"{path}: missing column {key!r} ({what}); found {header}")
    k = header.index(key)
    table: dict[str, list[str]] = {}
    for row in rows:
        raw = row[k].strip()
        if key == INDEX_KEY:
            if not raw.isdigit():
                raise DataError(f"{path}: {INDEX_KEY} {raw!r} is not a row number")
            names = [str(int(raw))]
        else:
            names = [_real(raw if os.path.isabs(raw) else Path(data_dir).expanduser() / raw)]
            if by_name and "/" not in raw and os.sep not in raw:
                names.append(raw)
        for name in names:
            if name in table and table[name] is not row:
                raise DataError(f"{path}: two rows for {raw!r}")
            table[name] = row
    if paths is None:
        wanted = [str(i) for i in range(n)]
        found = [table.get(w) for w in wanted]
    else:
        wanted = list(paths)
        found = [
            table.get(_real(p)) or (table.get(Path(p).name) if by_name else None) for p in paths
        ]
    absent = [w for w, row in zip(wanted, found, strict=True) if row is None]
    if absent:
        root = Path(data_dir).expanduser()
        shown = [os.path.relpath(a, root) if paths is not None and data_dir else a for a in absent]
        raise _missing(
            path, "test images" if paths is not None else "test rows", shown, len(wanted)
        )
    picked = [r for r in found if r is not None]
    columns = {
        h: np.array([r[i].strip() or MISSING for r in picked])
        for i, h in enumerate(header)
        if h not in (key, PATIENT_KEY)
    }
    patients = None
    if PATIENT_KEY in header:
        i = header.index(PATIENT_KEY)
        patients = np.array([r[i].strip() or f"(row {j})" for j, r in enumerate(picked)])
    return Cohorts(columns, patients, {h: f"{path.name}: {h}" for h in columns})
