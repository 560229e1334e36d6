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
import time
from dataclasses import asdict

from . import dicom, jsonsafe, resources, storage
from .audit import gates as release_gates
from .audit import grade_cv
from .audit import hide_and_seek as hide_and_seek_audit
from .data import importers, manifest, phantom, splits
from .errors import CxrtuneError
from .model import artifacts, classify
from .model import train as training
from .pacs import listener as pacs_listener
from .pacs import poll as pacs_poll
from .pacs import spool as pacs_spool
from .scoring import batch_scoring, evaluation, onnx_export, onnx_runtime
from .scoring import scorer as scorers
from .search import report as reports
from .search import tuning
from .serving import deploy as serving_deploy
from .zones import DEFAULT_ZONE_THRESHOLD

log = logging.getLogger("cxrtune")


def _data_import(args) -> None:
    options = {"default_label": args.default_label, "min_age": args.min_age, "keep_derived": args.keep_derived,
               "pseudonym_key_file": args.pseudonym_key_file, **({"csv": args.csv} if args.csv else {})}
    result = importers.run_import(args.format, args.src, args.out, data_dir=args.data_dir, progress=not args.quiet,
                                  **options)
    if result.excluded:
        print(f"exclusion report: {importers.report_uri(args.out)}", file=sys.stderr)
    print(result.summary())


def _data_split(args) -> None:
    df = manifest.load_manifest(args.manifest, check_files=not args.no_check)
    out = splits.assign_splits(df, val=args.val, test=args.test, folds=args.folds, seed=args.seed,
                               tuning_fraction=args.tuning_fraction, keep_test=args.keep_test)
    manifest.save_manifest(manifest.relative_beside(out, args.out or args.manifest), args.out or args.manifest)
    print(json.dumps(splits.split_summary(out)))


def _data_push(args) -> None:
    counts = manifest.push_manifest(manifest.load_manifest(args.manifest), args.dest, args.out,
                                    workers=args.workers, progress=not args.quiet)
    print(f"pushed {counts['files']} files as {counts['objects']} objects: uploaded "
          f"{counts['uploaded']}, already present {counts['skipped']}; manifest {args.out}")


def _data_phantom(args) -> None:
    df = phantom.write_phantoms(args.out, args.n, size=args.size, seed=args.seed, progress=not args.quiet,
                                shortcut=args.shortcut)
    print(f"wrote {len(df)} phantoms and {os.path.join(args.out, 'manifest.parquet')}")


def _data_validate(args) -> None:
    df = manifest.load_manifest(args.manifest, check_files=not args.no_check)
    print(f"{args.manifest}: {len(df)} rows, valid")


def _train(args) -> None:
    cfg = training.TrainConfig.from_yaml(resources.shipped_or(args.config, "configs")).with_overrides(args.set or [])
    df = manifest.load_manifest(args.manifest or phantom.embedded_manifest())
    summary = training.train(cfg, df, args.out, resume=args.resume, progress=not args.quiet)
    best = summary.get("best") or {}
    print(f"trained {summary['epochs']} epoch(s); best {cfg.monitor} {best.get('value', float('nan')):.4f} "
          f"at epoch {best.get('epoch')}; run {args.out}")


def _bundle_make(args) -> None:
    gates = [release_gates.parse_gate(g) for g in args.gate or []]
    b = release_gates.make_gated_bundle(args.lung, args.disease, args.out, gates, args.gate_manifest,
                                        args.gate_limit, zone_threshold=args.threshold, name=args.name or "")
    if gates:
        print(f"release gates passed: {', '.join(b.audits['gates'])}")
    print(f"bundle {args.out}: lung {b.lung.config['model']['arch']}, disease "
          f"{b.disease.config['model']['arch']}, zone threshold {b.zone_threshold}")


def _bundle_migrate(args) -> None:
    print(f"bundle {args.out}: {artifacts.migrate_bundle(args.uri, args.out).format}, made from {args.uri}")


def _bundle_export(args) -> None:
    rec = onnx_export.export(args.uri, args.out, args.format, args.calibration, args.calibration_limit)
    if args.format == "onnx":
        print(f"bundle {args.out}: {args.uri} with lung.onnx and disease.onnx (opset {rec['opset']})")
    else:
        print(f"bundle {args.out}: {args.uri} with lung.int8.onnx and disease.int8.onnx, calibrated on "
              f"{rec['calibration_images']} radiographs (Stage II on {rec['stage2_calibration_images']} lung crops)")


