"""The ``cxrtune`` command line: a thin layer over the library.

Every user error (a :class:`~cxrtune.errors.CxrtuneError`) is printed as one plain message that
names the file or key at fault, with exit code 2 and no traceback (``-v`` shows it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time as _time

import torch
import yaml

from . import images, jsonsafe, resources, storage, zones
from .audit import gates as release_gates
from .audit import grade_cv, heatmaps
from .audit import hide_and_seek as hide_and_seek_audit
from .data import importers, manifest, phantom, splits
from .errors import CxrtuneError
from .model import artifacts, classify, grading
from .model import train as training
from .scoring import batch_scoring, evaluation, onnx_export
from .scoring import scorer as scorers
from .search import report as reports
from .search import search_space, tuning
from .serving import app as serving_app
from .zones import DEFAULT_ZONE_THRESHOLD

log = logging.getLogger("cxrtune")


def _data_import(args) -> None:
    options = {"default_label": args.default_label, "min_age": args.min_age,
               "keep_derived": args.keep_derived, "pseudonym_key_file": args.pseudonym_key_file}
    if args.csv:
        options["csv"] = args.csv
    result = importers.run_import(args.format, args.src, args.out, data_dir=args.data_dir,
                        progress=not args.quiet, **options)
    if result.excluded:
        print(f"exclusion report: {importers.report_uri(args.out)}", file=sys.stderr)
    print(result.summary())


def _data_split(args) -> None:
    df = manifest.load_manifest(args.manifest, check_files=not args.no_check)
    out = splits.assign_splits(df, val=args.val, test=args.test, folds=args.folds, seed=args.seed,
                        tuning_fraction=args.tuning_fraction, keep_test=args.keep_test)
    target = args.out or args.manifest
    manifest.save_manifest(_for_saving(out, target), target)
    print(json.dumps(splits.split_summary(out)))


def _for_saving(df, target: str):
    """Keep relative paths when the manifest stays beside its files (phantom folders)."""
    if storage.is_s3(target):
        return df
    base = storage.parent(target)
    local = [u for u in df["image"] if u and not storage.is_s3(u)]
    if local and all(os.path.abspath(u).startswith(base + os.sep) for u in local):
        return manifest.relative_to(df, base)
    return df


def _data_push(args) -> None:
    df = manifest.load_manifest(args.manifest)
    counts = manifest.push_manifest(df, args.dest, args.out, workers=args.workers,
                                    progress=not args.quiet)
    print(f"pushed {counts['files']} files as {counts['objects']} objects: uploaded "
          f"{counts['uploaded']}, already present {counts['skipped']}; manifest {args.out}")


def _data_phantom(args) -> None:
    df = phantom.write_phantoms(args.out, args.n, size=args.size, seed=args.seed, progress=not args.quiet,
                        shortcut=args.shortcut)
    print(f"wrote {len(df)} phantoms and {os.path.join(args.out, 'manifest.parquet')}")


def _data_validate(args) -> None:
    df = manifest.load_manifest(args.manifest, check_files=not args.no_check)
    print(f"{args.manifest}: {len(df)} rows, valid")


def _parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs (``model.arch=Unet`` for nested keys), values parsed as YAML."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise CxrtuneError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        target = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            target = target.setdefault(p, {})
        target[leaf] = yaml.safe_load(value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}) or {}, v) if isinstance(v, dict) else v
    return out


def embedded_manifest(n: int = 48, size: int = 128) -> str:
    """The embedded default dataset: phantoms in a local cache folder, generated once."""
    root = storage.default_cache_dir() / f"phantoms-n{n}-s{size}"
    target = root / "manifest.parquet"
    if not target.exists():
        print(f"no --manifest: generating {n} phantom CXRs in {root}", file=sys.stderr)
        phantom.write_phantoms(root, n, size=size, seed=0)
    return str(target)


def _train(args) -> None:
    cfg = training.TrainConfig.from_yaml(shipped_or(args.config, "configs"))
    if args.set:
        cfg = training.TrainConfig.from_dict(_merge(cfg.to_dict(), _parse_overrides(args.set)))
    df = manifest.load_manifest(args.manifest or embedded_manifest())
    summary = training.train(cfg, df, args.out, resume=args.resume, progress=not args.quiet)
    best = summary["best"] or {}
    print(f"trained {summary['epochs']} epoch(s); best {cfg.monitor} {best.get('value', float('nan')):.4f} "
          f"at epoch {best.get('epoch')}; run {args.out}")


def _bundle(args) -> None:
    if args.migrate:
        meta = artifacts.migrate_bundle(args.migrate)
        print(f"bundle {args.migrate}: now {meta.format}")
        return
    if args.export:
        fmt, uri = args.export
        if fmt == "onnx":
            rec = onnx_export.export_bundle(uri)
            print(f"bundle {uri}: exported lung.onnx and disease.onnx (opset {rec['opset']})")
            return
        if fmt != "onnx-int8":
            raise CxrtuneError(f"--export {fmt}: the export formats are onnx and onnx-int8")

        if not args.calibration:
            raise CxrtuneError("--export onnx-int8 needs --calibration: radiographs like the ones it will score")
        if args.calibration_limit < onnx_export.INT8_MIN_CALIBRATION:
            raise CxrtuneError(f"--calibration-limit must be at least {onnx_export.INT8_MIN_CALIBRATION}")

        uris = batch_scoring.expand_inputs(args.calibration)
        step = max(1, len(uris) // args.calibration_limit)  # spread over the folders, not the first few files
        data = []
        for u in uris[::step][:args.calibration_limit]:
            try:
                data.append(storage.read_bytes(u))
            except (CxrtuneError, OSError) as exc:
                log.warning("int8 calibration: an input not read (%s)", type(exc).__name__)
        rec = onnx_export.quantize_bundle(uri, data, limit=args.calibration_limit)
        print(f"bundle {uri}: exported lung.int8.onnx and disease.int8.onnx, calibrated on "
              f"{rec['calibration_images']} radiographs (Stage II on {rec['stage2_calibration_images']} lung crops)")
        return
    if not (args.lung and args.disease and args.out):
        raise CxrtuneError("cxrtune bundle needs --lung, --disease and --out (or --migrate URI, "
                           "--export onnx URI, --export onnx-int8 URI --calibration PATHS)")

    gates = [release_gates.parse_gate(g) for g in args.gate or []]
    if gates:  # checked before anything is written
        release_gates.check_gates(gates, bundle=True, manifest=args.gate_manifest)
        if storage.exists(storage.join(args.out, "bundle.json")):
            raise CxrtuneError(f"{args.out} holds a bundle already: a gated bundle goes to a new --out "
                               "(a refused one is deleted)")
    b = artifacts.make_bundle(args.lung, args.disease, args.out, zone_threshold=args.threshold, name=args.name or "")
    if gates:
        try:
            results = release_gates.run_gates(gates, bundle=args.out, manifest=args.gate_manifest, limit=args.gate_limit)
            b = artifacts.update_bundle(args.out, audits={**b.audits, "gates": results})
            release_gates.enforce(results)
        except BaseException:  # refused, or the audit could not run: nothing is left to be served
            for name in ("bundle.json", "lung.pt", "disease.pt"):
                if storage.exists(storage.join(args.out, name)):
                    storage.delete(storage.join(args.out, name))
            raise
        print(f"release gates passed: {', '.join(results)}")
    print(f"bundle {args.out}: lung {b.lung.config['model']['arch']}, disease "
          f"{b.disease.config['model']['arch']}, zone threshold {b.zone_threshold}")


def _calibrate(args) -> None:
    what = tuple(w.strip() for w in args.what.split(","))
    unknown = sorted(set(what) - {"cls", "opacity", "zone"})
    if unknown:
        raise CxrtuneError(f"--what {args.what!r}: choose from cls, opacity and zone (comma-separated)")
    scorer = scorers.load_bundle(args.bundle, device=args.device)
    before = {"cls_threshold": scorer.cls_threshold, "opacity_threshold": scorer.opacity_threshold}
    result = evaluation.calibrate(scorer, manifest.load_manifest(args.manifest), split=args.split, cls_split=args.cls_split,
                       reference=args.reference, reference_threshold=args.reference_threshold,
                       specificity=args.specificity, limit=args.limit, what=what)
    changes = {}
    if result["cls"] is not None:
        c = result["cls"]
        changes.update(cls_threshold=c.threshold, cls_calibration=c)
        print(f"T_cls {c.threshold:.3f} ({c.method}): F1 {c.f1:.3f}, specificity {c.specificity:.3f}, "
              f"sensitivity {c.sensitivity:.3f} on {c.n} labelled images")
    elif "cls" in what:
        print("T_cls unchanged: no labelled normal and disease images in --cls-split", file=sys.stderr)
    if result["opacity"] is not None:
        o = result["opacity"]
        changes.update(opacity_threshold=o.threshold, opacity_calibration=o)
        print(f"opacity threshold {o.threshold:.2f} ({o.method}): mean Dice {o.dice:.3f} on {o.n} images with opacity")
    elif "opacity" in what:
        print("opacity threshold unchanged: no image in --cls-split has a non-empty opacity mask", file=sys.stderr)
    if result["zone"] is not None:
        z = result["zone"]
        changes.update(zone_threshold=z.threshold, zone_calibration=z)
        print(f"zone threshold T {z.threshold:.2f} against {z.reference}: score MAE {z.mae:.3f}, RMSE {z.rmse:.3f} "
              f"on {z.n} images")
    moved = [name for name, key in (("T_cls", "cls_threshold"), ("the opacity threshold", "opacity_threshold"))
             if key in changes and changes[key] != before[key]]
    if moved and result["zone"] is None:  # T was chosen on records made with the old values
        print(f"warning: {' and '.join(moved)} changed but T did not: T was calibrated with the old "
              f"value(s); recalibrate it (--what zone, or the default cls,opacity,zone)", file=sys.stderr)
    artifacts.update_bundle(args.bundle, **changes)
    print(f"stored in {args.bundle}")


def _score(args) -> None:
    scorer = scorers.load_bundle(args.bundle, device=args.device, batch_size=args.batch_size, runtime=args.runtime)
    uris = batch_scoring.expand_inputs(args.paths, args.manifest)
    counts = batch_scoring.score_files(scorer, uris, args.out, overlays=args.overlays, resume=args.resume,
                         progress=not args.quiet)
    print(f"scored {counts['scored']}, partial {counts['partial']}, unscored {counts['unscored']}, "
          f"failed {counts['error']}, already done {counts['skipped']}; records in {args.out}")


def _score_masks(args) -> None:
    lung = images.read_mask(args.lung)
    opacity = images.read_mask(args.opacity)
    if lung.shape != opacity.shape:
        raise CxrtuneError(f"{args.opacity}: {opacity.shape[1]}x{opacity.shape[0]} does not match the lung "
                           f"mask's {lung.shape[1]}x{lung.shape[0]}")
    print(json.dumps(zones.score_masks(lung, opacity, args.threshold)))


def _evaluate(args) -> None:
    scorer = scorers.load_bundle(args.bundle, device=args.device, batch_size=args.batch_size)
    by = tuple(c.strip() for c in (args.by or "").split(",") if c.strip())
    df = manifest.load_manifest(args.manifest)
    cv = args.cv_reference
    cal = artifacts.read_bundle_meta(args.bundle).zone_calibration
    if (not cv and cal and cal.reference.startswith("reader:") and cal.manifest == evaluation.manifest_id(df)
            and evaluation.same_rows(cal.split, args.split)):
        cv = cal.reference  # T was chosen on this very set: in-sample figures would flatter it
        print(f"T was calibrated on {args.manifest}: reader figures are cross-validated against {cv}", file=sys.stderr)
    elif cal and cal.manifest == evaluation.manifest_id(df) and evaluation.same_rows(cal.split, args.split):
        print(f"warning: T was calibrated on these rows against the {cal.reference} reference: the score "
              f"figures against it are in-sample (evaluation.evaluate another split, e.g. --split test)", file=sys.stderr)
    result = evaluation.evaluate(scorer, df, args.out, split=args.split, reference_threshold=args.reference_threshold,
                      limit=args.limit, by=by, cv_reference=cv, folds=args.folds)
    summary = {"status": result["status"], "lung_dice": result["lung"].get("dice"),
               "opacity_dice": result["opacity"].get("dice"),
               "f1": (result["classification"] or {}).get("f1"), "normal_score_fp_rate": result["normal_score_fp_rate"],
               "score_mae": result.get("score", {}).get("mae"),  # the scored records
               "score_mae_counting_not_scored": result.get("score", {}).get("mae_counting_not_scored")}
    for reader, figures in (result.get("readers", {}).get("readers", {}) or {}).items():
        summary[f"mae_vs_{reader}"] = figures.get("score", {}).get("mae")
        summary[f"mae_vs_{reader}_counting_not_scored"] = result["readers"]["mae_counting_not_scored"].get(reader)

    print(json.dumps(jsonsafe.json_safe(summary)))


def parse_duration(text: str | None) -> float | None:
    """``90s``, ``30m``, ``2h`` or plain seconds."""
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1].lower() in units:
            return float(text[:-1]) * units[text[-1].lower()]
        return float(text)
    except ValueError:
        raise CxrtuneError(f"--time-budget {text!r}: use e.g. 90s, 30m or 2h") from None


def shipped_or(uri: str, kind: str) -> str:
    """``uri`` itself, or a resources.shipped file's path when given a bare name (``lung_segmentation``)."""
    if "/" in uri or uri.endswith((".yaml", ".yml")):
        return uri

    return str(resources.shipped(kind, uri))


