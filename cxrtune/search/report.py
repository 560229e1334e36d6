"""``cxrtune report`` and ``cxrtune promote`` over a finished (or running) experiment.

Importance: a random forest on trial configs -> metric, Optuna's mean-decrease-impurity evaluator
(seed 004 Fig. 7, fast.ai style; importance <= 0.05 = not important). Correlation: Pearson's r of
each hyperparameter with the metric (Fig. 8); a categorical one gets one r per value (indicator).
Conditional parameters (``encoder|Unet``) vary in their set of trials, so they enter the
correlation table but not the forest, which needs parameters every trial has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import storage
from ..config_files import with_overrides
from ..data import manifest
from ..errors import CxrtuneError
from ..jsonsafe import json_safe
from ..model.artifacts import (
    RunSummary,
    SearchRecord,
    read_checkpoint_meta,
    read_run_summary,
    write_checkpoint_meta,
    write_run_summary,
)
from ..model.grading import GradeConfig, grid_table
from ..model.models import build_model
from ..model.train import TrainConfig, refuse_an_existing_run, train
from ..plots import figure_png, pyplot
from .latency_table import TRIAL_COLUMN, LatencyTable, load_latency_table
from .search_space import settings_of
from .tuning import (
    COST_METRIC,
    LATENCY_TABLE_FILE,
    TuneOptions,
    check_split_unchanged,
    cost_metric_for,
    load_options,
    split_condition,
)

IMPORTANCE_FLOOR = 0.05
AT_BEST = {"grade": ("val_weighted_f1", "val_accuracy")}  # also read at the best epoch, per task


def _analysis(exp_uri: str, o: TuneOptions):
    from ray.tune import ExperimentAnalysis

    space = o.search_space()
    fs, path = storage.pyarrow_filesystem(exp_uri)
    try:
        return ExperimentAnalysis(path, storage_filesystem=fs, default_metric=space.metric if not o.multi_objective else None,
                                  default_mode=space.mode if not o.multi_objective else None), space
    except Exception as exc:  # noqa: BLE001
        raise CxrtuneError(f"{exp_uri}: cannot read the Tune experiment ({type(exc).__name__}: {exc})") from None


def trials_table(exp_uri: str, latency: LatencyTable | None = None) -> tuple[pd.DataFrame, TuneOptions]:
    """One row per trial: its sampled parameters, status, epochs, last and best metric; with a
    ``latency`` table and several objectives, each trial's measured ``int8_ms`` from it."""
    o = load_options(exp_uri)
    analysis, space = _analysis(exp_uri, o)
    rows = []
    frames = analysis.trial_dataframes
    for t in analysis.trials:
        df = frames.get(t.trial_id, pd.DataFrame())
        row = {"trial_id": t.trial_id, "status": t.status}
        row.update({f"param:{k}": v for k, v in t.config.items()})
        last = t.last_result or {}
        row["epochs"] = last.get("training_iteration", 0)
        row["time_s"] = last.get("time_total_s", float("nan"))
        if space.metric in df:
            series = df[space.metric]
            row[space.metric] = float(series.iloc[-1])
            row["best_" + space.metric] = float(series.max() if space.mode == "max" else series.min())
            at_best = series.idxmax() if space.mode == "max" else series.idxmin()
            for extra in AT_BEST.get(space.task, ()):  # e.g. the weighted F1 of the epoch with the best MAE
                if extra in df:
                    row[f"{extra}@best"] = float(df.loc[at_best, extra])
        if o.multi_objective:
            row.update(_front_columns(df, t.status, row["epochs"], o))
        rows.append(row)
    table = pd.DataFrame(rows)
    if latency is not None and o.multi_objective and len(table):
        table[TRIAL_COLUMN] = latency.trial_latency(table, space)
    return table, o


def _front_columns(df: pd.DataFrame, status: str, epochs: int, o: TuneOptions) -> dict:
    """A trial's cost (its last ``gmacs``), each constraint's metric (last value), ``complete``
    (trained to the sweep's last epoch, not stopped or errored) and ``feasible`` (every constraint
    met by its last result; a metric never reported fails it)."""
    space = o.search_space()
    out: dict = {"complete": status == "TERMINATED" and epochs >= o.epochs(space)}
    for cost in dict.fromkeys([COST_METRIC, o.cost_metric]):
        if cost in df:
            out[cost] = float(df[cost].iloc[-1])
    feasible = True
    for c in o.trial_constraints():
        value = float(df[c.metric].iloc[-1]) if c.metric in df and len(df) else float("nan")
        out[c.metric] = value
        feasible = feasible and not math.isnan(value) and c.violation(value) <= 0
    out["feasible"] = feasible
    return out


