"""Radiologists' per-zone grades as a manifest: ``cxrtune data import --format readers SRC``.

Layout: a folder with a CSV (``scores.csv`` by default, or ``--csv NAME``) and the images in
``images/`` or beside the CSV. The CSV has an ``image`` column (a file name or a path relative to
the CSV) and, per reader ``R``, six grade columns ``R_A`` ... ``R_F`` (Brixia letters, 0-3), e.g.
BrixIA's ``S_A..S_F`` (senior) and ``J_A..J_F`` (junior). The grades land in the manifest as
``reader_R_A`` ... ``reader_R_F`` so that calibration and :mod:`cxrtune.scoring.agreement` can compare the
0-6 score with each reader and the readers with each other (the human yardstick).

Optional CSV columns: ``label``, ``patient_id``, ``view``, ``sex``, ``age``, ``site`` (copied);
``R_affected_0_6`` (cross-checked against the count of zones graded above 0). Anything else is
ignored. A row with a missing or out-of-range grade, a disagreeing ``R_affected_0_6``, an unknown
label or a missing image file is excluded with its reason, never imported half-graded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from ..dicom import pseudonym, pseudonym_key
from ..errors import CxrtuneError
from ..zones import ZONE_LETTERS
from . import manifest
from .import_registry import IMAGE_SUFFIXES, ImportResult, importer
from .pseudonymised import copy_pseudonymised, file_pseudonym, output_folder

log = logging.getLogger(__name__)


GRADE_COLUMN = re.compile(r"^([A-Za-z0-9]+)_([A-F])$")
# ``zone_A``.. are the manifest's own 0/1 zone columns, not a reader called "zone".
RESERVED_READERS = {"zone", "reader", "grade", "lung", "opacity"}
COPIED_COLUMNS = ("sex", "age", "site", "view")


def grade_columns(columns) -> dict[str, list[str]]:
    """Reader id -> its six ``R_A..R_F`` column names, for readers with all six zones.

    Raises when a reader has only some zones: a half-graded reader is a layout error, not data.
    """
    found: dict[str, dict[str, str]] = {}
    for col in columns:
        m = GRADE_COLUMN.match(str(col).strip())
        if m and m.group(1).lower() not in RESERVED_READERS:
            found.setdefault(m.group(1), {})[m.group(2)] = col
    partial = {r: sorted(z) for r, z in found.items() if set(z) != set(ZONE_LETTERS)}
    if partial:
        raise CxrtuneError("reader(s) without all six zone columns A-F: "
                           + "; ".join(f"{r} has {', '.join(z)}" for r, z in sorted(partial.items())))
    return {r: [z[k] for k in ZONE_LETTERS] for r, z in sorted(found.items())}


def _grade(value) -> int | None:
    """A 0-3 grade from a CSV cell, or None when missing, not an integer or out of range."""
    text = str(value).strip()
    if text == "" or text.lower() in {"nan", "na", "none"}:
        return None
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or not 0 <= number <= 3:
        return None
    return int(number)


def _find_image(name: str, folder: Path) -> Path | None:
    rel = Path(name)
    for candidate in (folder / rel, folder / "images" / rel, folder / "images" / rel.name, folder / rel.name):
        if candidate.is_file():
            return candidate.resolve()
    return None


def _locate_csv(src: str, csv: str | None) -> Path:
    path = Path(src)
    if path.is_file():
        return path.resolve()
    if not path.is_dir():
        raise CxrtuneError(f"{src}: folder not found")
    table = path / (csv or "scores.csv")
    if not table.is_file():
        raise CxrtuneError(f"{table}: reader-score CSV not found (pass --csv NAME for another file name)")
    return table.resolve()


@importer("readers")
def import_readers(  # noqa: C901 - one refusal per malformed CSV case, each naming the row
        src: str, data_dir: str | None = None, progress: bool = True, csv: str | None = None,
        default_label: str | None = None, source: str | None = None, pseudonym_key_file: str | None = None,
        **_) -> ImportResult:
    """Images + a CSV of per-zone reader grades -> manifest rows with ``reader_<R>_<zone>`` columns.

    ``src`` is the folder (or the CSV itself). Labels come from a ``label`` column, else
    ``default_label``, else stay empty (unlabelled: fine for calibration and agreement, which
    need no diagnosis). ``source`` defaults to the folder's name (e.g. ``brixia-dev``).

    As for the folder importer, the study key is needed: patient ids (the CSV's, else the image's
    file name) become keyed pseudonyms, images are copied to ``data_dir/images/<file
    pseudonym>-<hash><suffix>``, and excluded rows are named by their CSV row number.
    """
    key = pseudonym_key(pseudonym_key_file)  # refuse before touching any file
    table_path = _locate_csv(src, csv)
    folder = table_path.parent
    if default_label is not None and default_label not in manifest.LABELS:
        raise CxrtuneError(f"--default-label {default_label!r} is not one of {', '.join(manifest.LABELS)}")
    table = manifest.read_csv_table(table_path.read_bytes(), str(table_path))
    table.columns = [str(c).strip() for c in table.columns]
    if "image" not in table.columns:
        raise CxrtuneError(f"{table_path}: needs an 'image' column (columns: {', '.join(table.columns)})")
    readers = grade_columns(table.columns)
    if not readers:
        raise CxrtuneError(f"{table_path}: no reader grade columns; expected <READER>_A ... <READER>_F "
                           "(e.g. S_A..S_F), graded 0-3")
    out = output_folder(data_dir, folder)
    source = source or folder.name
    rows, excluded, seen = [], [], set()
    written: set[Path] = set()
    for number, rec in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        where = f"{table_path.name} row {number}"
        name = str(rec["image"]).strip()
        problems = []
        grades: dict[str, list[int]] = {}
        for r, cols in readers.items():
            values = [_grade(rec[c]) for c in cols]
            bad = [f"{c}={rec[c]!r}" for c, v in zip(cols, values) if v is None]
            if bad:
                problems.append(f"reader {r}: missing or out-of-range grade(s) {', '.join(bad)} (need 0-3)")
                continue
            grades[r] = [int(v) for v in values if v is not None]
            stated = str(rec.get(f"{r}_affected_0_6", "")).strip()
            if stated:
                count = sum(v > 0 for v in grades[r])
                try:
                    agrees = float(stated) == count
                except ValueError:
                    agrees = False
                if not agrees:
                    problems.append(f"reader {r}: {r}_affected_0_6={stated!r} but {count} zone(s) graded above 0")
        label = str(rec.get("label", "")).strip() or default_label or ""
        if label and label not in manifest.LABELS:
            problems.append(f"unknown label {label!r}; use one of {', '.join(manifest.LABELS)}")
        image = _find_image(name, folder) if name else None
        if not name:
            problems.append("empty image name")
        elif image is None:
            problems.append("image file not found (looked beside the CSV and in its images/ folder)")
        elif image.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append("not a PNG or JPEG image (by its file name's extension)")
        elif str(image) in seen:
            problems.append("duplicate: the image is listed more than once; the first row is kept")
        if problems or image is None:
            excluded.append({"file": where, "reason": "; ".join(problems)})
            continue
        seen.add(str(image))
        file_id = file_pseudonym(image, folder, key) if image.is_relative_to(folder) else pseudonym(name, "file", key)
        try:
            copy = copy_pseudonymised(image, out / "images", file_id, written)
        except CxrtuneError as exc:
            excluded.append({"file": where, "reason": f"unreadable: {exc}"})
            continue
        row = {"image": str(copy), "label": label,
               "patient_id": pseudonym(str(rec.get("patient_id", "")).strip() or image.stem, "patient", key),
               "source": source, "view": "unknown", "eval_only": True}  # radiologists' grades: never trained on
        row.update({c: str(rec[c]).strip() for c in COPIED_COLUMNS if str(rec.get(c, "")).strip()})
        for r, graded in grades.items():
            row.update({f"reader_{r}_{z}": v for z, v in zip(ZONE_LETTERS, graded)})
        rows.append(row)
    if excluded:
        log.info("readers: %d of %d rows excluded", len(excluded), len(table))
    df = manifest.new_manifest(rows)
    if not rows:  # keep the reader columns (typed) even when every row was excluded
        for r in readers:
            for z in ZONE_LETTERS:
                df[f"reader_{r}_{z}"] = pd.Series(dtype="Int64")
    return ImportResult(df, excluded)