def load_warm_start(uris: list[str]) -> list[dict]:
    """Configurations from YAML/JSON files: each file one mapping or a list of them."""
    points = []
    for uri in uris:
        try:
            data = yaml.safe_load(storage.read_text(uri))
        except yaml.YAMLError as exc:
            raise CxrtuneError(f"{uri}: not valid YAML ({exc})") from None
        data = data if isinstance(data, list) else [data]
        if not all(isinstance(d, dict) for d in data):
            raise CxrtuneError(f"{uri}: expected a mapping NAME: value, or a list of them")
        points += data
    return points


def _tune(args) -> None:
    if args.resume:
        summary = tuning.resume_tune(args.resume)
    else:
        embedded = args.manifest is None
        if args.space:
            uri = shipped_or(args.space, "search_spaces")
            space, source = search_space.load_space(uri).to_dict(), uri
        elif embedded:
            space, source = tuning.EMBEDDED_SPACE, "embedded default"
        else:
            raise CxrtuneError("--space is required with --manifest (see search_spaces/)")
        given = {k: v for k, v in vars(args).items() if v is not None and k in tuning.TUNE_FLAGS}
        given["time_budget_s"] = parse_duration(args.time_budget)
        given["warm_start"] = load_warm_start(args.warm_start or [])
        opts = tuning.TuneOptions(**{**(tuning.EMBEDDED_OPTIONS if embedded else {}), **given},
                           space=space, space_source=source, manifest=args.manifest or embedded_manifest(),
                           name=args.name or _time.strftime("sweep-%Y%m%d-%H%M%S"),
                           storage=args.storage or os.path.abspath("cxrtune-results"))
        summary = tuning.run_tune(opts)

    print(json.dumps(jsonsafe.json_safe(summary), indent=2, default=str))


