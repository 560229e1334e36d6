"""Files an importer writes under pseudonymous names, so that no source file or folder name (often
a patient's name or record number) reaches a manifest, a report or a log.

Every importer of local, possibly identifying files (``dicom``, ``folder``, ``readers``) names
what it keeps by the keyed pseudonym of the source path plus a content hash, and never replaces a
file: several imports can share one data folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .. import storage
from ..dicom import pseudonym
from ..errors import CxrtuneError, UnsupportedFormatError
from ..images import sniff_format


def file_pseudonym(path: Path, root: Path, key: bytes) -> str:
    """Keyed pseudonym (``fil-…``) of ``path`` relative to ``root``: the same on every machine
    with the study key, so the owner of the key can find the file an exclusion names."""
    rel = path.name if path == root else path.relative_to(root).as_posix()
    return pseudonym(rel, "file", key)


def output_folder(data_dir: str | None, source_root: Path) -> Path:
    """The folder the pseudonymised copies go to: ``data_dir``, never the source folder itself
    (its ``images/`` would then hold both the originals and their copies)."""
    if not data_dir:
        raise CxrtuneError("this import copies files under pseudonymous names and needs a data folder "
                           "(--data-dir, or an --out beside which they go)")
    out = Path(data_dir).resolve()
    if out == source_root:
        raise CxrtuneError("the data folder for the pseudonymised copies is the source folder itself; "
                           "write the manifest elsewhere or pass another --data-dir")
    return out


SUFFIXES = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def copy_pseudonymised(path: Path, out_dir: Path, file_id: str, written: set[Path]) -> Path:
    """Copy ``path`` to ``out_dir/<file_id>-<sha256 of the bytes, 12 hex><suffix>`` and return it.

    The suffix comes from the content (``.png``, ``.jpg``), never from the source name, which may
    carry a patient's name after its dot (``DOE.JOHN_MRN123``).

    Raises:
        CxrtuneError: unreadable, or not a PNG, JPEG or DICOM file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CxrtuneError(f"{file_id}: cannot read it ({exc.strerror})") from None
    try:
        suffix = SUFFIXES[sniff_format(data[:132])]
    except UnsupportedFormatError:
        raise CxrtuneError(f"{file_id}: not a PNG, JPEG or DICOM file") from None
    stem = f"{file_id}-{hashlib.sha256(data).hexdigest()[:12]}"
    return write_new(out_dir, stem, data, written, suffix=suffix)


def write_new(out_dir: Path, stem: str, data: bytes, written: set[Path], suffix: str = ".png") -> Path:
    """Write ``data`` to ``out_dir/stem+suffix``, or ``stem-1+suffix``... when that name holds
    different bytes (another import) or was already used by this import; an existing file with
    the same bytes is reused. A file is never replaced, even by an import running at the same time."""
    n = 0
    while True:
        target = out_dir / (f"{stem}-{n}{suffix}" if n else f"{stem}{suffix}")
        n += 1
        if target in written:
            continue
        if (not target.exists() and _create_new(target, data)) or target.read_bytes() == data:
            written.add(target)
            return target


def _create_new(path: Path, data: bytes) -> bool:
    """Create ``path`` whole, never overwriting (:func:`cxrtune.storage.create_local`)."""
    try:
        return storage.create_local(path, data)
    except OSError as exc:
        raise CxrtuneError(f"{path.name}: cannot write ({exc.strerror})") from None