def _distributions(space, columns: list[str]) -> dict:
    import optuna.distributions as d

    by_name = {p.name: p for p in space.params}
    out: dict[str, d.BaseDistribution] = {}
    for col in columns:
        name = col.split(":", 1)[1]
        base, _, parent = name.partition("|")
        p = by_name.get(base)
        if p is None:
            continue
        if p.type == "choice":
            values = p.values[parent] if parent and parent in p.values else (p.values.get("default") if parent else p.values)
            out[name] = d.CategoricalDistribution(list(values))
        elif p.type == "int":
            out[name] = d.IntDistribution(int(p.bounds[0]), int(p.bounds[1]), step=int(p.step or 1))
        else:
            out[name] = d.FloatDistribution(p.bounds[0], p.bounds[1], log=p.type == "log-float")
    return out


def importance(table: pd.DataFrame, o: TuneOptions) -> dict:
    """Optuna MDI importances over the parameters every finished trial has."""
    import optuna

    space = o.search_space()
    target = "best_" + space.metric
    done = table[table[target].notna()] if target in table else table.iloc[0:0]
    cols = [c for c in done.columns if c.startswith("param:") and done[c].notna().all()]
    dists = _distributions(space, cols)
    if len(done) < 2 or not dists:
        return {}
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    for _, r in done.iterrows():
        params = {n: (r[f"param:{n}"].item() if hasattr(r[f"param:{n}"], "item") else r[f"param:{n}"]) for n in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r[target])))
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError):
        return {}


def correlation(table: pd.DataFrame, metric: str) -> dict:
    """Pearson's r between ``metric`` and each parameter over the trials table (seed 004 Fig. 8):
    numeric parameters directly, choices one level against the rest (``name=level``)."""
    out: dict = {}
    y_all = table[metric] if metric in table else None
    if y_all is None:
        return out
    for col in [c for c in table.columns if c.startswith("param:")]:
        sub = table[[col, metric]].dropna()
        if len(sub) < 3:
            continue
        name, x, y = col.split(":", 1)[1], sub[col], sub[metric].astype(float)
        if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
            r = _pearson(x.astype(float), y)
            if r is not None:
                out[name] = r
        else:
            levels = {}
            for level in sorted(x.astype(str).unique()):
                r = _pearson((x.astype(str) == level).astype(float), y)
                if r is not None:
                    levels[level] = r
            if levels:
                out[name] = levels
    return out


def _pearson(x: pd.Series, y: pd.Series) -> float | None:
    if x.std() == 0 or y.std() == 0:
        return None
    r = float(np.corrcoef(x, y)[0, 1])
    return None if math.isnan(r) else r


def pareto_front(table: pd.DataFrame, metric: str, mode: str, cost: str) -> pd.DataFrame:
    """The complete, feasible trials no other such trial beats on both the metric and the ``cost``
    column (GMACs, or a latency table's ``int8_ms``): Optuna's ``best_trials`` of an in-memory study
    holding them, sorted by cost. Stopped trials and constraint violators are never on it."""
    import optuna

    needed = {metric, cost, "complete", "feasible", "trial_id"}
    if not needed <= set(table):  # no trial has reported them yet (a sweep just started, or every trial failed)
        return pd.DataFrame(columns=[*table.columns, *sorted(needed - set(table))])
    sub = table[table["complete"].astype(bool) & table["feasible"].astype(bool)].dropna(subset=[metric, cost])
    study = optuna.create_study(directions=["maximize" if mode == "max" else "minimize", "minimize"])
    study.add_trials([optuna.trial.create_trial(values=[float(r[metric]), float(r[cost])], user_attrs={"row": i})
                      for i, r in sub.iterrows()])
    keep = [t.user_attrs["row"] for t in study.best_trials] if len(sub) else []
    return sub.loc[keep].sort_values([cost, "trial_id"])


class NoPointMeetsRule(CxrtuneError):
    """A well-formed ``--pick`` rule that no point of the front meets: a finding about the sweep,
    not a mistake in the rule."""


