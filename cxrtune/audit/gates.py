"""Audits as release gates: ``cxrtune bundle make --gate RULE`` and ``cxrtune promote --gate RULE``
refuse a model that fails, naming the numbers, and record every audit result in the bundle's
(or run's) metadata, which ``GET /v1/models`` shows.

Rules (``--gate`` may be given several times):

* ``hcs>=X``: the bundle's own Stage II classifier, on its own input: Grad-CAM heatmaps of the
  lung-box crops (:func:`~cxrtune.scoring.scorer.disease_input`) of the gate manifest's images, HCS
  against the cleaned Stage I lungs in the crop; the mean must be at least X. Bundles only.
* ``hide-and-seek=REPORT``: a report of ``cxrtune audit hide-and-seek`` (it audits the recipe and
  the data, and runs once); a flagged report fails.
* ``score_mae<=X`` or ``score_mae<=X:READER``: the bundle's score MAE on the gate manifest against a
  reader's grades (``reader_<ID>_A..F``; without READER the manifest's only reader, and several
  must be told apart), else the zone columns or masks. Bundles only.

Bundle gates score the gate manifest's rows outside its training split (at most ``--gate-limit``
of them): a gate passed on images the model trained on would say nothing.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .. import storage
from ..data import manifest as manifests
from ..errors import CxrtuneError
from ..model.artifacts import (
    BundleMeta,
    bundle_files,
    folder_name,
    make_bundle,
    publish_bundle,
    read_bundle_file,
    read_checkpoint_meta,
    require_new_bundle,
    write_checkpoint_meta,
)
from ..preprocessing import resize_mask
from ..scoring.evaluation import pick_rows, readable_scans, resolve_reference, score_rows
from ..scoring.scorer import (
    disease_input,
    has_lungs,
    load_bundle,
    reference_zones,
    score_error,
)
from .heatmaps import concordance, heatmaps

KINDS = ("hcs", "hide-and-seek", "score_mae")
BUNDLE_ONLY = ("hcs", "score_mae")


class GateFailed(CxrtuneError):
    """A release gate refused the model; the message names the failing numbers."""


@dataclass(frozen=True)
class Gate:
    kind: str
    threshold: float | None = None
    arg: str = ""  # the report (hide-and-seek) or the reader (score_mae)

    @property
    def rule(self) -> str:
        if self.kind == "hide-and-seek":
            return f"hide-and-seek={self.arg}"
        op = ">=" if self.kind == "hcs" else "<="
        return f"{self.kind}{op}{self.threshold:g}" + (f":{self.arg}" if self.arg else "")


def parse_gate(text: str) -> Gate:
    """``hcs>=0.5``, ``hide-and-seek=PATH``, ``score_mae<=1.1`` or ``score_mae<=1.1:S``."""
    text = text.strip()
    if text.startswith("hide-and-seek="):
        return Gate("hide-and-seek", arg=text.split("=", 1)[1])
    m = re.fullmatch(r"(hcs)>=([0-9.]+)|(score_mae)<=([0-9.]+)(?::(\w+))?", text)
    if not m:
        raise CxrtuneError(f"--gate {text!r}: use hcs>=X, hide-and-seek=REPORT, score_mae<=X or score_mae<=X:READER")
    try:
        if m.group(1):
            return Gate("hcs", float(m.group(2)))
        return Gate("score_mae", float(m.group(4)), m.group(5) or "")
    except ValueError:
        raise CxrtuneError(f"--gate {text!r}: {m.group(2) or m.group(4)!r} is not a number") from None


def bundle_concordance(scorer, images: list[np.ndarray]) -> dict:
    """Mean HCS of the bundle's Stage II classifier on its own input (a torch scorer: Grad-CAM
    needs gradients). Images whose Stage I finds no lungs are left out (the classifier never sees them)."""
    model, pre = scorer.stage("disease").model, scorer.stage("disease").pre
    values = []
    for image, lung in zip(images, scorer.lung_masks(images)):
        if not has_lungs(lung):
            continue
        u8, box = disease_input(image, lung, pre)  # the masks are cleaned already
        assert box is not None  # has_lungs: the ROI has a box
        y0, y1, x0, x1 = box
        mask = resize_mask(lung[y0:y1, x0:x1], pre.size).astype(bool)
        heat, _ = heatmaps(model, scorer.model_input("disease", [u8]))
        values.append(concordance(heat[0], mask))
    if not values:
        raise CxrtuneError("the HCS gate found lungs in none of the gate manifest's images")
    return {"hcs": float(np.mean([v["hcs"] for v in values])),
            "hcs_pixels": float(np.mean([v["hcs_pixels"] for v in values])),
            "hcs_chance": float(np.mean([v["hcs_chance"] for v in values])), "images": len(values)}


def score_mae(scorer, rows, reader: str) -> dict:
    """The bundle's score MAE on the rows that have a reference: ``reader``'s grades, else the
    manifest's only reader's, else zones/masks (as ``evaluate`` and ``calibrate`` choose); a
    partial or unscored record counts as the worst error for its reference (``score_error``).

    Raises:
        CxrtuneError: no reader named and the manifest has several, or no row has a reference."""
    readers = manifests.readers_in(rows)
    if not reader and len(readers) > 1:
        raise CxrtuneError(f"the gate manifest has several readers ({', '.join(readers)}): name one, "
                           "score_mae<=X:READER")
    reference = resolve_reference(reader or "auto", readers, ())
    errors, not_scored = [], 0
    for row, _, record, _ in score_rows(scorer, rows, storage.ContentCache(), progress=False):
        ref = reference_zones(row, reference=reference)
        if ref is not None:
            errors.append(score_error(record, sum(ref)))
            not_scored += record["status"] != "scored"
    if not errors:
        raise CxrtuneError("the score_mae gate found no row with a reference in the gate manifest")
    return {"score_mae": float(np.mean(errors)), "images": len(errors), "not_scored": not_scored,
            "reference": reference}


def check_gates(gates: list[Gate], bundle: bool, manifest: str | None) -> None:
    """What can be checked before anything is written: a bundle gate needs a bundle and a gate
    manifest, a hide-and-seek gate a readable report."""
    for gate in gates:
        if gate.kind in BUNDLE_ONLY and not bundle:
            raise CxrtuneError(f"--gate {gate.rule} audits a bundle (both stages): give it to `cxrtune bundle make`")
        if gate.kind in BUNDLE_ONLY and not manifest:
            raise CxrtuneError(f"--gate {gate.rule} needs --gate-manifest: the images to audit on")
        if gate.kind == "hide-and-seek" and not storage.exists(gate.arg):
            raise CxrtuneError(f"--gate {gate.rule}: no hide-and-seek report at {gate.arg}")


def run_gates(gates: list[Gate], bundle: str | None = None, manifest: str | None = None, limit: int = 64) -> dict:
    """Evaluate every gate. Never raises for a failed gate (:func:`enforce` does): the results are
    recorded either way.

    Args:
        gates: parsed rules (:func:`parse_gate`).
        bundle: the bundle that bundle gates (concordance, score MAE) score; None for gates on a run.
        manifest: the manifest whose rows bundle gates score (its first ``limit`` readable rows).

    Returns:
        ``{rule: {"value", "threshold", "passed", ...}}`` in the order of ``gates``."""
    results: dict = {}
    loaded: dict = {}

    def bundle_and_rows():  # read once for every bundle gate
        if not loaded:

            loaded["scorer"] = load_bundle(bundle, device="cpu", runtime="torch", batch_size=8)
            df = manifests.load_manifest(manifest)
            held_out = df[df["split"] != "train"] if "split" in df.columns else df
            if held_out.empty:
                raise CxrtuneError(f"{manifest}: the gate manifest holds training rows only, and a gate judged on "
                                   "them would flatter the model: give one with val or test rows")
            loaded["rows"] = pick_rows(held_out, None, limit)
        return loaded["scorer"], loaded["rows"]

    check_gates(gates, bool(bundle), manifest)
    for gate in gates:
        if gate.kind == "hide-and-seek":
            report = json.loads(storage.read_text(gate.arg))
            verdict = report.get("verdict") or {}
            if "flagged" not in verdict:
                raise CxrtuneError(f"{gate.arg}: not a hide-and-seek report (no verdict)")
            removed = (report.get("representations") or {}).get("lungs_removed", {})
            results[gate.rule] = {"passed": not verdict["flagged"], "reason": verdict.get("reason", ""),
                                  "lungs_removed_accuracy": removed.get("accuracy"),
                                  "retained_skill": (report.get("retained_skill") or {}).get("lungs_removed")}
        elif gate.kind == "hcs":

            scorer, rows = bundle_and_rows()
            hcs = bundle_concordance(scorer, [scan.image for _, scan in readable_scans(rows, storage.ContentCache())])
            results[gate.rule] = {**hcs, "value": hcs["hcs"], "threshold": gate.threshold,
                                  "passed": hcs["hcs"] >= gate.threshold}
        else:
            scorer, rows = bundle_and_rows()
            mae = score_mae(scorer, rows, gate.arg)
            results[gate.rule] = {**mae, "value": mae["score_mae"], "threshold": gate.threshold,
                                  "passed": mae["score_mae"] <= gate.threshold}
    return results


def enforce(results: dict) -> None:
    """Raise :class:`GateFailed` naming each failed gate and its numbers."""
    failed = {rule: r for rule, r in results.items() if not r["passed"]}
    if failed:
        lines = [f"{rule}: " + (f"{r['value']:.3f} (limit {r['threshold']:g})" if "value" in r else r.get("reason", "failed"))
                 for rule, r in failed.items()]
        raise GateFailed("refused by release gate(s): " + "; ".join(lines))


def make_gated_bundle(lung_run: str, disease_run: str, out_uri: str, gates: list[Gate],
                      gate_manifest: str | None = None, gate_limit: int = 64, **bundle_args) -> BundleMeta:
    """:func:`~cxrtune.model.artifacts.make_bundle` behind release gates: the gates are checked
    before anything is written and run on a candidate bundle in a temporary folder; only a bundle
    that passes is published at ``out_uri``, its gate results in ``audits``. A refused bundle (or
    one whose audit could not run) is never published, so nothing is left to be served.

    Args:
        gates: parsed rules (:func:`parse_gate`); none makes a plain bundle.
        bundle_args: ``zone_threshold``, ``name`` as :func:`make_bundle` takes them.

    Raises:
        GateFailed: a gate refused the bundle (its numbers in the message)."""
    if not gates:
        return make_bundle(lung_run, disease_run, out_uri, **bundle_args)
    check_gates(gates, bundle=True, manifest=gate_manifest)
    require_new_bundle(out_uri)
    name = bundle_args.pop("name", "") or folder_name(out_uri)
    with tempfile.TemporaryDirectory(prefix="cxrtune-gated-") as tmp:
        candidate = f"{tmp}/candidate"
        meta = make_bundle(lung_run, disease_run, candidate, name=name, **bundle_args)
        results = run_gates(gates, bundle=candidate, manifest=gate_manifest, limit=gate_limit)
        enforce(results)
        contents = {f: read_bundle_file(candidate, f, meta) for f in bundle_files(meta)}
        return publish_bundle(out_uri, replace(meta, audits={**meta.audits, "gates": results}), contents)



def record_gates(checkpoint_uri: str, results: dict) -> None:
    """Add gate results to a checkpoint's ``audits`` (a promoted run's ``best``), typed."""
    meta = read_checkpoint_meta(checkpoint_uri)
    write_checkpoint_meta(checkpoint_uri, replace(meta, audits={**meta.audits, "gates": results}))


def promote_gated(gates: list[Gate], promote: Callable[[], str]) -> tuple[str, dict]:
    """A sweep's trial promoted behind release gates: the gates run before anything is written,
    and their results are recorded in the promoted run's ``best`` checkpoint.

    Args:
        gates: parsed rules (:func:`parse_gate`); none promotes without gates.
        promote: writes the run and returns its URI (:func:`cxrtune.search.report.promote`; this
            layer may not import search, so it is passed in).

    Returns:
        The run's URI and the gate results (empty without gates).

    Raises:
        GateFailed: a gate refused; nothing was written."""
    results = run_gates(gates)
    enforce(results)
    run = promote()
    if results:
        record_gates(storage.join(run, "best"), results)
    return run, results
