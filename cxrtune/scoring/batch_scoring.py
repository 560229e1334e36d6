"""``cxrtune score``: many files through the scoring policy, one JSON line each, as they are made.

Inputs are local files or folders, ``s3://`` prefixes and manifests (their ``image`` column).
Each record is appended to the output and flushed as soon as it exists, so a crash or Ctrl-C
loses nothing already scored, and ``resume`` skips images already in the output. A file that
cannot be read or is refused by the input rules gets a line with ``status: error`` and the
reason; a readable image without lungs gets its ``unscored`` record, as over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .. import storage
from ..data import manifest
from ..errors import CxrtuneError, UnsupportedFormatError
from ..images import sniff_format
from ..preprocessing import Scan, load_scan
from .overlay import encode_overlay
from .record import ErrorRecord
from .scorer import Detail, Scorer

log = logging.getLogger(__name__)

SCORABLE = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MANIFEST_SUFFIXES = (".parquet", ".csv")
S3_UPLOAD_EVERY_S = 30.0  # an S3 --out is re-uploaded at most this often (and at the end), not per batch


def expand_inputs(paths: list[str], manifest_uri: str | None = None) -> list[str]:
    """Files, folders (recursively), ``s3://`` prefixes and manifests -> image URIs, in order."""
    out: list[str] = []
    for p in paths:
        if storage.is_s3(p):
            if p.lower().endswith(SCORABLE):
                out.append(p)
            else:
                out += sorted(u for u in storage.list_keys(p) if u.lower().endswith(SCORABLE))
            continue
        path = Path(p)
        if path.is_dir():
            out += _folder_images(path)
        elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
            out += _manifest_images(p)
        elif path.is_file():
            out.append(str(path))
        else:
            raise CxrtuneError(f"{p}: no such file or folder")
    if manifest_uri:
        out += _manifest_images(manifest_uri)
    if not out:
        raise CxrtuneError("no PNG, JPEG or DICOM files among the given inputs")
    return list(dict.fromkeys(out))


def _folder_images(folder: Path) -> list[str]:
    """The PNG, JPEG and DICOM files under ``folder``: by extension, and, for any other name, by
    their leading bytes (a DICOM file's preamble): PACS exports name files ``IM000001`` or by their
    UIDs (``1.2.840...1234``). A ``DICOMDIR`` (the export's index, DICOM but no image) and what is
    none of these are logged as a count, never by name."""
    images, other = [], 0
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        if f.suffix.lower() in SCORABLE:
            images.append(str(f))
            continue
        try:
            with open(f, "rb") as handle:
                sniff_format(handle.read(132))
            is_image = f.name.upper() != "DICOMDIR"
        except (OSError, UnsupportedFormatError):
            is_image = False
        if is_image:
            images.append(str(f))
        else:
            other += 1
    if other:
        # a count only: a folder's or a file's name may carry a patient's
        log.warning("%d file(s) in a given folder are not PNG, JPEG or DICOM images (or are a DICOMDIR): not scored",
                    other)
    return images


def _manifest_images(uri: str) -> list[str]:
    return list(manifest.load_manifest(uri, check_files=False)["image"])


def complete_lines(out_uri: str) -> list[str]:
    """The whole records of an earlier output (``--resume``); a line cut by a crash is dropped,
    and its image is scored again."""
    if not storage.exists(out_uri):
        return []
    lines = []
    for line in storage.read_text(out_uri).splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "image" in record and not (
                record.get("status") == "error" and record.get("retriable", True)):
            lines.append(line)  # a retriable error (a read that failed, perhaps for a while) is tried again
    return lines