@dataclass(frozen=True)
class PickRule:
    """How ``cxrtune promote --pick`` takes one point of a multi-objective front:
    ``KIND[:CONDITION,...]``.

    * KIND ``fastest`` (lowest cost; ties: the more accurate) or ``most-accurate`` (best
      objective; ties: the cheaper);
    * CONDITION ``NAME<=VALUE`` or ``NAME>=VALUE`` over the front's columns, ``accuracy`` naming
      the objective's metric and ``cost`` the front's cost (GMACs, or ``int8_ms`` when the front
      was drawn with a latency table); VALUE a number, or ``best``, ``best+D``,
      ``best-D`` for ``accuracy`` and ``cost`` only, ``best`` being that objective's best value on
      the front (the lowest cost; the lowest or highest metric, as the objective is minimised or
      maximised).

    E.g. ``fastest:accuracy<=best+0.05`` (the cheapest point within 0.05 of the lowest score MAE),
    ``most-accurate:cost<=1.5``, ``most-accurate:int8_ms<=3.0`` or
    ``most-accurate:val_fp_rate_normal<=0.08``."""
    kind: str
    conditions: tuple[tuple[str, str, str], ...]
    text: str

    KINDS = ("fastest", "most-accurate")

    @classmethod
    def parse(cls, text: str) -> PickRule:
        kind, _, rest = text.partition(":")
        if kind not in cls.KINDS:
            raise CxrtuneError(f"--pick {text!r}: start with {' or '.join(cls.KINDS)}, e.g. fastest:accuracy<=best+0.05")
        conditions = tuple(split_condition(part, f"--pick {text!r}: condition")
                           for part in filter(None, (c.strip() for c in rest.split(","))))
        return cls(kind, conditions, text)

    def pick(self, front: pd.DataFrame, metric: str, mode: str, cost: str) -> pd.Series:
        """The chosen row of ``front`` (:func:`pareto_front` over the same ``cost``); a clear error
        when none meets the rule."""
        if front.empty:
            raise CxrtuneError("the front is empty: no trial is complete, feasible and scored")
        aliases = {"accuracy": metric, "cost": cost}
        keep = pd.Series(True, index=front.index)
        for name, op, value in self.conditions:
            column = aliases.get(name, name)
            if column not in front:
                raise CxrtuneError(f"--pick {self.text!r}: no column {name!r}; use accuracy, cost or one of "
                                   f"{', '.join(c for c in front.columns if not c.startswith('param:'))}")
            if value.startswith("best") and column not in (metric, cost):
                raise CxrtuneError(f"--pick {self.text!r}: 'best' is defined for accuracy and cost only; give "
                                   f"{name} a number")
            lowest = column == cost or mode == "min"
            limit = self._limit(value, front[column].min() if lowest else front[column].max())
            keep &= front[column] <= limit if op == "<=" else front[column] >= limit
        chosen = front[keep]
        if chosen.empty:
            raise NoPointMeetsRule(f"--pick {self.text!r}: no point of the front ({len(front)}) meets it")
        accuracy = chosen[metric] if mode == "min" else -chosen[metric]
        order = ([cost, "_accuracy"] if self.kind == "fastest" else ["_accuracy", cost])
        return chosen.assign(_accuracy=accuracy).sort_values([*order, "trial_id"]).iloc[0].drop("_accuracy")

    def _limit(self, value: str, best: float) -> float:
        try:
            if value.startswith("best"):
                return best + (float(value[4:]) if value[4:] else 0.0)
            return float(value)
        except ValueError:
            raise CxrtuneError(f"--pick {self.text!r}: {value!r} is not a number, best, best+D or best-D") from None


