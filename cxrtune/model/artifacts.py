"""Checkpoints and bundles on disk or S3: one typed, versioned metadata schema for both.

* A *checkpoint* is a folder: ``model.pt`` (weights), ``meta.json`` (:class:`CheckpointMeta`) and,
  for resuming, ``state.pt``. A run keeps one per epoch and its best epoch in ``best/``.
* A *bundle* is the unit ``cxrtune score``, ``evaluate``, ``calibrate`` and Serve load:
  ``bundle.json`` (:class:`BundleMeta`), ``lung.pt``, ``disease.pt`` (and any ONNX export). It
  carries both stages' checkpoint metadata, the thresholds with how each was calibrated, a model
  card, audits and the SHA-256 of every other file in it.

Bundles are immutable (:func:`publish_bundle`): every command that makes one (``bundle make``,
``calibrate``, ``bundle export``, ``bundle migrate``) writes a new folder, and ``bundle.json`` is
written last: it is the publication (locally the folder appears whole, by a rename). A loader
checks each file against its hash (:func:`read_bundle_file`), so a bundle changed after
publication, or half-written, does not load.

Older bundles still load: ``cxrtune-bundle/1`` (before calibration provenance and model cards),
``/2`` (before the calibrated opacity threshold: they cut Stage II's map at 0.5, as they were
calibrated) and ``/3`` (before file hashes: their files load unchecked) are upgraded in memory on
read, and ``cxrtune bundle migrate URI --out NEW`` writes them sealed. A reader refuses a format
newer than it knows: older code must not score a newer bundle by older rules.

Imports no training code: the trainer, the scorer, ``promote`` and Serve all stand on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__, storage
from ..errors import CxrtuneError
from ..jsonsafe import json_safe
from ..zones import DEFAULT_ZONE_THRESHOLD

CHECKPOINT_FORMAT = "cxrtune-checkpoint/1"
BUNDLE_FORMAT = "cxrtune-bundle/4"  # /4: bundle.json holds every file's SHA-256 and is written last
BUNDLE_FILE = "bundle.json"

DEFAULT_CLS_THRESHOLD = 0.5  # seed 004's T_cls until calibrated
DEFAULT_LUNG_THRESHOLD = 0.5
DEFAULT_OPACITY_THRESHOLD = 0.5  # on Stage II's opacity probability map, until calibrated


def versions() -> dict:
    """Library versions written into every checkpoint and bundle."""
    import segmentation_models_pytorch as smp


    return {"cxrtune": __version__, "torch": torch.__version__, "smp": smp.__version__}


def _from_dict(cls, d: dict, where: str):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def check_format(d: dict, where: str, fmt: str, what: str) -> None:
    """Refuse the mapping ``d`` read from ``where`` unless it is of format ``fmt`` (absent: a file
    written before formats were recorded), naming a newer version of it as such."""
    found = d.get("format", fmt)
    if found != fmt:
        family = fmt.rsplit("/", 1)[0] + "/"
        if isinstance(found, str) and found.startswith(family):
            raise CxrtuneError(f"{where}: format {found!r}, this cxrtune reads {fmt} (a newer cxrtune wrote it?)")
        raise CxrtuneError(f"{where}: not a cxrtune {what} (format {found!r})")


def _versioned(cls, d: dict, where: str, fmt: str, what: str, required: tuple[str, ...]):
    """``cls`` from the mapping ``d`` read from ``where``, if it is of format ``fmt``
    (:func:`check_format`) and holds the ``required`` keys."""
    check_format(d, where, fmt, what)
    missing = [k for k in required if k not in d]
    if missing:
        raise CxrtuneError(f"{where}: {what} metadata lacks {' or '.join(missing)}")
    return _from_dict(cls, d, where)


def read_json_object(folder: str, name: str) -> tuple[dict, str]:
    """The JSON object in ``folder/name`` and that file's URI (for messages naming it)."""
    uri = storage.join(folder, name)
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        raise CxrtuneError(f"{uri}: not valid JSON") from None
    if not isinstance(data, dict):
        raise CxrtuneError(f"{uri}: expected a JSON object")
    return data, uri


