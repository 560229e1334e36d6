"""The dataset manifest: one table, one row per image, Parquet (CSV accepted).

Columns (``docs/manifest.md`` has the full description):

=================  ==========================================================================
image              image URI (local path, relative to the manifest, or ``s3://``) - required
lung_mask          both-lungs mask URI; empty = not annotated
opacity_mask       opacity (infection) mask URI; empty = NOT ANNOTATED. An annotated image
                   with no opacity has a real, all-zero mask file.
label              one of :data:`LABELS` - required
patient_id         pseudonymous patient key; splits never cut a patient - required
source             dataset name (``covid-qu-ex``, ``jsrt``, ``dicom``, ...)
view               PA, AP, frontal or unknown
split              train, val, test or empty (unassigned)
fold               cross-validation fold, -1 = none
=================  ==========================================================================

Optional: ``lung_mask_right``, ``lung_mask_left`` (per-side masks), ``grade_right``,
``grade_left`` (seed 000, 0-3), ``zone_A`` ... ``zone_F`` (0/1, Brixia letters), ``score`` (0-6),
``age``, ``sex``, ``site``, ``tuning`` (part of the tuning subset), ``eval_only`` (never trained
on: calibration and evaluation only, set by the readers importer), ``reader_<R>_A`` ...
``reader_<R>_F`` (reader ``R``'s Brixia grade 0-3 per zone, empty = not graded; see :func:`reader_grades`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import storage
from ..errors import CxrtuneError, ManifestError
from ..zones import ZONE_LETTERS

log = logging.getLogger(__name__)

LABELS = ("normal", "covid", "other_pneumonia", "pneumonia", "tuberculosis", "nodule", "other_disease")
SPLITS = ("train", "val", "test", "")
ZONE_COLUMNS = tuple(f"zone_{z}" for z in ZONE_LETTERS)
REQUIRED = ("image", "label", "patient_id")
STANDARD = ("image", "lung_mask", "opacity_mask", "label", "patient_id", "source", "view", "split", "fold")
OPTIONAL = ("lung_mask_right", "lung_mask_left", "grade_right", "grade_left", *ZONE_COLUMNS, "score",
            "age", "sex", "site", "tuning", "eval_only")
URI_COLUMNS = ("image", "lung_mask", "opacity_mask", "lung_mask_right", "lung_mask_left")
INT_COLUMNS = ("fold", "grade_right", "grade_left", *ZONE_COLUMNS, "score")
_DEFAULTS = {"lung_mask": "", "opacity_mask": "", "source": "", "view": "unknown", "split": "", "fold": -1}


def is_disease(label: str) -> bool:
    """Stage II's binary target: anything but ``normal``. Only for labelled rows: check
    :func:`is_labelled` first (an unlabelled row is no target at all)."""
    return label != "normal"


def is_labelled(label) -> bool:
    """True for a row with a diagnosis label; False for ``""`` (unlabelled, e.g. a DICOM import
    without ``--default-label``), None or NaN."""
    return isinstance(label, str) and label.strip() != ""


def new_manifest(rows: list[dict]) -> pd.DataFrame:
    """A manifest from row dicts, standard columns first, defaults filled in."""
    df = pd.DataFrame(rows)
    for col in STANDARD:
        if col not in df.columns:
            df[col] = _DEFAULTS.get(col, "")
    for col, default in _DEFAULTS.items():
        df[col] = df[col].fillna(default) if col in df.columns else default
    extra = [c for c in df.columns if c not in STANDARD]
    df = df[list(STANDARD) + extra]
    return _coerce(df)


READER_COLUMN = re.compile(r"^reader_([A-Za-z0-9]+)_([A-F])$")


def _is_reader_column(col) -> bool:
    """``reader_<R>_<zone>``: one reader's 0-3 grades, an integer column like the zones."""
    return bool(READER_COLUMN.match(str(col)))


def is_true(value) -> bool:
    """A manifest flag (``tuning``, ``eval_only``): 1, true or yes, in any case."""
    return str(value).strip().lower() in {"1", "true", "yes"}


def without_eval_only(df: pd.DataFrame) -> pd.DataFrame:
    """The rows a model may train on or be selected by: ``eval_only`` rows (radiologists'
    reference sets such as brixia-dev) are for calibration and evaluation only."""
    return df[~df["eval_only"].map(is_true)] if "eval_only" in df.columns else df


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    for col in df.columns:
        if col in INT_COLUMNS or _is_reader_column(col):
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
            df[col] = df[col].fillna(-1).astype(int) if col == "fold" else df[col].astype("Int64")
        elif col == "age":
            df[col] = pd.to_numeric(df[col].replace("", np.nan), errors="coerce")
        elif col in ("tuning", "eval_only"):
            df[col] = df[col].map(is_true)
        elif df[col].dtype == object or str(df[col].dtype).startswith("str"):
            df[col] = df[col].fillna("").astype(str)
    return df