def _bundle_legacy(args) -> None:
    """``cxrtune bundle --lung/--migrate/--export``: the flags before the subcommands, kept for one release."""
    if args.migrate:
        new, args.uri = "bundle migrate URI --out NEW", args.migrate
    elif args.export:
        new, (args.format, args.uri) = "bundle export FORMAT URI --out NEW", args.export
    elif args.lung or args.disease or args.out:
        new = "bundle make --lung --disease --out"
    else:
        raise CxrtuneError("choose what to do: cxrtune bundle make | migrate | export (see --help)")
    print(f"cxrtune: `cxrtune bundle` with flags is deprecated; use `cxrtune {new}`", file=sys.stderr)
    if not (args.out and (args.migrate or args.export or (args.lung and args.disease))):
        raise CxrtuneError(f"cxrtune {new} needs all of those (bundles are immutable: --out is a new folder)")
    {"bundle migrate URI --out NEW": _bundle_migrate, "bundle export FORMAT URI --out NEW": _bundle_export}.get(
        new, _bundle_make)(args)


def _calibrate(args) -> None:
    options = evaluation.CalibrateOptions(
        split=args.split, cls_split=args.cls_split, reference=args.reference, specificity=args.specificity,
        normal_fp_limit=args.normal_fp_limit,
        reference_threshold=args.reference_threshold, limit=args.limit, what=tuple(w.strip() for w in args.what.split(",")),
        not_frontal=tuple(args.not_frontal or ()))
    outcome = evaluation.calibrate_bundle(args.bundle, args.out, manifest.load_manifest(args.manifest), options,
                                          args.device)
    for line, to_stderr in outcome.lines(options.what):
        print(line, file=sys.stderr if to_stderr else sys.stdout)
    print(f"calibrated bundle: {args.out}")


def _score(args) -> None:
    scorer = scorers.load_bundle(args.bundle, device=args.device, batch_size=args.batch_size, runtime=args.runtime)
    counts = batch_scoring.score_files(scorer, batch_scoring.expand_inputs(args.paths, args.manifest), args.out,
                                       overlays=args.overlays, resume=args.resume, progress=not args.quiet)
    print(f"scored {counts['scored']}, partial {counts['partial']}, unscored {counts['unscored']}, "
          f"failed {counts['error']}, already done {counts['skipped']}; records in {args.out}")


def _score_masks(args) -> None:
    print(json.dumps(scorers.score_mask_files(args.lung, args.opacity, args.threshold)))


def _evaluate(args) -> None:
    options = evaluation.EvaluateOptions(
        split=args.split, reference_threshold=args.reference_threshold, limit=args.limit, folds=args.folds,
        by=tuple(c.strip() for c in (args.by or "").split(",") if c.strip()), cv_reference=args.cv_reference)
    report = evaluation.evaluate_bundle(args.bundle, manifest.load_manifest(args.manifest), args.out, options,
                                        device=args.device, batch_size=args.batch_size)
    if report.note:
        print(report.note, file=sys.stderr)
    print(json.dumps(report.summary))


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


def _tune(args) -> None:
    if args.resume:
        ignored = sorted(k for k, v in vars(args).items() if v is not None and k in (
            *tuning.TUNE_FLAGS, "space", "manifest", "name", "storage", "time_budget", "constraint", "warm_start"))
        if ignored:  # said, not dropped: a resumed sweep runs with the options it was started with
            raise CxrtuneError(f"--resume continues a sweep with the options it started with ({args.resume}/"
                               f"{tuning.EXPERIMENT_FILE}); it takes no other option: drop "
                               + ", ".join("--" + k.replace("_", "-") for k in ignored))
        summary = tuning.resume_tune(args.resume)
    else:
        given = {k: v for k, v in vars(args).items() if v is not None and k in tuning.TUNE_FLAGS}
        given.update(time_budget_s=parse_duration(args.time_budget),
                     warm_start=tuning.load_warm_start(args.warm_start or []), constraints=args.constraint or [])
        summary = tuning.run_tune(tuning.cli_options(
            given, space=args.space and resources.shipped_or(args.space, "search_spaces"), manifest=args.manifest,
            name=args.name or time.strftime("sweep-%Y%m%d-%H%M%S"),
            storage=args.storage or os.path.abspath("cxrtune-results")))
    print(json.dumps(jsonsafe.json_safe(summary), indent=2, default=str))


def _report(args) -> None:
    out = reports.write_report(args.experiment, args.out, latency_table=args.latency_table)
    print(f"report in {args.out}: {', '.join(out)}")