@dataclass(frozen=True)
class SearchRecord:
    """How a sweep chose a promoted checkpoint (``cxrtune promote``): stored as ``search`` in its
    ``meta.json`` and ``run.json``, shown in a bundle's model card. ``split_hash`` is the
    manifest's split and tuning assignment when the sweep started (``data.splits.split_hash``)."""
    experiment: str
    trial: str
    pick: str  # the --pick rule, or "best METRIC" for one objective
    space: str  # the space's file (or "embedded default")
    space_definition: dict
    objectives: list
    constraints: list
    sampler: str
    scheduler: str
    seed: int
    split_hash: str
    manifest: str
    retrained: bool
    overrides: dict = field(default_factory=dict)  # promote --set, KEY -> value
    latency_table: str = ""  # the table the pick's front took its measured int8 ms from ("": GMACs)
    latency_table_sha256: str = ""

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "SearchRecord":
        return _from_dict(cls, d, "search")


@dataclass
class CheckpointMeta:
    """``meta.json`` of a checkpoint: what trained it and how its input is prepared."""
    config: dict
    preprocessing: dict
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    monitor: str = ""
    roi: bool = False
    versions: dict = field(default_factory=dict)
    format: str = CHECKPOINT_FORMAT
    run: str = ""  # the run it came from (set when bundled)
    data: dict = field(default_factory=dict)  # what it was trained on: manifest, image counts by split and label
    audits: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # a promoted trial: the sweep, trial, pick rule, space, sampler, seed, split hash

    @property
    def task(self) -> str:
        return self.config["task"]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict, where: str = "meta.json") -> "CheckpointMeta":
        return _versioned(cls, d, where, CHECKPOINT_FORMAT, "checkpoint", ("config", "preprocessing"))


def write_checkpoint_meta(checkpoint_uri: str, meta: CheckpointMeta) -> None:
    """``meta.json`` of a checkpoint, through the typed schema (the one way it is written)."""
    storage.write_text(storage.join(checkpoint_uri, "meta.json"), json.dumps(meta.to_dict(), indent=2))


def read_checkpoint_meta(checkpoint_uri: str) -> CheckpointMeta:
    return CheckpointMeta.from_dict(*read_json_object(checkpoint_uri, "meta.json"))


RUN_FORMAT = "cxrtune-run/1"