def score_files(scorer: Scorer, uris: list[str], out_uri: str, overlays: str | None = None, resume: bool = False,
                progress: bool = True) -> dict:
    """Score ``uris`` into JSON lines at ``out_uri`` (local, or S3: written through a local file
    uploaded every ``S3_UPLOAD_EVERY_S`` and at the end). Returns counts by status."""
    if not resume and storage.exists(out_uri):
        raise CxrtuneError(f"{out_uri} exists: pass --resume to continue it, or choose another --out")
    kept = complete_lines(out_uri) if resume else []
    done = {json.loads(line)["image"] for line in kept}
    todo = [u for u in uris if u not in done]
    local = out_uri if not storage.is_s3(out_uri) else os.path.join(tempfile.mkdtemp(prefix="cxrtune-score-"),
                                                                   "records.jsonl")
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    if resume:  # start from the whole lines only, so appended records never join a cut one
        storage.write_text(local, "".join(line + "\n" for line in kept))
    counts = {"scored": 0, "partial": 0, "unscored": 0, "error": 0, "skipped": len(uris) - len(todo)}
    uploaded = time.monotonic()
    bar = tqdm(total=len(todo), desc="score", unit="image", disable=not progress)
    try:
        with open(local, "a", encoding="utf-8") as f:
            for chunk in _chunks(todo, max(1, scorer.batch_size)):
                scans, good = [], []
                for uri in chunk:
                    scan_or_error = read_scan(uri)
                    if isinstance(scan_or_error, ErrorRecord):
                        counts["error"] += 1
                        f.write(json.dumps({"image": uri, **scan_or_error.to_dict()}) + "\n")
                    else:
                        scans.append(scan_or_error)
                        good.append(uri)
                scored = score_or_isolate(scorer, scans)
                for uri, scan, outcome in zip(good, scans, scored):
                    if isinstance(outcome, ErrorRecord):
                        counts["error"] += 1
                        f.write(json.dumps({"image": uri, **outcome.to_dict()}) + "\n")
                        continue
                    record, detail = outcome
                    line = {"image": uri, **record}
                    if overlays:
                        # named by a hash of the URI: unique across folders; file names can carry identifiers
                        line["overlay"] = hashlib.sha256(uri.encode()).hexdigest()[:20] + ".overlay.png"
                        try:
                            storage.write_bytes(storage.join(overlays, line["overlay"]),
                                                encode_overlay(scan.image, detail.lungs, detail.opacity, record))
                        except (OSError, CxrtuneError) as exc:  # that image's line; --resume scores it again
                            counts["error"] += 1
                            error = ErrorRecord(error=f"its overlay could not be written ({type(exc).__name__})",
                                                retriable=True)
                            f.write(json.dumps({"image": uri, **error.to_dict()}) + "\n")
                            continue
                    counts[record["status"]] += 1
                    f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if local != out_uri and time.monotonic() - uploaded >= S3_UPLOAD_EVERY_S:
                    storage.write_bytes(out_uri, Path(local).read_bytes())
                    uploaded = time.monotonic()
                bar.update(len(chunk))
    finally:  # a crash or Ctrl-C: what was scored still reaches an S3 --out
        bar.close()
        if local != out_uri:
            _upload_records(local, out_uri)
    return counts


def _upload_records(local: str, out_uri: str) -> None:
    """The local records' last upload to an S3 ``--out``; if it fails they are kept (in a folder
    only this user can read: image URIs may name patients) and the error says where."""
    try:
        storage.write_bytes(out_uri, Path(local).read_bytes())
    except Exception as exc:
        raise CxrtuneError(f"the records could not be uploaded to {out_uri} ({type(exc).__name__}): they are kept "
                           f"in {local}; copy them there, or score again with --resume (it keeps what the last "
                           "upload holds and scores the rest)") from exc
    shutil.rmtree(Path(local).parent, ignore_errors=True)


def read_scan(uri: str) -> Scan | ErrorRecord:
    """One input read and decoded (:func:`load_scan`), or its error line: a file refused for what
    it holds stays refused on ``--resume``; a read that failed (storage, network; already retried
    by :mod:`cxrtune.storage`) is retriable. No failure of one input ends the run."""
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:  # noqa: BLE001 - one input's failure is its line, never the run's end
        why = str(exc) if isinstance(exc, CxrtuneError) else f"read failed ({type(exc).__name__})"
        return ErrorRecord(error=why, retriable=True)
    try:
        return load_scan(data)
    except CxrtuneError as exc:
        return ErrorRecord(error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a decoder's own failure: the file is refused, the run goes on
        log.warning("an input could not be decoded (%s)", type(exc).__name__)  # its name may identify a patient
        return ErrorRecord(error=f"unreadable image ({type(exc).__name__})")


def score_or_isolate(scorer: Scorer, scans: list[Scan]) -> list[tuple[dict, Detail] | ErrorRecord]:
    """The batch scored; if the batch fails, each scan alone, so that one image that breaks the
    networks is that image's (retriable) error line and the others are scored."""
    try:
        return list(scorer.score_scans(scans))
    except Exception:
        if len(scans) == 1:
            log.warning("an image could not be scored", exc_info=True)
            return [ErrorRecord(error="scoring failed", retriable=True)]
        return [outcome for scan in scans for outcome in score_or_isolate(scorer, [scan])]


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
