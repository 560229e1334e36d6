"""Turn real dataset layouts into manifests: ``cxrtune data import --format FORMAT SRC --out M``.

Formats (a registry, like SMP's architectures): ``covid-qu-ex``, ``jsrt``, ``folder``, ``dicom``.
Every importer returns an :class:`ImportResult`; one bad file never stops a batch, it is listed in
the exclusion report with its reason.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .. import images, storage
from ..dicom import pseudonym, pseudonym_key, read_dicom, read_header
from ..errors import CxrtuneError, UnsupportedFormatError
from . import (
    manifest,
    readers,  # noqa: F401 - registers the "readers" importer
)
from .import_registry import IMAGE_SUFFIXES as IMAGE_SUFFIXES
from .import_registry import IMPORTERS as IMPORTERS
from .import_registry import ImportResult as ImportResult
from .import_registry import importer
from .pseudonymised import copy_pseudonymised, file_pseudonym, output_folder, write_new

log = logging.getLogger(__name__)
def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise CxrtuneError(f"{path}: {what} folder not found; check SRC and --format")


# ------------------------------------------------------------------------------------ COVID-QU-Ex

COVID_QU_EX_CLASSES = {"COVID-19": "covid", "Non-COVID": "other_pneumonia", "Normal": "normal"}
COVID_QU_EX_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}


@importer("covid-qu-ex")
def import_covid_qu_ex(src: str, data_dir: str | None = None, progress: bool = True, **_) -> ImportResult:
    """The official "Infection Segmentation Data" layout:
    ``{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,lung masks,infection masks}/<name>.png``.

    Official splits are kept in ``split``. Non-COVID infection masks are empty because that
    pneumonia was never outlined: recorded as NOT annotated. Normal masks are annotated empty.
    Each image is its own patient (the dataset has no patient key).
    """
    root = Path(src).resolve()  # manifests hold absolute paths: relative ones follow the manifest
    _require_dir(root, "COVID-QU-Ex")
    rows, excluded = [], []
    dirs = [(split, cls_dir, label, root / split_dir / cls_dir / "images")
            for split_dir, split in COVID_QU_EX_SPLITS.items() for cls_dir, label in COVID_QU_EX_CLASSES.items()]
    dirs = [d for d in dirs if d[3].is_dir()]
    if not dirs:
        raise CxrtuneError(f"{src}: no {{Train,Val,Test}}/{{COVID-19,Non-COVID,Normal}}/images folders; "
                           "is this the 'Infection Segmentation Data' folder?")
    files = [(split, cls_dir, label, img) for split, cls_dir, label, d in dirs for img in sorted(d.iterdir())
             if img.suffix.lower() in IMAGE_SUFFIXES]
    for split, cls_dir, label, img in tqdm(files, desc="covid-qu-ex", unit="img", disable=not progress):
        lung = img.parent.parent / "lung masks" / img.name
        inf = img.parent.parent / "infection masks" / img.name
        if not lung.exists():
            excluded.append({"file": str(img), "reason": "lung mask missing"})
            continue
        opacity = str(inf) if (label != "other_pneumonia" and inf.exists()) else ""
        rows.append({"image": str(img), "lung_mask": str(lung), "opacity_mask": opacity,
                     "label": label, "patient_id": f"cqe-{cls_dir}-{img.stem}",
                     "source": "covid-qu-ex", "view": "frontal", "split": split})
    return ImportResult(manifest.new_manifest(rows), excluded)


# ------------------------------------------------------------------------------------------- JSRT

@importer("jsrt")
def import_jsrt(src: str, data_dir: str | None = None, progress: bool = True, **_) -> ImportResult:
    """``images/<ID>.png`` + ``masks/{left_lung,right_lung}/<ID>.png`` (SCR masks).

    The two lungs are combined into one lung mask written under ``data_dir/lung_masks``; the
    per-side masks stay in ``lung_mask_right``/``lung_mask_left`` (``left_lung`` is the patient's
    left). Labels: ``JPCLN`` = nodule case, ``JPCNN`` = normal. No opacity annotation.
    """
    root = Path(src).resolve()  # manifests hold absolute paths: relative ones follow the manifest
    _require_dir(root / "images", "JSRT images")
    out = Path(data_dir or ".") / "lung_masks"
    rows, excluded, failed = [], [], []
    files = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for img in tqdm(files, desc="jsrt", unit="img", disable=not progress):
        right = root / "masks" / "right_lung" / img.name
        left = root / "masks" / "left_lung" / img.name
        if not (right.exists() and left.exists()):
            excluded.append({"file": str(img), "reason": "right_lung or left_lung mask missing"})
            continue
        try:
            both = images.read_mask(str(right)) | images.read_mask(str(left))
        except CxrtuneError as exc:
            entry = {"file": str(img), "reason": f"unreadable mask: {exc}"}
            excluded.append(entry)
            failed.append(entry)
            continue
        combined = out / img.name
        images.write_png(str(combined), both)
        label = "nodule" if img.stem.upper().startswith("JPCLN") else "normal"
        rows.append({"image": str(img), "lung_mask": str(combined.resolve()), "opacity_mask": "",
                     "label": label, "patient_id": f"jsrt-{img.stem}", "source": "jsrt", "view": "PA",
                     "lung_mask_right": str(right), "lung_mask_left": str(left)})
    return ImportResult(manifest.new_manifest(rows), excluded, failed)


# ----------------------------------------------------------------------------------------- folder

FOLDER_LABEL_COLUMNS = ("label", "patient_id", "view", "split", "source", "age", "sex", "site",
                        "grade_right", "grade_left", *manifest.ZONE_COLUMNS, "score")


@importer("folder")
def import_folder(src: str, data_dir: str | None = None, progress: bool = True,
                  default_label: str | None = None, pseudonym_key_file: str | None = None, **_) -> ImportResult:
    """``images/``, optional ``lung_masks/`` and ``opacity_masks/`` (same file names as the
    images) and an optional ``labels.csv`` with an ``image`` column (file name) and any of
    ``label, patient_id, view, split, source, age, sex, site, grade_*, zone_A..F, score``.

    A missing opacity mask file means not annotated; an all-zero file means annotated, no opacity.
    Images with no label in labels.csv get ``default_label`` or, without one, are excluded.
    DICOM files are left out, counted in one exclusion line that names none of them: only
    ``--format dicom`` applies the exclusion rules.

    File names and patient ids often name a patient, so, as for DICOM, the study key is needed:
    patient ids (labels.csv's, else the file name) become keyed pseudonyms, images and masks are
    copied to ``data_dir/{images,lung_masks,opacity_masks}/<file pseudonym>-<hash><suffix>``, and
    the exclusion report names a labels.csv row or a file pseudonym, never a name.
    """
    key = pseudonym_key(pseudonym_key_file)  # refuse before touching any file
    root = Path(src).resolve()
    _require_dir(root / "images", "images")
    out = output_folder(data_dir, root)
    labels_csv = root / "labels.csv"
    table: dict[str, dict] = {}
    csv_row: dict[str, int] = {}
    if labels_csv.exists():
        lab = manifest.read_csv_table(labels_csv.read_bytes(), str(labels_csv))
        if "image" not in lab.columns:
            raise CxrtuneError(f"{labels_csv}: needs an 'image' column with the image file names")
        unknown = [c for c in lab.columns if c != "image" and c not in FOLDER_LABEL_COLUMNS]
        if unknown:
            raise CxrtuneError(f"{labels_csv}: unknown column(s) {', '.join(unknown)}; "
                               f"allowed: image, {', '.join(FOLDER_LABEL_COLUMNS)}")
        records = lab.to_dict("records")
        table = {Path(r["image"]).name: r for r in records}
        csv_row = {Path(r["image"]).name: i + 2 for i, r in enumerate(records)}  # as a spreadsheet numbers it
    rows, excluded, failed, dicoms, others = [], [], [], set(), set()  # names left out: counted, never named
    written: set[Path] = set()
    files = sorted(p for p in (root / "images").iterdir() if p.is_file())
    for img in tqdm(files, desc="folder", unit="img", disable=not progress):
        file_id = file_pseudonym(img, root, key)
        try:
            with img.open("rb") as f:
                head = f.read(132)
            kind = images.sniff_format(head)  # by content: extensions lie, and DICOM often has none
        except (OSError, UnsupportedFormatError):
            others.add(img.name)
            continue
        if kind == "dicom":
            dicoms.add(img.name)
            continue
        meta = dict(table.get(img.name, {}))
        meta.pop("image", None)
        if "label" not in meta or not meta["label"]:
            if default_label is None:
                where = f"labels.csv row {csv_row[img.name]}" if img.name in csv_row else file_id
                excluded.append({"file": where, "reason": "no label in labels.csv (or pass --default-label)"})
                continue
            meta["label"] = default_label
        try:
            row = {"image": str(copy_pseudonymised(img, out / "images", file_id, written)), "lung_mask": "",
                   "opacity_mask": ""}
            for column, folder in (("lung_mask", "lung_masks"), ("opacity_mask", "opacity_masks")):
                mask = root / folder / img.name
                mask = mask if mask.exists() else mask.with_suffix(".png")
                if mask.exists():
                    row[column] = str(copy_pseudonymised(mask, out / folder, file_id, written))
        except CxrtuneError as exc:
            entry = {"file": file_id, "reason": f"unreadable: {exc}"}
            excluded.append(entry)
            failed.append(entry)
            continue
        row.update({"source": root.name, "view": "unknown"})
        row.update({k: v for k, v in meta.items() if v != ""})
        row["patient_id"] = pseudonym(meta.get("patient_id") or img.stem, "patient", key)
        rows.append(row)
    if table:
        seen = {img.name for img in files}
        excluded += [{"file": f"labels.csv row {csv_row[m]}", "reason": "listed in labels.csv but no such image"}
                     for m in sorted(set(table) - seen, key=csv_row.__getitem__)]
    if dicoms:  # their names may be a patient's: counted, never listed
        excluded.append({"file": f"{len(dicoms)} DICOM file(s) in images/",
                         "reason": "a folder import takes PNG and JPEG; import DICOM with --format dicom "
                                   "(exclusion rules, pseudonyms)"})
    if others:
        excluded.append({"file": f"{len(others)} other file(s) in images/",
                         "reason": "not a PNG or JPEG image (by their leading bytes), or unreadable"})
    return ImportResult(manifest.new_manifest(rows), excluded, failed)


# ------------------------------------------------------------------------------------------ DICOM

@importer("dicom")
def import_dicom(src: str, data_dir: str | None = None, progress: bool = True, min_age: float = 18.0,
                 keep_derived: bool = False, default_label: str | None = None,
                 pseudonym_key_file: str | None = None, **_) -> ImportResult:
    """A folder tree of DICOM files -> lossless PNGs (16-bit where BitsStored > 8) + manifest.

    Seed 000's rules: first image per AccessionNumber (ordered by series, instance, acquisition
    time; the next one is taken when the first is unreadable), frontal views only, adults only
    (PatientAge, when present), no secondary captures or ``SECONDARY`` images unless
    ``keep_derived`` (``DERIVED\\PRIMARY`` is kept), no non-image DICOM, no unreadable files.

    Needs the study's pseudonym key (``pseudonym_key_file`` or ``$CXRTUNE_PSEUDONYM_KEY``; refused
    without one). Output names, patient ids and the exclusion report's ``file`` column are keyed
    pseudonyms (of the SOPInstanceUID, else of the path relative to ``src``): no identifier and no
    source path reaches the manifest, the report or the logs. Images get ``default_label`` or,
    without one, the empty label (unlabelled: DICOM carries no diagnosis). PNGs are named
    ``<instance pseudonym>-<content hash>.png`` and never overwrite a different file, so several
    imports can share one ``data_dir``.
    """

    key = pseudonym_key(pseudonym_key_file)  # refuse before touching any file
    label = default_label or ""
    if label and label not in manifest.LABELS:
        raise CxrtuneError(f"--default-label {label!r} is not one of {', '.join(manifest.LABELS)}")
    root = Path(src).resolve()  # manifests hold absolute paths: relative ones follow the manifest
    if not root.exists():
        raise CxrtuneError("the DICOM source (SRC) was not found; check the path")  # no path: may name a patient
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out_dir = Path(data_dir or ".") / "images"
    excluded, failed, candidates = [], [], []

    def file_id(path: Path) -> str:
        return file_pseudonym(path, root, key)

    def scrub(message: str, path: Path) -> str:
        """Remove the path and every folder or file name in it from a message."""
        parts = {str(path), path.as_posix(), path.name, root.name,
                 *(path.relative_to(root).parts if path != root else ())}
        for part in sorted((p for p in parts if len(p) >= 3), key=len, reverse=True):
            message = message.replace(part, "<file>")
        return message

    def unreadable(path: Path, exc: Exception, item: str | None = None) -> None:
        # cxrtune's own messages are plain and scrubbed; another library's may quote anything
        why = scrub(str(exc), path) if isinstance(exc, CxrtuneError) else f"{type(exc).__name__} while decoding"
        entry = {"file": item or file_id(path), "reason": f"unreadable: {why}"}
        excluded.append(entry)
        failed.append(entry)

    for path in tqdm(files, desc="dicom headers", unit="file", disable=not progress):
        try:
            header = read_header(path, key=key)
        except Exception as exc:  # noqa: BLE001 - one bad file is that file's exclusion, never the import's end
            unreadable(path, exc)
            continue
        reason = header.exclusion_reason(min_age=min_age, keep_derived=keep_derived)
        if reason:
            excluded.append({"file": header.instance or file_id(path), "reason": scrub(reason, path)})
            continue
        candidates.append((path, header))
    by_accession: dict[str, list] = {}
    for path, header in candidates:
        group_key = header.accession or header.instance or file_id(path)
        by_accession.setdefault(group_key, []).append((path, header))
    rows: list[dict] = []
    written: set[Path] = set()
    for group in tqdm(by_accession.values(), desc="dicom pixels", unit="study", disable=not progress):
        group.sort(key=lambda ph: (ph[1].series_number, ph[1].instance_number, ph[1].acquired, str(ph[0])))
        kept = None
        for path, header in group:
            item = header.instance or file_id(path)
            if kept is not None:
                excluded.append({"file": item, "reason": "not the first image of its accession"
                                 if header.accession else "duplicate of a kept image (same SOPInstanceUID)"})
                continue
            try:
                dcm = read_dicom(path, key=key)
                bits = dcm.header.bits_stored or 8
                arr = (np.round(dcm.pixels * 65535).astype(np.uint16) if bits > 8
                       else np.round(dcm.pixels * 255).astype(np.uint8))
                data = images.encode_png(arr)
            except Exception as exc:  # noqa: BLE001 - one bad file is that file's exclusion, never the import's end
                unreadable(path, exc, item)
                continue  # the next image of the accession is tried
            kept = path
            stem = f"{header.instance or header.accession or 'img'}-{hashlib.sha256(data).hexdigest()[:12]}"
            target = write_new(out_dir, stem, data, written)
            rows.append({"image": str(target.resolve()), "label": label,
                         "patient_id": header.patient or header.instance or file_id(path),
                         "source": "dicom", "view": header.view or "unknown",
                         "age": min(header.age_years, 90.0) if header.age_years is not None else None,
                         "sex": header.sex})
    return ImportResult(manifest.new_manifest(rows), excluded, failed)


def run_import(fmt: str, src: str, out: str, data_dir: str | None = None, progress: bool = True,
               **options) -> ImportResult:
    """Run one importer, write the manifest and, if anything was excluded, a report beside it.

    Paths are written relative to the manifest's folder when every file sits below it (the
    copies of ``dicom``, ``folder`` and ``readers`` imports, by default), else absolute."""
    if fmt not in IMPORTERS:
        raise CxrtuneError(f"unknown --format {fmt!r}; choose one of {', '.join(sorted(IMPORTERS))}")

    data_dir = data_dir or (str(Path(out).resolve().parent) if not storage.is_s3(out) else None)
    if data_dir is None:
        raise CxrtuneError("an S3 --out needs --data-dir (a local folder for converted files); "
                           "push the result with `cxrtune data push`")
    result = IMPORTERS[fmt](src, data_dir=data_dir, progress=progress, **options)
    manifest.validate(result.manifest, out, check_files=True)
    manifest.save_manifest(manifest.relative_beside(result.manifest, out), out)  # the folder can move
    if result.excluded:
        report = pd.DataFrame(result.excluded, columns=["file", "reason"])
        storage.write_text(report_uri(out), report.to_csv(index=False))
    return result


def report_uri(out: str) -> str:
    """Where the exclusion report of the manifest ``out`` goes: beside it, ``NAME.excluded.csv``."""
    base = out.rsplit(".", 1)[0] if out.rsplit("/", 1)[-1].count(".") else out
    return base + ".excluded.csv"