@dataclass(frozen=True)
class RunSummary:
    """``run.json`` of a run folder: how its ``best/`` checkpoint came to be.

    A trained run fills ``best``, ``epochs``, ``history`` and ``versions``; a trial promoted from a
    sweep without retraining fills ``promoted_from``, ``trial`` and ``metrics``. Unset fields are
    left out of the file, so each kind keeps its keys."""
    config: dict
    best: dict | None = None
    epochs: int | None = None
    history: list[dict] | None = None
    versions: dict | None = None
    promoted_from: str | None = None
    trial: str | None = None
    metrics: dict | None = None
    train_minutes: float | None = None  # wall-clock training time, where a benchmark measured it
    search: dict | None = None  # a promoted trial: how the sweep chose it (CheckpointMeta.search)
    format: str = RUN_FORMAT

    def to_dict(self) -> dict:
        return json_safe({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_dict(cls, d: dict, where: str = "run.json") -> "RunSummary":
        return _versioned(cls, d, where, RUN_FORMAT, "run summary", ("config",))


def write_run_summary(run_uri: str, summary: RunSummary) -> None:
    """``run.json`` of a run folder, through the typed schema (the one way it is written)."""
    storage.write_text(storage.join(run_uri, "run.json"), json.dumps(summary.to_dict(), indent=2))


def read_run_summary(run_uri: str) -> RunSummary:
    return RunSummary.from_dict(*read_json_object(run_uri, "run.json"))


@dataclass(frozen=True)
class Calibration:
    """How a threshold was chosen: on what, against what, with what result."""
    threshold: float
    method: str  # "min_mae" (zone T), "max_f1" or "specificity" (T_cls), "max_dice" (opacity), "default"
    reference: str = ""  # zone T: "reader:<ID>", "zones", "masks" or "masks+zones"; T_cls: "labels"; opacity: "masks"
    n: int = 0
    manifest: str = ""  # absolute for a local manifest, so that evaluate can tell the same set again
    split: str = ""
    mae: float | None = None
    rmse: float | None = None
    f1: float | None = None
    specificity: float | None = None
    sensitivity: float | None = None
    target: float | None = None  # the asked-for specificity
    dice: float | None = None  # opacity threshold: mean Dice over the images with opacity in their reference
    # T_cls under a limit on the FP rate on Normal (score > 0) of the split's Normal images, at the final thresholds
    normal_fp_limit: float | None = None
    normal_fp_rate: float | None = None
    normal_fp_upper: float | None = None  # its one-sided 95 % upper bound (Clopper-Pearson)
    n_normal: int | None = None
    created: str = ""


@dataclass
class BundleMeta:
    """``bundle.json``. ``zone_threshold`` is T: a zone is affected when the share of its pixels
    that the refined opacity mask covers is >= T (docs/scoring.md)."""
    lung: CheckpointMeta
    disease: CheckpointMeta
    name: str = ""
    created: str = ""
    zone_threshold: float = DEFAULT_ZONE_THRESHOLD
    cls_threshold: float = DEFAULT_CLS_THRESHOLD
    lung_threshold: float = DEFAULT_LUNG_THRESHOLD
    opacity_threshold: float = DEFAULT_OPACITY_THRESHOLD  # Stage II's map >= this is opacity (refinement)
    zone_calibration: Calibration | None = None
    cls_calibration: Calibration | None = None
    opacity_calibration: Calibration | None = None
    model_card: dict = field(default_factory=dict)
    audits: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)  # `cxrtune bundle export onnx`: files and the hashes they match
    versions: dict = field(default_factory=dict)
    format: str = BUNDLE_FORMAT
    migrated_from: str = ""
    files: dict = field(default_factory=dict)  # every other file of the bundle -> its SHA-256 (hex)
    derived_from: dict = field(default_factory=dict)  # the bundle this one was made from: name, bundle_hash

    def stage(self, name: str) -> CheckpointMeta:
        return {"lung": self.lung, "disease": self.disease}[name]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict, where: str = "bundle.json") -> "BundleMeta":
        fmt = d.get("format")
        if fmt == "cxrtune-bundle/1":
            d = _migrate_v1(d)
        elif fmt == "cxrtune-bundle/2":  # cut at 0.5 unless it recorded a calibrated cut
            calibrated = isinstance(d.get("opacity_calibration"), dict)
            d = {**d, "format": BUNDLE_FORMAT, "migrated_from": fmt, "model_card": {},  # rebuilt on read
                 **({} if calibrated else {"opacity_threshold": DEFAULT_OPACITY_THRESHOLD, "opacity_calibration": None})}
        elif fmt == "cxrtune-bundle/3":  # the same fields, no file hashes: its files load unchecked
            d = {**d, "format": BUNDLE_FORMAT, "migrated_from": fmt, "files": {}}
        elif fmt != BUNDLE_FORMAT:
            if isinstance(fmt, str):
                check_format(d, where, BUNDLE_FORMAT, "bundle")  # a newer cxrtune's bundle is named as such
            raise CxrtuneError(f"{where}: not a cxrtune bundle (format {fmt!r})")
        elif not (isinstance(d.get("files"), dict) and {"lung.pt", "disease.pt"} <= set(d["files"])):
            # a /4 bundle is sealed: without its files' hashes, nothing could be checked
            raise CxrtuneError(f"{where}: a {fmt} bundle.json must list the SHA-256 of lung.pt and disease.pt "
                               "under 'files'; not loading it")
        try:
            meta = _from_dict(cls, d, where)
            meta.lung = CheckpointMeta.from_dict(d["lung"], f"{where} lung")
            meta.disease = CheckpointMeta.from_dict(d["disease"], f"{where} disease")
            for key in ("zone_calibration", "cls_calibration", "opacity_calibration"):
                if isinstance(d.get(key), dict):
                    setattr(meta, key, _from_dict(Calibration, d[key], f"{where} {key}"))
        except (KeyError, TypeError) as exc:
            raise CxrtuneError(f"{where}: malformed bundle metadata ({exc})") from None
        return meta