def _report(args) -> None:
    out = reports.write_report(args.experiment, args.out)
    print(f"report in {args.out}: {', '.join(out)}")


def _promote(args) -> None:
    results = release_gates.run_gates([release_gates.parse_gate(g) for g in args.gate or []])  # before anything is written
    release_gates.enforce(results)
    run = reports.promote(args.experiment, args.to, retrain=args.retrain, epochs=args.epochs)
    if results:
        meta_uri = storage.join(run, "best", "meta.json")
        meta = json.loads(storage.read_text(meta_uri))
        meta["audits"] = {**(meta.get("audits") or {}), "gates": results}
        storage.write_text(meta_uri, json.dumps(meta, indent=2))
        print(f"release gates passed: {', '.join(results)}")
    print(f"promoted to {run}")


def _default_serve_config() -> str:
    return str(resources.shipped("serve", "config.yaml" if torch.cuda.is_available() else "config.cpu.yaml"))


def _serve(args) -> None:
    serving_app.run_local(args.bundle, args.config or _default_serve_config(), host=args.host, port=args.port)


def _deploy(args) -> None:
    status = serving_app.deploy_config(args.config or _default_serve_config(), args.bundle, args.address, args.wait)
    print(json.dumps(status))


def _gate_flags(parser: argparse.ArgumentParser, bundle: bool) -> None:
    rules = "hcs>=X, hide-and-seek=REPORT, score_mae<=X[:READER]" if bundle else "hide-and-seek=REPORT"
    parser.add_argument("--gate", action="append", metavar="RULE",
                        help=f"release gate, repeatable: {rules}; a model that fails is refused (docs/audits.md)")
    if bundle:
        parser.add_argument("--gate-manifest", help="images the hcs and score_mae gates audit on (never training rows)")
        parser.add_argument("--gate-limit", type=int, default=64, help="gate manifest rows used at most")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxrtune", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--s3-endpoint-url", help="S3 endpoint (MinIO, a local server); "
                   "default: $CXRTUNE_S3_ENDPOINT_URL or AWS")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="import, split, push and generate datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)

    imp = dsub.add_parser("import", help="turn a dataset layout into a manifest")
    imp.add_argument("src", help="dataset folder")
    imp.add_argument("--format", required=True, help="covid-qu-ex, jsrt, folder, dicom or readers "
                     "(images + a CSV of per-zone reader grades, e.g. brixia-dev)")
    imp.add_argument("--csv", help="readers: the grades CSV (default: SRC/scores.csv)")
    imp.add_argument("--out", required=True, help="manifest to write (.parquet or .csv)")
    imp.add_argument("--data-dir", help="where converted files go (default: beside --out)")
    imp.add_argument("--default-label", help="label for images without one (folder: else excluded; "
                     "dicom: else unlabelled, an empty label)")
    imp.add_argument("--min-age", type=float, default=18.0, help="dicom: drop younger patients")
    imp.add_argument("--keep-derived", action="store_true",
                     help="dicom: keep secondary captures and ImageType SECONDARY images (dropped by "
                     "default; DERIVED\\PRIMARY is always kept)")
    imp.add_argument("--pseudonym-key-file", metavar="PATH",
                     help="dicom: the study's pseudonym key (file content; default $CXRTUNE_PSEUDONYM_KEY); "
                     "required, e.g. `openssl rand -hex 32 > study.key`, shared by every machine of the study")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=_data_import)

    spl = dsub.add_parser("split", help="patient-level stratified train/val/test, folds, tuning subset")
    spl.add_argument("manifest")
    spl.add_argument("--val", type=float, default=0.1)
    spl.add_argument("--test", type=float, default=0.1)
    spl.add_argument("--folds", type=int, default=0)
    spl.add_argument("--seed", type=int, default=0)
    spl.add_argument("--tuning-fraction", type=float, help="mark a patient subset for tuning")
    spl.add_argument("--keep-test", action="store_true", help="keep existing test rows as they are")
    spl.add_argument("--out", help="write here instead of in place")
    spl.add_argument("--no-check", action="store_true", help="skip the file-existence check")
    spl.set_defaults(func=_data_split)

    push = dsub.add_parser("push", help="upload images and masks to S3, write an S3 manifest")
    push.add_argument("manifest")
    push.add_argument("dest", help="s3://bucket/prefix")
    push.add_argument("--out", required=True, help="manifest of S3 URIs to write (local or s3://)")
    push.add_argument("--workers", type=int, default=8)
    push.add_argument("-q", "--quiet", action="store_true")
    push.set_defaults(func=_data_push)

    ph = dsub.add_parser("phantom", help="synthetic CXRs with known lungs, opacities and zone scores")
    ph.add_argument("--n", type=int, default=64)
    ph.add_argument("--out", required=True)
    ph.add_argument("--size", type=int, default=256)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--shortcut", action="store_true",
                    help="plant a label-revealing marker outside the lungs (to check the audits catch it)")
    ph.add_argument("-q", "--quiet", action="store_true")
    ph.set_defaults(func=_data_phantom)

    val = dsub.add_parser("validate", help="check a manifest and list every bad row")
    val.add_argument("manifest")
    val.add_argument("--no-check", action="store_true", help="skip the file-existence check")
    val.set_defaults(func=_data_validate)

    tr = sub.add_parser("train", help="train Stage I (task: lung) or Stage II (task: disease)")
    tr.add_argument("--config", required=True, help="training YAML, or the name of a shipped one (see configs/)")
    tr.add_argument("--manifest", help="manifest (default: the embedded phantom dataset)")
    tr.add_argument("--out", required=True, help="run folder: local path or s3://bucket/prefix")
    tr.add_argument("--resume", action="store_true", help="continue from the run's newest checkpoint")
    tr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override settings, e.g. lr=1e-4 model.arch=Unet")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar or per-epoch lines")
    tr.set_defaults(func=_train)

    bd = sub.add_parser("bundle", help="package a Stage I and a Stage II run as a scorer bundle")
    bd.add_argument("--lung", help="Stage I run URI")
    bd.add_argument("--disease", help="Stage II run URI")
    bd.add_argument("--out", help="bundle folder (local or s3://)")
    bd.add_argument("--threshold", type=float, default=DEFAULT_ZONE_THRESHOLD, help="zone threshold until calibrated")
    bd.add_argument("--migrate", metavar="URI", help="rewrite an older bundle's bundle.json in the current format")
    bd.add_argument("--export", nargs=2, metavar=("FORMAT", "URI"),
                    help="add an export of both networks to a bundle: `--export onnx BUNDLE` (the CPU fast path) "
                         "or `--export onnx-int8 BUNDLE --calibration IMAGES` (int8, faster, opt-in)")
    bd.add_argument("--calibration", nargs="+", metavar="PATH",
                    help="onnx-int8: radiographs to calibrate on (files, folders, s3:// prefixes or manifests)")
    bd.add_argument("--calibration-limit", type=int, default=32, help="onnx-int8: radiographs used at most")
    bd.add_argument("--name")
    _gate_flags(bd, bundle=True)
    bd.set_defaults(func=_bundle)

    cal = sub.add_parser("calibrate", help="choose T_cls (classifier) and the zone threshold T, with provenance")
    cal.add_argument("bundle")
    cal.add_argument("--manifest", required=True)
    cal.add_argument("--what", default="cls,opacity,zone",
                     help="which thresholds, comma-separated: cls (T_cls), opacity (Stage II's map), zone (T)")
    cal.add_argument("--split", default="train,val", help="rows for the zone threshold (never test; 'all' = every row)")
    cal.add_argument("--cls-split", default="val", help="labelled rows for T_cls (validation data)")
    cal.add_argument("--specificity", type=float,
                     help="T_cls operating point: this specificity on normals (default: maximum F1)")
    cal.add_argument("--reference", default="auto",
                     help="zone reference: a reader id from the manifest (e.g. S), 'zones', 'masks' or 'auto'")
    cal.add_argument("--reference-threshold", type=float, default=DEFAULT_ZONE_THRESHOLD,
                     help="T for deriving reference scores from masks when zone_* columns are absent")
    cal.add_argument("--limit", type=int)
    cal.add_argument("--device")
    cal.set_defaults(func=_calibrate)

    sc = sub.add_parser("score", help="score images or folders (PNG, JPEG, DICOM) to JSON lines")
    sc.add_argument("paths", nargs="*", help="files, folders, s3:// prefixes or manifests")
    sc.add_argument("--manifest", help="score a manifest's images")
    sc.add_argument("--bundle", required=True)
    sc.add_argument("--out", required=True, help="results.jsonl (each record written as it is made)")
    sc.add_argument("--resume", action="store_true", help="skip images already in --out")
    sc.add_argument("--overlays", help="folder for overlay PNGs")
    sc.add_argument("--batch-size", type=int, default=8)
    sc.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"],
                    help="auto: ONNX Runtime on a CPU when the bundle has an ONNX export, else torch; "
                         "onnx-int8: the bundle's int8 export")
    sc.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sc.add_argument("--device")
    sc.set_defaults(func=_score)

    sm = sub.add_parser("score-masks", help="the record computed from given lung and opacity masks")
    sm.add_argument("--lung", required=True)
    sm.add_argument("--opacity", required=True)
    sm.add_argument("--threshold", type=float, default=DEFAULT_ZONE_THRESHOLD)
    sm.set_defaults(func=_score_masks)

    ev = sub.add_parser("evaluate", help="metrics JSON and plots for a bundle on a manifest")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--manifest", required=True)
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--split", default="test", help="rows to use ('all' = every row)")
    ev.add_argument("--reference-threshold", type=float, default=DEFAULT_ZONE_THRESHOLD)
    ev.add_argument("--by", help="comma-separated manifest columns for subgroup figures (view,sex,site)")
    ev.add_argument("--cv-reference", metavar="READER",
                    help="the same set chose T: report cross-validated figures, T fit on the other folds against READER")
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--limit", type=int)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--device")
    ev.set_defaults(func=_evaluate)

    tu = sub.add_parser("tune", help="hyperparameter search with Ray Tune, Optuna and ASHA/HyperBand")
    tu.add_argument("--space", help="search-space YAML, or the name of a shipped one (lung_segmentation, "
                                    "disease_segmentation, opacity_classification; see search_spaces/)")
    tu.add_argument("--manifest", help="manifest (default: the embedded phantom dataset and a small space)")
    tu.add_argument("--name", help="experiment name (default: sweep-DATE-TIME)")
    tu.add_argument("--storage", help="local folder or s3://bucket/prefix (default: ./cxrtune-results)")

    d = tuning.TuneOptions.__dataclass_fields__  # the defaults live in tuning.TuneOptions only

    def opt(flag: str, help_: str, **kw):
        name = flag[2:].replace("-", "_")
        default = d[name].default
        extra = f"; embedded default {tuning.EMBEDDED_OPTIONS[name]}" if name in tuning.EMBEDDED_OPTIONS else ""
        tu.add_argument(flag, help=f"{help_} (default: {default}{extra})", **kw)

    opt("--num-samples", "trials", type=int)
    opt("--scheduler", "early stopping", choices=["asha", "hyperband", "none"])
    opt("--max-epochs", "I_max, epochs per trial; None: the space's fixed epochs, else 16", type=int)
    opt("--grace", "ASHA grace period in epochs", type=int)
    opt("--reduction-factor", "ASHA/HyperBand reduction factor", type=float)
    opt("--patience", "per-trial early stopping in epochs, 0 = off", type=int)
    opt("--min-delta", "what counts as progress for patience", type=float)
    opt("--cut-below", "stop a trial at once whose metric after epoch 1 is worse than this (e.g. 0.05 Dice)",
        type=float)
    opt("--cpus-per-trial", "CPUs per trial", type=float)
    opt("--gpus-per-trial", "GPUs per trial, fractions allowed, e.g. 0.25", type=float)
    opt("--max-concurrent", "trials at once; None: as many as the cluster holds", type=int)
    tu.add_argument("--time-budget", help="wall-clock budget of the sweep, e.g. 2h")
    opt("--objective", "the space's objective unless given", choices=["dice", "dice_cls", "score_mae", "macro_mae"])
    opt("--lung-bundle", "fixed Stage I bundle for --objective score_mae")
    opt("--reference", "score_mae's reference: a reader id from the manifest (e.g. S), zones, masks or auto")
    tu.add_argument("--multi-objective", action="store_true", default=None,
                    help="accuracy vs latency (multi-objective TPE, no ASHA)")
    opt("--wandb-project", "log to Weights & Biases (offline without WANDB_API_KEY)")
    opt("--seed", "sampler seed", type=int)
    opt("--sampler", "Optuna sampler (random = the baseline)", choices=["tpe", "random"])
    opt("--max-failures", "retries of a failed trial (a lost node, an error)", type=int)
    opt("--num-cpus", "CPUs for a local Ray instance", type=int)
    opt("--optuna-storage", "Optuna storage URL (a database); default: a journal file beside the experiment")
    tu.add_argument("--warm-start", nargs="+", metavar="CONFIG",
                    help="YAML/JSON files, each a configuration (NAME: value) or a list of them, tried first")
    opt("--latency-batch", "batch size at which --multi-objective times the network", type=int)
    tu.add_argument("--grid", action="store_true", default=None,
                    help="train every combination of the space's choice parameters once (seed 000's 27 per "
                         "lung side with opacity_classification); no sampler, no ASHA/HyperBand")
    tu.add_argument("--resume", metavar="EXP_URI", help="continue an interrupted experiment (STORAGE/NAME)")
    tu.set_defaults(func=_tune)

    rp = sub.add_parser("report", help="trials table, hyperparameter importance and correlation plots")
    rp.add_argument("experiment", help="experiment URI (STORAGE/NAME)")
    rp.add_argument("--out", required=True)
    rp.set_defaults(func=_report)

    pr = sub.add_parser("promote", help="export the best trial as a run that `cxrtune bundle` takes")
    pr.add_argument("experiment")
    pr.add_argument("--to", required=True, help="run URI")
    pr.add_argument("--retrain", action="store_true", help="retrain the best config on all training data")
    pr.add_argument("--epochs", type=int)
    _gate_flags(pr, bundle=False)
    pr.set_defaults(func=_promote)

    sv = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve (viewer at /, API at /v1)")
    sv.add_argument("--bundle", required=True)
    sv.add_argument("--config", help="Serve config (default: serve/config.yaml on GPU, serve/config.cpu.yaml on CPU)")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.set_defaults(func=_serve)

    dp = sub.add_parser("deploy", help="deploy or update the scorer on a running Ray cluster (as `serve deploy`), "
                                       "e.g. a new bundle with no downtime")
    dp.add_argument("--bundle", help="bundle URI (default: the config's)")
    dp.add_argument("--config", help="Serve config (default: serve/config.yaml on GPU, serve/config.cpu.yaml on CPU)")
    dp.add_argument("--address", help="Ray dashboard URL (default: $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
    dp.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the app to be RUNNING")
    dp.set_defaults(func=_deploy)
    au = sub.add_parser("audit", help="audits of what models look at (hide-and-seek, heatmap concordance)")
    asub = au.add_subparsers(dest="audit_command", required=True)
    hs = asub.add_parser("hide-and-seek", help="seed 001: train and test a classifier recipe on five "
                                               "representations; flag one that reads outside the lungs")
    hs.add_argument("--config", required=True, help="classification recipe YAML (see configs/)")
    hs.add_argument("--manifest", required=True, help="labelled rows with lung masks and train/test splits")
    hs.add_argument("--out", required=True, help="folder for hide_and_seek.json and heatmap PNGs")
    hs.add_argument("--representations", default=",".join(("original", "lungs_isolated", "lungs_removed",
                                                            "lungs_framed", "lungs_boxed_out")))
    hs.add_argument("--heatmaps", type=int, default=16, help="evaluation images per representation for HCS")
    hs.add_argument("--max-retained", type=float, default=0.5,
                    help="flag when the lungs-removed models keep this share of the skill above chance")
    hs.add_argument("--min-margin", type=float, default=0.1, help="... and beat chance by this much")
    hs.set_defaults(func=_audit_hide_and_seek)

    gr = sub.add_parser("grade", help="per-lung ordinal opacity grading (seed 000)")
    gsub = gr.add_subparsers(dest="grade_command", required=True)
    cv = gsub.add_parser("cv", help="patient-level K-fold cross-validation of grading recipes, with subgroup tables")
    which = cv.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", nargs="+", help="grading recipe YAML(s) (GradeConfig settings)")
    which.add_argument("--experiment", help="a grading sweep (STORAGE/NAME): its --top recipes per lung side")
    cv.add_argument("--top", type=int, default=5, help="recipes per side from --experiment (default: 5)")
    cv.add_argument("--manifest", help="default: the sweep's manifest (required with --config)")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--by", default="", help="manifest columns for subgroup tables, comma-separated (e.g. sex,site)")
    cv.add_argument("--seed", type=int, default=0, help="fold assignment seed")
    cv.add_argument("--heatmaps", type=int, default=8, help="held-out images per recipe with Grad-CAM heatmaps and HCS")
    cv.add_argument("--out", required=True, help="folder for cv.json, cv.md and the out-of-fold predictions")
    cv.set_defaults(func=_grade_cv)
    return p


def _grade_cv(args) -> None:
    if args.top < 1:
        raise CxrtuneError(f"--top {args.top}: give at least 1 recipe per side")
    if args.config:
        if not args.manifest:
            raise CxrtuneError("--config needs --manifest")
        recipes, manifest_uri = [grading.GradeConfig.from_yaml(c) for c in args.config], args.manifest
    else:
        recipes = reports.top_grade_recipes(args.experiment, args.top)
        manifest_uri = args.manifest or tuning.load_options(args.experiment).manifest
    df = manifest.load_manifest(manifest_uri)
    by = tuple(c for c in args.by.split(",") if c)
    results = []
    for i, cfg in enumerate(recipes):
        print(f"recipe {i + 1}/{len(recipes)}: {cfg.side} lung, {cfg.classifier.backbone}, {cfg.roi}, {cfg.balancing}",
              file=sys.stderr)
        r = grade_cv.cross_validate(cfg, df, folds=args.folds, seed=args.seed, by=by, heatmap_images=args.heatmaps)
        storage.write_text(storage.join(args.out, f"oof_{i + 1}.csv"), r.pop("oof").to_csv(index=False))
        for row, (image, heat, lung) in r["heatmaps"].items():
            storage.write_bytes(storage.join(args.out, "heatmaps", f"recipe{i + 1}_{cfg.side}_row{row}.png"),
                                heatmaps.heatmap_png(image, heat, lung, heatmaps.concordance(heat, lung)["hcs"]))
        results.append(r)
    pairs = []  # seed 000: a recipe cross-validated for both sides -> left and right heatmaps averaged
    for i, right in enumerate(results):
        for j, left in enumerate(results):
            same = {k: v for k, v in right["config"].items() if k != "side"} == \
                {k: v for k, v in left["config"].items() if k != "side"}
            if right["config"]["side"] == "right" and left["config"]["side"] == "left" and same:
                paired = grade_cv.paired_heatmaps(right, left)
                for row, (image, heat, lung, hcs) in paired.items():
                    storage.write_bytes(storage.join(args.out, "heatmaps", f"recipes{i + 1}+{j + 1}_both_row{row}.png"),
                                        heatmaps.heatmap_png(image, heat, lung, hcs))
                pairs.append({"right": i + 1, "left": j + 1, "images": len(paired),
                              "hcs": float(sum(p[3] for p in paired.values()) / len(paired)) if paired else None})
    for r in results:
        r.pop("heatmaps")
    storage.write_text(storage.join(args.out, "cv.json"), json.dumps(jsonsafe.json_safe({"recipes": results, "both_sides": pairs}),
                                                                     indent=2))
    table = grade_cv.cv_markdown(results)
    if pairs:
        table += "\nLeft and right heatmaps averaged (seed 000), HCS against the lungs:\n\n" + "\n".join(
            f"- recipes {p['right']} (right) + {p['left']} (left): HCS {p['hcs']:.3f} on {p['images']} images"
            for p in pairs if p["hcs"] is not None) + "\n"
    storage.write_text(storage.join(args.out, "cv.md"), table)
    print(table)


def _audit_hide_and_seek(args) -> None:
    cfg = classify.ClassifyConfig.from_yaml(args.config)
    df = manifest.load_manifest(args.manifest)
    reps = tuple(args.representations.split(","))
    result = hide_and_seek_audit.hide_and_seek(cfg, df, reps, hide_and_seek_audit.Verdict(args.max_retained, args.min_margin), heatmap_images=args.heatmaps)
    hide_and_seek_audit.write_heatmaps(result.pop("heatmaps"), args.out)
    storage.write_text(storage.join(args.out, "hide_and_seek_audit.hide_and_seek.json"), json.dumps(jsonsafe.json_safe(result), indent=2))
    print(f"{'representation':<16} {'accuracy':>8} {'HCS':>6}  sensitivity / PPV per class")
    for name, r in result["representations"].items():
        per = ", ".join(f"{c} {r['sensitivity'][c]:.2f}/{r['ppv'][c]:.2f}" for c in result["classes"])
        print(f"{name:<16} {r['accuracy']:>8.3f} {r.get('hcs', float('nan')):>6.2f}  {per}")
    v = result["verdict"]
    print(("FLAGGED: " if v["flagged"] else "passed: ") + v["reason"])
    print(f"report: {storage.join(args.out, 'hide_and_seek_audit.hide_and_seek.json')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.s3_endpoint_url:
        os.environ["CXRTUNE_S3_ENDPOINT_URL"] = args.s3_endpoint_url
    try:
        args.func(args)
    except CxrtuneError as exc:
        if args.verbose:
            raise
        print(f"cxrtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxrtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