def _promote(args) -> None:
    training.refuse_an_existing_run(args.to)  # before the release gates' minutes of scoring
    run, results = release_gates.promote_gated(
        [release_gates.parse_gate(g) for g in args.gate or []],
        lambda: reports.promote(args.experiment, args.to, retrain=args.retrain, epochs=args.epochs, pick=args.pick,
                                overrides=args.set or (), latency_table=args.latency_table, trial_id=args.trial))
    if results:
        print(f"release gates passed: {', '.join(results)}")
    print(f"promoted to {run}")


def _serve(args) -> None:
    serving_deploy.run_local(args.bundle, args.config or serving_deploy.default_config(), host=args.host, port=args.port,
                             haproxy=args.haproxy)


LATENCY_TABLE_HELP = ("a multi-objective sweep: draw its front over the int8 latency measured per network in this "
                      "table (bench/latency_proxy.py --table) instead of its own cost; the rule's cost is then "
                      "int8_ms (a sweep run with --latency-table uses its own table without this)")
OVERLAY_HELP = ("also send an overlay for viewers that show neither SEG nor SR: a Secondary Capture in its own series, "
                "\"NOT FOR DIAGNOSTIC USE\" burned in (off by default)")


def _pacs_service_logging(args) -> None:
    """A PACS service logs what it scores and skips (INFO, by pseudonym) without ``-v``, and drops
    library warnings, which quote DICOM values."""
    if not args.verbose:
        logging.getLogger("cxrtune.pacs").setLevel(logging.INFO)
    dicom.drop_warnings()