def _migrate_v1(d: dict) -> dict:
    """cxrtune-bundle/1 -> today's: ``calibration`` (zone T against masks) becomes ``zone_calibration``;
    T_cls is recorded as seed 004's default and the opacity cut as 0.5; a model card is written
    from what the bundle holds."""
    d = dict(d)
    old = d.pop("calibration", None) or None
    if old:
        d["zone_calibration"] = {"threshold": d.get("zone_threshold", DEFAULT_ZONE_THRESHOLD), "method": "min_mae",
                                 "reference": "masks", "n": old.get("n", 0), "manifest": old.get("manifest", ""),
                                 "split": old.get("split", ""), "mae": old.get("mae"), "rmse": old.get("rmse")}
    d["cls_calibration"] = None
    d["opacity_threshold"], d["opacity_calibration"] = DEFAULT_OPACITY_THRESHOLD, None
    d["format"] = BUNDLE_FORMAT
    d["migrated_from"] = "cxrtune-bundle/1"
    return d


@dataclass(frozen=True)
class Thresholds:
    """The cuts of the scoring policy, with how each was chosen: T (``zone``), T_cls (``cls``),
    Stage I's (``lung``) and Stage II's opacity map (``opacity``). One value, passed whole, derived
    from bundle.json (which keeps its own keys); change one with :func:`dataclasses.replace`."""
    zone: float = DEFAULT_ZONE_THRESHOLD
    cls: float = DEFAULT_CLS_THRESHOLD
    lung: float = DEFAULT_LUNG_THRESHOLD
    opacity: float = DEFAULT_OPACITY_THRESHOLD
    zone_calibration: Calibration | None = None
    cls_calibration: Calibration | None = None
    opacity_calibration: Calibration | None = None

    @classmethod
    def of(cls, meta: "BundleMeta") -> "Thresholds":
        return cls(zone=float(meta.zone_threshold), cls=float(meta.cls_threshold), lung=float(meta.lung_threshold),
                   opacity=float(meta.opacity_threshold), zone_calibration=meta.zone_calibration,
                   cls_calibration=meta.cls_calibration, opacity_calibration=meta.opacity_calibration)


def read_bundle_meta(uri: str) -> BundleMeta:
    """``bundle.json`` of the bundle folder ``uri``, older formats upgraded in memory.

    Raises:
        CxrtuneError: missing, not JSON, not a bundle, or a format newer than this cxrtune."""
    meta = BundleMeta.from_dict(*read_json_object(uri, BUNDLE_FILE))
    if not meta.model_card:
        meta.model_card = model_card(meta)
    return meta


def bundle_files(meta: BundleMeta) -> list[str]:
    """The files of a bundle besides ``bundle.json``: those it lists with their hashes, or for a
    bundle older than the hashes, the weights and any ONNX export its metadata names."""
    if meta.files:
        return sorted(meta.files)
    names = ["lung.pt", "disease.pt"]
    for stage in ("lung", "disease"):
        for record in (meta.onnx.get(stage), (meta.onnx.get("int8") or {}).get(stage)):
            if isinstance(record, dict) and record.get("file"):
                names.append(str(record["file"]))
    return names


def read_bundle_file(uri: str, name: str, meta: BundleMeta) -> bytes:
    """One file of the bundle at ``uri``, checked against the SHA-256 its ``bundle.json`` lists.

    Raises:
        CxrtuneError: the file is missing, not listed, or not the one published (changed or
            half-written): such a bundle is never loaded."""
    data = storage.read_bytes(storage.join(uri, name))
    if not meta.files and meta.migrated_from:  # read from a /1-/3 bundle.json: no hashes to check against
        return data
    expected = meta.files.get(name)
    if expected is None:
        raise CxrtuneError(f"bundle {meta.name or uri}: {name} is not listed in its bundle.json; not loading it")
    if hashlib.sha256(data).hexdigest() != expected:
        raise CxrtuneError(f"bundle {meta.name or uri}: {name} does not match the SHA-256 in its bundle.json "
                           "(changed after publication, or half-written); not loading it")
    return data