def write_report(exp_uri: str, out_dir: str, latency_table: str | None = None) -> list[str]:
    """``cxrtune report``: the trials table, importance and correlation (JSON and plots), the Pareto
    front of a multi-objective sweep and the grading grid. Returns the files written in ``out_dir``.

    Args:
        latency_table: a measured latency table (:mod:`.latency_table`): the trials gain
            ``int8_ms`` and the front is drawn over it instead of GMACs."""
    plt = pyplot()

    table, o = trials_table(exp_uri, load_latency_table(latency_table) if latency_table else None)
    cost = front_cost(o, latency_table)
    if table.empty:
        raise CxrtuneError(f"{exp_uri}: the experiment has no trials yet")
    space = o.search_space()
    metric = "best_" + space.metric if "best_" + space.metric in table else space.metric
    written = []

    def put(name: str, data: bytes) -> None:
        storage.write_bytes(storage.join(out_dir, name), data)
        written.append(name)

    put("trials.csv", table.to_csv(index=False).encode())
    if o.grid and space.task == "grade":

        put("grid.md", grid_table(table, metric).encode())
    imp = importance(table, o)
    corr = correlation(table, metric)
    put("importance.json", json.dumps({"metric": metric, "evaluator": "optuna MeanDecreaseImpurity",
                                       "not_important_below": IMPORTANCE_FLOOR, "importance": imp}, indent=2).encode())
    put("correlation.json", json.dumps(json_safe({"metric": metric, "pearson": corr}), indent=2).encode())

    if imp:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(imp) + 1))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color=["#888" if imp[n] <= IMPORTANCE_FLOOR else "#1f77b4" for n in names])
        ax.axvline(IMPORTANCE_FLOOR, color="k", ls=":", lw=1)
        ax.set(xlabel="importance (MDI)", title=f"Hyperparameter importance for {metric}")
        put("importance.png", figure_png(fig))
    flat = {}
    for k, v in corr.items():
        if isinstance(v, dict):
            flat.update({f"{k}={lvl}": r for lvl, r in v.items()})
        else:
            flat[k] = v
    if flat:
        fig, ax = plt.subplots(figsize=(6, 0.3 * len(flat) + 1))
        names = sorted(flat, key=lambda n: flat[n])
        ax.barh(names, [flat[n] for n in names], color=["#d62728" if flat[n] < 0 else "#2ca02c" for n in names])
        ax.set(xlabel="Pearson r with " + metric, title="Linear correlation")
        put("correlation.png", figure_png(fig))
    if o.multi_objective:
        front = pareto_front(table, space.metric, space.mode, cost)
        put("pareto.csv", front.to_csv(index=False).encode())
        put("pareto.png", figure_png(front_figure(table, front, space.metric, o.constraints, cost)))
    return written


def front_cost(o: TuneOptions, latency_table: str | None = None) -> str:
    """The column a front's cost is read from: measured ``int8_ms`` with a latency table (given
    here, or the sweep's own), else GMACs. A table given for a sweep without a front is refused."""
    if latency_table and not o.multi_objective:
        raise CxrtuneError("--latency-table redraws a multi-objective front over measured latency; this sweep has "
                           "one objective")
    return cost_metric_for(latency_table or o.latency_table)