def _pacs_listen(args) -> None:
    _pacs_service_logging(args)
    settings = pacs_listener.ListenerSettings(
        ae_title=args.ae_title, host=args.host, port=args.port,
        callers=tuple(pacs_listener.Peer.parse(c) for c in args.allow),
        destination=pacs_listener.Peer.parse(args.destination),
        max_associations=args.max_associations, max_spool_bytes=int(args.max_spool_gb * 1024 ** 3),
        tls=pacs_listener.TlsSettings(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None,
        endpoint=args.endpoint, max_attempts=args.max_attempts, metrics_port=args.metrics_port, overlay=args.overlay)
    pacs_listener.run_listener(settings, args.spool, args.bundle, args.pseudonym_key_file, args.device, args.api_key_file)


def _pacs_poll(args) -> None:
    _pacs_service_logging(args)
    settings = pacs_poll.PollSettings(args.dicomweb, window_days=args.window_days, overlay=args.overlay)
    poller = pacs_poll.DicomwebPoller(settings, pacs_spool.open_spool(args.spool),
                                      scorers.load_bundle(args.bundle, device=args.device),
                                      dicom.pseudonym_key(args.pseudonym_key_file))
    if args.once:
        print(json.dumps(poller.poll_once()))
    else:
        pacs_poll.poll_forever(poller, args.interval, ("127.0.0.1", args.metrics_port) if args.metrics_port else None)


def _pacs_status(args) -> None:
    spool = pacs_spool.open_spool(args.spool)
    print(json.dumps({**asdict(spool.status()), "poll": pacs_poll.poll_status(spool)}))


def _pacs_retry(args) -> None:
    spool = pacs_spool.open_spool(args.spool)
    results, inputs = spool.retry_parked()
    print(f"{results} parked result(s) queued again; {inputs} parked received instance(s) to score again; "
          f"{pacs_poll.retry_parked(spool)} parked instance(s) will be polled again")


def _deploy(args) -> None:
    print(json.dumps(serving_deploy.deploy_config(args.config or serving_deploy.default_config(), args.bundle,
                                               args.address, args.wait)))


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
                     help="dicom, folder, readers: the study's pseudonym key (file content; default "
                     "$CXRTUNE_PSEUDONYM_KEY); required, e.g. `openssl rand -hex 32 > study.key`, "
                     "shared by every machine of the study")
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

    bd = sub.add_parser("bundle", help="make, migrate or export a scorer bundle (Stage I + Stage II)")
    bsub = bd.add_subparsers(dest="bundle_command")
    mk = bsub.add_parser("make", help="package a Stage I and a Stage II run as a scorer bundle")
    mg = bsub.add_parser("migrate", help="copy an older bundle into a new one in the current format, sealed")
    mg.add_argument("uri", help="bundle URI")
    mg.add_argument("--out", required=True, help="the new bundle's folder (local or s3://): bundles are immutable")
    mg.set_defaults(func=_bundle_migrate)
    ex = bsub.add_parser("export", help="a new bundle with an export of both networks: onnx (the CPU fast path) "
                                        "or onnx-int8 (int8, faster, opt-in; needs --calibration)")
    ex.add_argument("format", choices=onnx_runtime.ONNX_RUNTIMES)
    ex.add_argument("uri", help="bundle URI")
    ex.add_argument("--out", required=True, help="the new bundle's folder (local or s3://): bundles are immutable")
    ex.set_defaults(func=_bundle_export)
    for parser in (ex, bd):
        parser.add_argument("--calibration", nargs="+", metavar="PATH",
                            help="onnx-int8: radiographs to calibrate on (files, folders, s3:// prefixes or manifests)")
        parser.add_argument("--calibration-limit", type=int, default=32, help="onnx-int8: radiographs used at most")
    for parser, required in ((mk, True), (bd, False)):  # `bundle --lung ...`: the deprecated spelling
        parser.add_argument("--lung", required=required, help="Stage I run URI")
        parser.add_argument("--disease", required=required, help="Stage II run URI")
        parser.add_argument("--out", required=required, help="the new bundle's folder (local or s3://); refused "
                            "if it holds anything: bundles are immutable")
        parser.add_argument("--threshold", type=float, default=DEFAULT_ZONE_THRESHOLD,
                            help="zone threshold until calibrated")
        parser.add_argument("--name")
        _gate_flags(parser, bundle=True)
    mk.set_defaults(func=_bundle_make)
    bd.add_argument("--migrate", metavar="URI", help="deprecated: `cxrtune bundle migrate URI --out NEW`")
    bd.add_argument("--export", nargs=2, metavar=("FORMAT", "URI"),
                    help="deprecated: `cxrtune bundle export FORMAT URI --out NEW`")
    bd.set_defaults(func=_bundle_legacy)

    cal = sub.add_parser("calibrate", help="choose T_cls (classifier) and the zone threshold T, with provenance, "
                         "into a new bundle")
    cal.add_argument("bundle")
    cal.add_argument("--out", required=True, help="the calibrated bundle's folder (local or s3://): the bundle "
                     "calibrated is left as it is")
    cal.add_argument("--manifest", required=True)
    cal.add_argument("--what", default="cls,opacity,zone,appearance",
                     help="what to calibrate, comma-separated: cls (T_cls), opacity (Stage II's map), zone (T), "
                          "appearance (the plausibility check's model of frontal CXRs, fitted on --cls-split)")
    cal.add_argument("--not-frontal", nargs="+", metavar="PATH",
                     help="radiographs known not to be frontal CXRs (a site's laterals: files, folders, s3:// "
                          "prefixes or manifests): fit the plausibility check's view model against --cls-split; "
                          "without it, calibrating appearance again drops the bundle's view model")
    cal.add_argument("--split", default="train,val", help="rows for the zone threshold (never test; 'all' = every row)")
    cal.add_argument("--cls-split", default="val",
                     help="labelled rows for T_cls, the opacity cut and the appearance and view models (validation data)")
    cal.add_argument("--specificity", type=float,
                     help="T_cls operating point: this specificity on normals (default: maximum F1)")
    cal.add_argument("--normal-fp-limit", type=float, metavar="RATE",
                     help="hold the --cls-split Normal images' FP rate (score > 0 at the final thresholds) to a "
                          "one-sided 95%% upper bound <= RATE, e.g. 0.10: where max F1 and min MAE break it, T_cls "
                          "and T of least score MAE that meet it (docs/scoring.md)")
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
    sc.add_argument("--runtime", default="auto", choices=onnx_runtime.RUNTIMES,
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
    opt("--scheduler", "early stopping", choices=list(tuning.SCHEDULERS))
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
                    help="accuracy vs cost (the network's GMACs per image, or its measured int8 ms with "
                         "--latency-table): multi-objective TPE; ASHA/HyperBand cut trials on accuracy, and cut trials "
                         "stay off the front")
    opt("--latency-table", "with --multi-objective: the cost is each network's int8 ms measured in this table "
        "(bench/latency_proxy.py --table), not its GMACs")
    tu.add_argument("--constraint", action="append", metavar="METRIC<=LIMIT",
                    help="a limit every trial on the front must meet, e.g. 'val_fp_rate_normal<=0.10' (repeatable); "
                         "stored in the Optuna study")
    opt("--wandb-project", "log to Weights & Biases (offline without WANDB_API_KEY)")
    tu.add_argument("--wandb-images", action="store_true", default=None,
                    help="also send validation overlays (the manifest's radiographs) to W&B; off by default: "
                         "patient images would leave the site")
    opt("--seed", "sampler seed", type=int)
    opt("--sampler", "Optuna sampler: tpe or gp (a Gaussian process), or random (the baseline)",
        choices=list(tuning.SAMPLERS))
    opt("--startup-trials", "finished trials (warm starts included) before TPE or the GP models; None: a quarter "
        "of --num-samples, 2-10", type=int)
    opt("--max-failures", "retries of a failed trial (a lost node, an error)", type=int)
    opt("--num-cpus", "CPUs for a local Ray instance", type=int)
    opt("--optuna-storage", "Optuna storage URL (a database) without its password, which comes from "
        "CXRTUNE_OPTUNA_PASSWORD or the file CXRTUNE_OPTUNA_PASSWORD_FILE names; default: a journal file beside the experiment")
    tu.add_argument("--warm-start", nargs="+", metavar="CONFIG",
                    help="YAML/JSON files, each a configuration (NAME: value) or a list of them, tried first")
    tu.add_argument("--grid", action="store_true", default=None,
                    help="train every combination of the space's choice parameters once (seed 000's 27 per "
                         "lung side with opacity_classification); no sampler, no ASHA/HyperBand")
    tu.add_argument("--resume", metavar="EXP_URI", help="continue an interrupted experiment (STORAGE/NAME)")
    tu.set_defaults(func=_tune)

    rp = sub.add_parser("report", help="trials table, hyperparameter importance and correlation plots")
    rp.add_argument("experiment", help="experiment URI (STORAGE/NAME)")
    rp.add_argument("--out", required=True)
    rp.add_argument("--latency-table", metavar="CSV", help=LATENCY_TABLE_HELP)
    rp.set_defaults(func=_report)

    pr = sub.add_parser("promote", help="export the best trial (or a picked point of a front) as a run that "
                                        "`cxrtune bundle` takes")
    pr.add_argument("experiment")
    pr.add_argument("--to", required=True, help="run URI")
    pr.add_argument("--retrain", action="store_true", help="retrain the best config on all training data")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="with --retrain: a setting over the trial's config, e.g. max_train_images=2600 or "
                         "model.encoder_weights=runs/lung (repeatable; recorded)")
    pr.add_argument("--pick", metavar="RULE",
                    help="a multi-objective sweep: which point of the front, e.g. 'fastest:accuracy<=best+0.05' or "
                         "'most-accurate:cost<=1.5' (docs/search_spaces.md)")
    pr.add_argument("--trial", metavar="ID",
                    help="promote this trial (an id of the report's trials.csv) instead of the best or a --pick")
    pr.add_argument("--latency-table", metavar="CSV", help=LATENCY_TABLE_HELP)
    pr.add_argument("--epochs", type=int)
    _gate_flags(pr, bundle=False)
    pr.set_defaults(func=_promote)

    sv = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve (viewer at /, API at /v1)")
    sv.add_argument("--bundle", required=True)
    sv.add_argument("--config", help="Serve config (default: serve/config.yaml on GPU, serve/config.cpu.yaml on CPU)")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--haproxy", action="store_true",
                    help="HAProxy in front of the ingress replicas instead of Serve's proxy (127.0.0.1 and plain HTTP "
                         "only; starts its own Ray instance): more images/s on a small node, docs/serving.md")
    sv.set_defaults(func=_serve)

    dp = sub.add_parser("deploy", help="deploy or update the scorer on a running Ray cluster (as `serve deploy`), "
                                       "e.g. a new bundle with no downtime")
    dp.add_argument("--bundle", help="bundle URI (default: the config's)")
    dp.add_argument("--config", help="Serve config (default: serve/config.yaml on GPU, serve/config.cpu.yaml on CPU)")
    dp.add_argument("--address", help="Ray dashboard URL (default: $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265)")
    dp.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the app to be RUNNING")
    dp.set_defaults(func=_deploy)
    pc = sub.add_parser("pacs", help="a DICOM listener that scores what it is sent and sends back SR and SEG "
                                     "(docs/pacs.md)")
    psub = pc.add_subparsers(dest="pacs_command", required=True)
    ls = psub.add_parser("listen", help="C-STORE SCP: spool, score, send the results to --destination")
    ls.add_argument("--bundle", help="score with this bundle in this process")
    ls.add_argument("--endpoint", metavar="URL", help="or score through the served scorer at URL: https://, or http:// "
                                                      "to this machine only (its API key from --api-key-file or "
                                                      "$CXRTUNE_API_KEY)")
    ls.add_argument("--api-key-file", help="an owner-only file holding the served scorer's API key")
    ls.add_argument("--max-attempts", type=int, default=20,
                    help="deliveries a result may fail, or scorings the served scorer may defer an instance (408, "
                         "replicas that died under it), 5 s, 10 s ... up to 15 min apart (20 is about 3 h), "
                         "before it is parked")
    ls.add_argument("--spool", required=True, help="folder (mode 0700) holding received instances and the outbox")
    ls.add_argument("--destination", required=True, metavar="AE@HOST:PORT", help="where the SR and SEG are C-STOREd")
    ls.add_argument("--allow", action="append", required=True, metavar="AE@HOST",
                    help="a caller that may send (repeat for each); others are refused")
    ls.add_argument("--ae-title", default="CXRTUNE")
    ls.add_argument("--host", default="127.0.0.1")
    ls.add_argument("--port", type=int, default=11112)
    ls.add_argument("--max-associations", type=int, default=4)
    ls.add_argument("--max-spool-gb", type=float, default=4.0, help="past it a C-STORE is refused (0xA700)")
    ls.add_argument("--pseudonym-key-file", help="the study key (or $CXRTUNE_PSEUDONYM_KEY): logs name instances by it")
    ls.add_argument("--device")
    ls.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (queue depth, spool bytes, parked) "
                                                     "at http://HOST:PORT/metrics")
    ls.add_argument("--tls-cert", help="mutual TLS in and out: this AE's certificate (PEM; needs --tls-key and --tls-ca)")
    ls.add_argument("--tls-key", help="its private key (an owner-only file)")
    ls.add_argument("--tls-ca", help="the CA bundle callers' and the destination's certificates must chain to")
    ls.add_argument("--overlay", action="store_true", help=OVERLAY_HELP)
    ls.set_defaults(func=_pacs_listen)
    po = psub.add_parser("poll", help="DICOMweb: find new CR/DX instances (QIDO-RS), score them, store the results "
                                      "(STOW-RS); the token from $CXRTUNE_DICOMWEB_TOKEN or _TOKEN_FILE")
    po.add_argument("--dicomweb", required=True, metavar="URL", help="the DICOMweb root, e.g. http://pacs:8042/dicom-web")
    po.add_argument("--bundle", required=True)
    po.add_argument("--spool", required=True, help="folder (mode 0700) keeping what was handled and what is parked")
    po.add_argument("--window-days", type=int, default=1,
                    help="studies dated from this many days before the last complete poll (or today) are searched")
    po.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    po.add_argument("--once", action="store_true", help="one poll, then print its counts")
    po.add_argument("--pseudonym-key-file", help="the study key (or $CXRTUNE_PSEUDONYM_KEY): logs name instances by it")
    po.add_argument("--device")
    po.add_argument("--overlay", action="store_true", help=OVERLAY_HELP)
    po.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (handled, failing, parked, last poll) "
                                                     "at http://127.0.0.1:PORT/metrics")
    po.set_defaults(func=_pacs_poll)
    st = psub.add_parser("status", help="what the spool holds: received, queued, parked (with reasons)")
    st.add_argument("--spool", required=True)
    st.set_defaults(func=_pacs_status)
    rt = psub.add_parser("retry", help="queue every parked result again, score every parked received instance again, "
                                       "and let pacs poll retrieve its parked instances again")
    rt.add_argument("--spool", required=True)
    rt.set_defaults(func=_pacs_retry)

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
    recipes, df = reports.grade_cv_inputs(args.experiment, args.top, args.config or (), args.manifest)
    report = grade_cv.write_grade_cv(recipes, df, args.out, folds=args.folds, seed=args.seed,
                                     by=tuple(c for c in args.by.split(",") if c), heatmap_images=args.heatmaps,
                                     log_progress=lambda line: print(line, file=sys.stderr))
    print(report.markdown)


def _audit_hide_and_seek(args) -> None:
    result = hide_and_seek_audit.run_hide_and_seek(
        classify.ClassifyConfig.from_yaml(args.config), manifest.load_manifest(args.manifest), args.out,
        tuple(args.representations.split(",")), hide_and_seek_audit.Verdict(args.max_retained, args.min_margin),
        heatmap_images=args.heatmaps)
    print("\n".join(hide_and_seek_audit.summary_lines(result)))
    print(f"report: {storage.join(args.out, 'hide_and_seek.json')}")


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