def publish_bundle(out_uri: str, meta: BundleMeta, contents: dict[str, bytes]) -> BundleMeta:
    """Write a new bundle: ``contents`` (file name -> bytes), then ``bundle.json`` with each file's
    SHA-256, last. Bundles are never changed in place: an ``out_uri`` that holds anything is refused.

    Locally the bundle is staged in a hidden folder beside ``out_uri`` and renamed into place, so
    it appears whole or not at all; on S3 ``bundle.json`` is the last object written, and a
    reader without it sees no bundle.

    Returns:
        The metadata written (with ``files``, ``format`` and the model card set)."""
    require_new_bundle(out_uri)
    meta = replace(meta, files={name: hashlib.sha256(data).hexdigest() for name, data in sorted(contents.items())},
                   format=BUNDLE_FORMAT)
    meta = replace(meta, model_card=model_card(meta))
    document = json.dumps(meta.to_dict(), indent=2).encode("utf-8")
    if storage.is_s3(out_uri):
        written = []
        try:
            for name, data in contents.items():
                written.append(storage.join(out_uri, name))
                storage.write_bytes(written[-1], data)
            storage.write_bytes(storage.join(out_uri, BUNDLE_FILE), document)  # the publication
        except Exception:
            for uri in written:  # best effort: leave the name free for the next attempt
                with contextlib.suppress(Exception):
                    storage.delete(uri)
            raise
        return meta
    target = Path(out_uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        for name, data in contents.items():
            storage.write_bytes(str(staging / name), data)
        storage.write_bytes(str(staging / BUNDLE_FILE), document)
        os.chmod(staging, 0o777 & ~storage.UMASK)  # mkdtemp makes 0700; a bundle folder follows the umask
        try:
            os.rename(staging, target)  # replaces only an empty folder; never a bundle
        except OSError as exc:
            require_new_bundle(out_uri)  # written meanwhile by another command: that is the message
            raise CxrtuneError(f"{out_uri}: cannot publish the bundle there ({exc.strerror})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return meta


def folder_name(uri: str) -> str:
    """The last part of a bundle's folder URI: a bundle's default name."""
    return storage.join(uri).rstrip("/").rsplit("/", 1)[-1]


def require_new_bundle(out_uri: str) -> None:
    """Refuse an ``out_uri`` that holds anything: bundles are immutable. Commands call it before
    their work too (calibration, export), so a refusal costs nothing."""
    if any(True for _ in storage.list_keys(out_uri.rstrip("/") + "/" if storage.is_s3(out_uri) else out_uri)):
        if not storage.exists(storage.join(out_uri, BUNDLE_FILE)):
            raise CxrtuneError(f"{out_uri} holds files but no {BUNDLE_FILE}: an upload that did not finish, or "
                               "something else; delete them, or write the bundle to a new --out")
        raise CxrtuneError(f"{out_uri} already holds files; bundles are immutable: write the new bundle to a new --out")


def derive_bundle(src_uri: str, out_uri: str, extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
                  **changes) -> BundleMeta:
    """A new bundle at ``out_uri`` made from the one at ``src_uri``: its files (each checked
    against its hash) plus ``extra``, and its metadata with ``changes`` (thresholds,
    calibrations, audits, ``onnx``). It is named after its folder unless ``name`` is changed, and
    records where it came from (``derived_from``). The source is left as it was. ``drop``: files
    of the source not carried over (an export they no longer describe).

    Raises:
        CxrtuneError: an unknown field, a source that does not verify, or an existing ``out_uri``."""
    require_new_bundle(out_uri)
    meta = read_bundle_meta(src_uri)
    unknown = sorted(set(changes) - {f.name for f in fields(BundleMeta)})
    if unknown:
        raise CxrtuneError(f"bundle.json has no field(s) {', '.join(unknown)}")
    contents = {name: read_bundle_file(src_uri, name, meta) for name in bundle_files(meta) if name not in drop}
    contents.update(extra or {})
    derived = replace(meta, name=folder_name(out_uri), created=now(),
                      derived_from={"name": meta.name, "bundle_hash": bundle_hash(src_uri)}, **changes)
    return publish_bundle(out_uri, derived, contents)


def bundle_hash(uri: str) -> str:
    """Content hash of a bundle's weights and metadata (sha256, first 16 hex digits): what records
    and audit lines name, so that two bundles with the same name are still told apart."""
    h = hashlib.sha256()
    for name in (BUNDLE_FILE, "lung.pt", "disease.pt"):
        h.update(storage.read_bytes(storage.join(uri, name)))
    return h.hexdigest()[:16]


def make_bundle(lung_run: str, disease_run: str, out_uri: str, zone_threshold: float = DEFAULT_ZONE_THRESHOLD,
                cls_threshold: float = DEFAULT_CLS_THRESHOLD, name: str = "", audits: dict | None = None) -> BundleMeta:
    """A new bundle (:func:`publish_bundle`) of each run's best weights and metadata.

    Args:
        lung_run, disease_run: run folders (``train`` or ``promote``) whose ``best/`` checkpoint is
            a ``lung`` and a ``disease`` one.
        zone_threshold, cls_threshold: T and T_cls until ``cxrtune calibrate`` sets them.
        name: the bundle's name; default: the folder's.
        audits: what was checked before publication (release gates).

    Returns:
        The ``bundle.json`` written."""
    require_new_bundle(out_uri)
    stages, contents = {}, {}
    for stage, run in (("lung", lung_run), ("disease", disease_run)):
        meta = read_checkpoint_meta(storage.join(run, "best"))
        if meta.task != stage:
            raise CxrtuneError(f"{run}: a {meta.task!r} run, but --{stage} needs a {stage!r} run")
        meta.run = run
        stages[stage] = meta
        contents[f"{stage}.pt"] = storage.read_bytes(storage.join(run, "best", "model.pt"))
    bundle = BundleMeta(lung=stages["lung"], disease=stages["disease"],
                        name=name or folder_name(out_uri), created=now(),
                        zone_threshold=zone_threshold, cls_threshold=cls_threshold, versions=versions(),
                        audits=dict(audits or {}))
    return publish_bundle(out_uri, bundle, contents)


def migrate_bundle(uri: str, out_uri: str) -> BundleMeta:
    """A copy of an older bundle in the current format, sealed with its files' hashes (weights
    untouched), at ``out_uri``."""
    return derive_bundle(uri, out_uri)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_card(meta: BundleMeta) -> dict:
    """The bundle's model card, from what the bundle knows: data, metrics, calibration, intended
    use and limits. Rewritten whenever the bundle changes, so it never goes stale."""
    def stage_card(m: CheckpointMeta) -> dict:
        model = m.config.get("model", {})
        return {"architecture": f"{model.get('arch')}/{model.get('encoder')}", "input_size": m.preprocessing.get("size"),
                "trained_epochs": m.epoch, "run": m.run,
                "training_data": m.data or {k: m.config.get(k) for k in ("max_train_images", "tuning_subset")
                                            if m.config.get(k)},
                "validation_metrics": {k: v for k, v in m.metrics.items() if k.startswith("val_")},
                **({"search": m.search} if m.search else {})}

    cal = meta.zone_calibration
    return {
        "intended_use": ("Decision support for grading lung opacity on frontal (PA/AP) chest radiographs of "
                         "adults: six equal-area lung zones, a 0-6 severity score and opacity percent. Not a "
                         "diagnosis; a radiologist reviews every result."),
        "limits": [
            "Frontal chest radiographs only; lateral views, CT and paediatric images are out of scope.",
            "Zones are cut at equal areas, not at the Brixia anatomical landmarks: expect some disagreement "
            "with readers from that alone.",
            "A record whose status is not 'scored' has no score: one lung ('partial') or none ('unscored') "
            "was found.",
            "Performance on devices, sites and populations unlike the training data is unknown until measured.",
        ],
        "stages": {"lung": stage_card(meta.lung), "disease": stage_card(meta.disease)},
        "thresholds": {
            "zone_threshold": meta.zone_threshold, "cls_threshold": meta.cls_threshold,
            "opacity_threshold": meta.opacity_threshold,
            "zone_calibration": asdict(cal) if cal else "not calibrated (default T)",
            "cls_calibration": asdict(meta.cls_calibration) if meta.cls_calibration else "not calibrated (default 0.5)",
            "opacity_calibration": (asdict(meta.opacity_calibration) if meta.opacity_calibration
                                    else f"not calibrated (default {DEFAULT_OPACITY_THRESHOLD})"),
        },
        "audits": meta.audits,
        **({"migrated_from": meta.migrated_from} if meta.migrated_from else {}),
    }