def _read_table(uri: str) -> pd.DataFrame:
    data = storage.read_bytes(uri)
    if data[:4] != b"PAR1":
        return read_csv_table(data, uri, "a readable Parquet or CSV manifest")
    try:
        return pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise CxrtuneError(f"{uri}: not a readable Parquet or CSV manifest ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None


def read_csv_table(data: bytes, uri: str, what: str = "a readable CSV table") -> pd.DataFrame:
    """A CSV's cells as text (empty cells as ""), the one way cxrtune reads the CSVs users give
    (manifests, labels.csv, readers' grades). UTF-8, with or without a byte-order mark.

    Raises:
        CxrtuneError: naming ``uri``: not UTF-8 (an Excel export in a Windows code page: save it as
            "CSV UTF-8"), empty, or rows of unequal length (pandas' own words, which quote no cell)."""
    try:
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CxrtuneError(f"{uri}: not {what}: not UTF-8 (byte {exc.start}); save it as CSV UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise CxrtuneError(f"{uri}: not {what} ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_manifest(uri: str, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest. Relative URIs are resolved against the manifest's folder.

    Raises :class:`ManifestError` listing every bad row at once.
    """
    df = _read_table(str(uri))
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(str(uri), [f"missing required column(s): {', '.join(missing)} "
                                       f"(columns present: {', '.join(map(str, df.columns))})"])
    df = new_manifest(df.to_dict("records"))
    base = storage.parent(str(uri))
    for col in URI_COLUMNS:
        if col in df.columns:
            df[col] = [storage.resolve(u, base) for u in df[col]]
    validate(df, str(uri), check_files=check_files)
    df.attrs["source_uri"] = str(uri)
    return df


def validate(df: pd.DataFrame, source: str = "<manifest>", check_files: bool = True) -> None:  # noqa: C901 - one check per column, each naming the rows at fault
    """Check every row; raise one :class:`ManifestError` that lists all problems."""
    problems: list[str] = []

    def where(i: int) -> str:  # a row number only: file names and patient ids can identify a patient
        return f"row {i + 2}"

    df = df.reset_index(drop=True)
    for i, img in enumerate(df["image"]):
        if not img:
            problems.append(f"row {i + 2}: empty image URI")
    for i, label in enumerate(df["label"]):
        if label not in LABELS and label != "":  # "" = unlabelled (see is_labelled)
            problems.append(f"{where(i)}: unknown label {label!r}; use one of {', '.join(LABELS)} "
                            "or leave it empty (unlabelled)")
    for i, pid in enumerate(df["patient_id"]):
        if not str(pid):
            problems.append(f"{where(i)}: empty patient_id (use the image name if each image is its own patient)")
    dup = df["image"][df["image"].duplicated(keep=False) & (df["image"] != "")]
    for img, idx in dup.groupby(dup).groups.items():
        rows = ", ".join(str(j + 2) for j in idx)
        problems.append(f"duplicate image {img} in rows {rows}; each image must appear once")
    for i, split in enumerate(df["split"]):
        if split not in SPLITS:
            problems.append(f"{where(i)}: unknown split {split!r}; use train, val, test or leave empty")
    for col in ZONE_COLUMNS:
        if col in df.columns:
            bad = df.index[df[col].notna() & ~df[col].isin([0, 1])]
            problems += [f"{where(i)}: {col} must be 0 or 1, got {df.at[i, col]}" for i in bad]
    for col in ("grade_right", "grade_left"):
        if col in df.columns:
            bad = df.index[df[col].notna() & ~df[col].isin([0, 1, 2, 3])]
            problems += [f"{where(i)}: {col} must be 0-3, got {df.at[i, col]}" for i in bad]
    assigned = df[df["split"] != ""]
    spread = assigned.groupby("patient_id")["split"].nunique()
    for pid in spread[spread > 1].index:
        rows = assigned.index[assigned.patient_id == pid]
        problems.append(f"rows {', '.join(str(i + 2) for i in rows)}: one patient in several splits "
                        f"({', '.join(sorted(assigned.loc[rows, 'split'].unique()))}); re-run `cxrtune data split`")
    if check_files:
        cols = [c for c in URI_COLUMNS if c in df.columns]
        wanted = {u for c in cols for u in df[c] if u}
        found = storage.existing(wanted)
        for c in cols:
            for i, u in enumerate(df[c]):
                if u and u not in found:
                    problems.append(f"{where(i)}: {c} file not found: {u}")
    problems += [f"{where(i)}: {col} must be 0-3, got {df.at[i, col]}"  # reader grades (readers.py)
                 for col in df.columns if _is_reader_column(col)
                 for i in df.index[df[col].notna() & ~df[col].isin([0, 1, 2, 3])]]
    if problems:
        raise ManifestError(source, problems)


def readers_in(df: pd.DataFrame) -> list[str]:
    """Reader ids with all six ``reader_<R>_A..F`` columns, sorted."""
    zones: dict[str, set] = {}
    for col in df.columns:
        m = READER_COLUMN.match(str(col))
        if m:
            zones.setdefault(m.group(1), set()).add(m.group(2))
    return sorted(r for r, z in zones.items() if z == set(ZONE_LETTERS))


def reader_grades(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Reader id -> N x 6 int grades in zone order A-F; -1 where a grade is missing."""
    return {r: np.column_stack([pd.to_numeric(df[f"reader_{r}_{z}"], errors="coerce").fillna(-1)
                                .to_numpy(dtype=float).astype(int) for z in ZONE_LETTERS]).reshape(len(df), 6)
            for r in readers_in(df)}


def relative_beside(df: pd.DataFrame, target: str) -> pd.DataFrame:
    """``df`` with relative paths when the manifest at ``target`` stays beside all its local files
    (a phantom folder moves as one piece), else as it is."""
    if storage.is_s3(target):
        return df
    base = storage.parent(target)
    local = [u for u in df["image"] if u and not storage.is_s3(u)]
    if local and all(os.path.abspath(u).startswith(base + os.sep) for u in local):
        return relative_to(df, base)
    return df


def save_manifest(df: pd.DataFrame, uri: str) -> None:
    """Write Parquet (``.parquet``) or CSV (anything else), atomically, locally or to S3."""
    uri = str(uri)
    out = df.copy()
    out.attrs = {}
    if uri.endswith(".parquet"):
        buf = io.BytesIO()
        out.to_parquet(buf, index=False)
        data = buf.getvalue()
    else:
        data = out.to_csv(index=False).encode("utf-8")
    storage.write_bytes(uri, data)


def relative_to(df: pd.DataFrame, base: str) -> pd.DataFrame:
    """Rewrite local URIs relative to ``base`` so a folder with its manifest can be moved."""
    out = df.copy()
    for col in URI_COLUMNS:
        if col in out.columns:
            out[col] = [os.path.relpath(u, base) if u and not storage.is_s3(u) else u for u in out[col]]
    return out


# ------------------------------------------------------------------------------------------ push

def _content_key(prefix: str, kind: str, data: bytes, uri: str) -> str:
    ext = Path(storage.split_s3(uri)[1] if storage.is_s3(uri) else uri).suffix.lower() or ".bin"
    return storage.content_key(prefix, kind, data, ext)


def push_manifest(df: pd.DataFrame, dest_prefix: str, out_uri: str, workers: int = 8,
                  progress: bool = True) -> dict:
    """Upload every image and mask under ``dest_prefix`` and write a manifest of S3 URIs.

    Keys are content-addressed (``<prefix>/<kind>/<sha256>.<ext>``): identical files (all the
    empty masks, say) are stored once, re-running a push uploads nothing new, and training
    caches keyed by URI are never stale. Returns counts: ``files`` (distinct source files),
    ``objects`` (distinct keys), ``uploaded`` and ``skipped`` (keys already present).
    """
    if not storage.is_s3(dest_prefix):
        raise CxrtuneError(f"push destination must be s3://bucket/prefix, got {dest_prefix!r}")
    storage.require_bucket(dest_prefix)
    present = set(storage.list_keys(dest_prefix.rstrip("/") + "/"))
    cols = [c for c in URI_COLUMNS if c in df.columns]
    sources = sorted({u for c in cols for u in df[c] if u})
    image_set = set(df["image"])

    def key_of(uri: str) -> tuple[str, str]:
        kind = "images" if uri in image_set else "masks"
        return uri, _content_key(dest_prefix, kind, storage.read_bytes(uri), uri)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        mapping = dict(tqdm(pool.map(key_of, sources), total=len(sources), desc="hash",
                            unit="file", disable=not progress))
        first_source: dict[str, str] = {}
        for uri, key in mapping.items():
            first_source.setdefault(key, uri)
        todo = [(key, uri) for key, uri in first_source.items() if key not in present]
        for _ in tqdm(pool.map(lambda ku: storage.write_bytes(ku[0], storage.read_bytes(ku[1])), todo),
                      total=len(todo), desc="push", unit="file", disable=not progress):
            pass
    out = df.copy()
    for c in cols:
        out[c] = [mapping.get(u, u) if u else "" for u in out[c]]
    save_manifest(out, out_uri)
    return {"files": len(sources), "objects": len(first_source), "uploaded": len(todo),
            "skipped": len(first_source) - len(todo)}