def front_figure(table: pd.DataFrame, front: pd.DataFrame, metric: str, constraints: Sequence[str], cost: str):
    """Every scored trial by cost and accuracy: complete feasible ones in blue, constraint
    violators as grey crosses, stopped trials as grey circles, the front in red.

    Returns:
        The matplotlib figure (``figure_png`` renders it)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    scored = table.dropna(subset=[metric, cost]) if {metric, cost} <= set(table) else table.iloc[0:0]
    complete, feasible = scored["complete"].astype(bool), scored["feasible"].astype(bool)
    groups = ((complete & feasible, {"c": "#1f77b4", "marker": "o"}, "complete, feasible"),
              (~feasible, {"c": "#999", "marker": "x"}, "violates one of " + ", ".join(constraints or ["its constraints"])),
              (~complete & feasible, {"facecolors": "none", "edgecolors": "#999", "marker": "o"}, "stopped early"))
    for keep, style, label in groups:
        if keep.any():
            ax.scatter(scored.loc[keep, cost], scored.loc[keep, metric], label=label, **style)
    if len(front):
        ax.plot(front[cost], front[metric], "o-", c="#d62728", label="Pareto front")
    xlabel = ("int8 ms per image, measured (latency table)" if cost == TRIAL_COLUMN
              else "GMACs per image (proxy for served latency)")
    ax.set(xlabel=xlabel, ylabel=metric, title="Accuracy vs cost")
    ax.legend(fontsize=8)
    return fig


def top_grade_recipes(exp_uri: str, top: int = 5) -> list:
    """The ``top`` grading recipes of a sweep per lung side, by their best validation macro MAE
    (seed 000: the top five then go to 5-fold cross-validation), as GradeConfigs."""
    table, o = trials_table(exp_uri)
    space = o.search_space()
    if space.task != "grade":
        raise CxrtuneError(f"{exp_uri}: not a grading sweep (task {space.task})")
    target = "best_" + space.metric
    if target not in table or table[target].isna().all():
        raise CxrtuneError(f"{exp_uri}: no trial has reported {space.metric} yet")
    done = table[table[target].notna()].sort_values([target, "trial_id"], kind="stable")  # ties: a fixed order
    side_col = "param:side" if "param:side" in done else None
    groups = done.groupby(side_col, sort=False) if side_col else [(None, done)]
    out = []
    for _, block in groups:
        for _, row in block.head(top).iterrows():
            # as many epochs as the sweep trained it for
            out.append(replace(space.train_config(settings_of(row, "param:")), epochs=o.train_epochs(space)))
    return out


def grade_cv_inputs(exp_uri: str | None, top: int, recipe_files: Sequence[str] = (),
                    manifest_uri: str | None = None) -> tuple[list[GradeConfig], pd.DataFrame]:
    """What ``cxrtune grade cv`` cross-validates: the recipe files given, else the sweep's ``top``
    recipes per side (:func:`top_grade_recipes`); on ``manifest_uri``, else the sweep's manifest.

    Raises:
        CxrtuneError: recipe files without a manifest (they name none)."""
    if recipe_files:
        if not manifest_uri:
            raise CxrtuneError("--config needs --manifest")
        recipes = [GradeConfig.from_yaml(c) for c in recipe_files]
    else:
        if not exp_uri:
            raise CxrtuneError("give the grading sweep (--experiment) or recipe files (--config)")
        recipes = top_grade_recipes(exp_uri, top)
    if not manifest_uri:
        assert exp_uri is not None  # recipe files came with a manifest
        manifest_uri = load_options(exp_uri).manifest
    return recipes, manifest.load_manifest(manifest_uri)


def _chosen_trial(analysis, table_of, o: TuneOptions, exp_uri: str, pick: str | None, cost: str,
                  trial_id: str | None = None):
    """(trial, checkpoint, how it was chosen): the best trial's best checkpoint of a single-
    objective sweep, or the ``pick`` rule's point of a multi-objective front over ``cost`` with
    its last checkpoint (the epoch its front values come from); or the trial named ``trial_id``,
    its checkpoint chosen the same way."""
    space = o.search_space()
    if trial_id is not None:
        if pick:
            raise CxrtuneError("--trial names the trial to promote; --pick chooses one from the front: give one")
        trial = next((t for t in analysis.trials if t.trial_id == trial_id), None)
        if trial is None:
            raise CxrtuneError(f"{exp_uri}: no trial {trial_id!r}; the report's trials.csv lists its "
                               f"{len(analysis.trials)} trials' ids")
        return trial, _promoted_checkpoint(analysis, trial, o), f"trial {trial_id}"
    if not o.multi_objective:
        if pick:
            raise CxrtuneError("--pick chooses a point of a multi-objective front; this sweep has one objective")
        trial = analysis.get_best_trial(space.metric, space.mode, scope="all")
        if trial is None:
            raise CxrtuneError(f"{exp_uri}: no finished trial reports {space.metric}")
        return trial, _promoted_checkpoint(analysis, trial, o), f"best {space.metric}"
    if not pick:
        raise CxrtuneError("a multi-objective sweep has no single best trial: choose a point of its front with "
                           "--pick, e.g. --pick 'fastest:accuracy<=best+0.05' (docs/search_spaces.md)")
    front = pareto_front(table_of(), space.metric, space.mode, cost)
    row = PickRule.parse(pick).pick(front, space.metric, space.mode, cost)
    trial = next(t for t in analysis.trials if t.trial_id == row["trial_id"])
    return trial, _promoted_checkpoint(analysis, trial, o), pick


def _promoted_checkpoint(analysis, trial, o: TuneOptions):
    """The checkpoint that stands for ``trial``: its last in a multi-objective sweep (the epoch its
    front values come from), its best by the objective in a single-objective one."""
    if o.multi_objective:
        return analysis.get_last_checkpoint(trial)
    space = o.search_space()
    return analysis.get_best_checkpoint(trial, space.metric, space.mode)


def promote(exp_uri: str, run_uri: str, retrain: bool = False, epochs: int | None = None,
            pick: str | None = None, overrides: Sequence[str] = (), latency_table: str | None = None,
            trial_id: str | None = None) -> str:
    """Export the chosen trial's checkpoint as a run (``best/model.pt`` + ``best/meta.json``), or
    with ``retrain`` train its config again on all training data (not only the tuning subset),
    with the batch size that fills the GPU as in seed 004. The chosen trial is a single-objective
    sweep's best, the ``pick`` rule's point (:class:`PickRule`) of a multi-objective front, or
    the trial named ``trial_id`` (e.g. one of several candidates to be compared after retraining).

    What chose it (the sweep, trial, rule, space, sampler, seed and the manifest's split hash)
    goes into the checkpoint's ``search`` metadata and ``run.json``; a bundle's model card shows it.

    Args:
        overrides: ``key=value`` settings over the trial's config for ``retrain`` (``cxrtune
            promote --set``, e.g. ``max_train_images=2600`` or ``model.encoder_weights=RUN``),
            recorded with the search.
        latency_table: ``pick`` chooses on the front over this table's measured ``int8_ms``
            (:func:`write_report`'s); the table the front's cost came from, this or the sweep's
            own, is recorded with the search with its SHA-256."""
    if overrides and not retrain:
        raise CxrtuneError("--set changes a retrained config: add --retrain")
    refuse_an_existing_run(run_uri)  # a promoted run is new: another's best/ is never overwritten half-way
    o = load_options(exp_uri)
    analysis, space = _analysis(exp_uri, o)
    if space.task == "grade":
        raise CxrtuneError("a grading sweep has no scorer stage to promote: cross-validate its best recipes "
                           f"with `cxrtune grade cv --experiment {exp_uri}`")
    cost = front_cost(o, latency_table)
    latency = load_latency_table(latency_table) if latency_table else None
    trial, ckpt, how = _chosen_trial(analysis, lambda: trials_table(exp_uri, latency)[0], o, exp_uri, pick, cost,
                                     trial_id)
    if latency is None and o.latency_table:  # the sweep's own table: the copy its trials read
        latency = load_latency_table(storage.join(exp_uri, LATENCY_TABLE_FILE))
    if ckpt is None:
        raise CxrtuneError(f"{exp_uri}: trial {trial.trial_id} has no checkpoint")
    now = check_split_unchanged(o, "the promoted trial's figures and any retraining would not be of the data it "
                                   "was chosen on")
    search = SearchRecord(
        experiment=exp_uri, trial=trial.trial_id, pick=how, space=o.space_source, space_definition=o.space,
        objectives=[space.metric, *([o.cost_metric] if o.multi_objective else [])], constraints=list(o.constraints),
        sampler=o.sampler, scheduler=o.scheduler, seed=o.seed, split_hash=o.split_hash or now, manifest=o.manifest,
        retrained=retrain, overrides=with_overrides({}, overrides),
        latency_table=latency.source if latency else "", latency_table_sha256=latency.sha256 if latency else "").to_dict()

    with ckpt.as_directory() as d:
        meta = replace(read_checkpoint_meta(str(d)), search=search)
        if not retrain:
            storage.write_bytes(storage.join(run_uri, "best", "model.pt"), (Path(d) / "model.pt").read_bytes())
            write_checkpoint_meta(storage.join(run_uri, "best"), meta)
            write_run_summary(run_uri, RunSummary(config=meta.config, promoted_from=exp_uri, trial=trial.trial_id,
                                                  metrics=meta.metrics, search=search))
            return run_uri
    cfg = TrainConfig.from_dict(with_overrides({**meta.config, "tuning_subset": False, "patience": 6}, overrides))
    if epochs:
        cfg = replace(cfg, epochs=epochs)
    cfg = replace(cfg, batch_size=fill_gpu_batch_size(cfg))

    train(cfg, manifest.load_manifest(o.manifest), run_uri)
    best = storage.join(run_uri, "best")
    write_checkpoint_meta(best, replace(read_checkpoint_meta(best), search=search))
    write_run_summary(run_uri, replace(read_run_summary(run_uri), search=search))
    return run_uri


def fill_gpu_batch_size(cfg, target: float = 0.9, limit: int = 256) -> int:
    """The largest power-of-two batch whose training step stays under ``target`` of GPU memory
    (seed 004 filled 90-100 %). On a CPU the configured batch size is kept."""

    if not torch.cuda.is_available():
        return cfg.batch_size
    model = build_model(cfg.model).cuda().to(memory_format=torch.channels_last)
    total = torch.cuda.get_device_properties(0).total_memory
    best, bs = cfg.batch_size, cfg.batch_size
    while bs <= limit:
        try:
            torch.cuda.reset_peak_memory_stats()
            x = torch.rand(bs, cfg.model.in_channels, cfg.size, cfg.size, device="cuda")
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            (out[0] if isinstance(out, tuple) else out).float().mean().backward()
            model.zero_grad(set_to_none=True)
            if torch.cuda.max_memory_allocated() > target * total:
                break
            best, bs = bs, bs * 2
        except torch.cuda.OutOfMemoryError:
            break
    del model
    torch.cuda.empty_cache()
    return best
