"""YAML search spaces, validated, translated to an Optuna define-by-run function.

Schema (``docs/search_spaces.md`` has examples)::

    task: lung | disease | grade         # which stage the trials train (grade: per-lung 0-3 grades)
    objective: dice | dice_cls | score_mae | macro_mae   # default: dice (lung), dice_cls (disease),
                                         # macro_mae (grade)
    fixed:                               # TrainConfig (GradeConfig for grade) settings of every trial
      batch_size: 4
      model: {in_channels: 1}            # grade: classifier: {in_channels: 1, weights: RUN}
    parameters:                          # tuned settings, sampled in this order
      NAME: {type: choice, values: [a, b]}
      NAME: {type: int, low: 256, high: 512, step: 32}
      NAME: {type: float, low: 0.0, high: 1.0}
      NAME: {type: log-float, low: 1.0e-4, high: 1.0e-2}
      NAME: {type: choice, given: OTHER, values: {OTHER_VALUE: [..], default: [..]}}  # conditional
    warm_start:                          # known good configurations, tried first (may be partial)
      - {arch: Unet, encoder: resnet34, size: 256}

``NAME`` is a TrainConfig setting (``lr``, ``size``, ``seg_loss``...) or a model setting
(``arch``, ``encoder``, ``in_channels``, ``dropout``); for ``task: grade`` a GradeConfig setting
(``side``, ``roi``, ``balancing``, ``lr``...) or a classifier setting (``backbone``, ``weights``).
A conditional parameter (``given``) draws
from the list for the value its parent took, so an encoder can depend on the architecture; each
branch is its own Optuna parameter (``encoder|Unet``) so the sampler models them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..config_files import load_yaml, typed_value
from ..errors import CxrtuneError
from ..model.classify import BALANCING
from ..model.grading import CLASSIFIER_KEYS, GRADE_KEYS, ROI_SCHEMES, SIDES, GradeConfig
from ..model.losses import CLS_LOSSES, OPTIMIZERS, SEG_LOSSES
from ..model.models import ARCHITECTURES, DECODER_PRESETS, ModelConfig
from ..model.train import TASKS, TrainConfig

TYPES = ("choice", "int", "float", "log-float")
MODEL_KEYS = {f.name for f in fields(ModelConfig)} - {"classification"}
TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"model", "task"}
SPACE_TASKS = (*TASKS, "grade")
# per task: the nested settings' key in `fixed`, their names, and the recipe's own names
SCHEMA = {"lung": ("model", MODEL_KEYS, TRAIN_KEYS), "disease": ("model", MODEL_KEYS, TRAIN_KEYS),
          "grade": ("classifier", CLASSIFIER_KEYS, GRADE_KEYS)}
OBJECTIVES = {"dice": ("val_dice", "max"), "dice_cls": ("val_dice_f1", "max"), "score_mae": ("val_score_mae", "min"),
              "macro_mae": ("val_macro_mae", "min")}
TASK_OBJECTIVES = {"lung": ("dice",), "disease": ("dice", "dice_cls", "score_mae"), "grade": ("macro_mae",)}
DEFAULT_OBJECTIVE = {"lung": "dice", "disease": "dice_cls", "grade": "macro_mae"}
CHECK_VALUES = {"arch": set(ARCHITECTURES), "optimizer": set(OPTIMIZERS),
                "seg_loss": set(SEG_LOSSES), "cls_loss": set(CLS_LOSSES),
                "roi": set(ROI_SCHEMES), "side": set(SIDES), "balancing": set(BALANCING),
                "decoder": set(DECODER_PRESETS)}


def settings_of(params: Mapping[str, Any], prefix: str = "") -> dict:
    """Sampled settings under their own names from Optuna's (``encoder|Unet`` -> ``encoder``), as
    Tune's config holds them, or a trials table's row with ``prefix`` ``param:``: a value a trial
    lacks (the table's NaN) left out, numpy scalars made plain."""
    out = {}
    for key, value in params.items():
        if not str(key).startswith(prefix) or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        out[str(key)[len(prefix):].split("|", 1)[0]] = value.item() if hasattr(value, "item") else value
    return out


@dataclass
class Param:
    name: str
    type: str
    values: Any = None
    low: float | None = None
    high: float | None = None
    step: int | None = None
    given: str | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a numeric parameter (:func:`parse_space` has checked both are numbers)."""
        if self.low is None or self.high is None:
            raise CxrtuneError(f"parameter {self.name}: a {self.type} parameter needs low and high")
        return float(self.low), float(self.high)


@dataclass
class SearchSpace:
    task: str
    objective: str
    fixed: dict
    params: list[Param] = field(default_factory=list)
    source: str = ""
    warm_start: list[dict] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def mode(self) -> str:
        return OBJECTIVES[self.objective][1]

    def suggest(self, trial) -> dict:
        """Optuna define-by-run: sample every parameter into ``trial``; returns the sampled
        settings as a flat dict (conditional names resolved)."""
        out: dict = {}
        for p in self.params:
            name, values = p.name, p.values
            if p.given:
                parent = out[p.given]
                values = p.values.get(parent, p.values.get("default"))
                if values is None:
                    continue
                name = f"{p.name}|{parent}"
            if p.type == "choice":
                out[p.name] = trial.suggest_categorical(name, list(values))
            elif p.type == "int":
                out[p.name] = trial.suggest_int(name, int(p.bounds[0]), int(p.bounds[1]), step=int(p.step or 1))
            else:
                out[p.name] = trial.suggest_float(name, p.bounds[0], p.bounds[1], log=p.type == "log-float")
        return out

    def optuna_params(self, point: dict, where: str = "warm_start") -> dict:
        """A configuration in settings' names -> Optuna's parameter names (``encoder|Unet``), checked
        against the space, for ``Study.enqueue_trial``. Parameters it leaves out are sampled."""
        out: dict = {}
        by_name = {p.name: p for p in self.params}
        unknown = sorted(set(point) - set(by_name))
        if unknown:
            raise _fail(self.source, where, f"{unknown[0]!r} is not a parameter of this space")
        for p in self.params:
            if p.name not in point:
                continue
            value, name, allowed = point[p.name], p.name, p.values
            if p.given:
                parent = point.get(p.given)
                if parent is None:
                    raise _fail(self.source, where, f"{p.name!r} depends on {p.given!r}: give both")
                allowed = p.values.get(parent, p.values.get("default"))
                name = f"{p.name}|{parent}"
            if p.type == "choice" and value not in (allowed or []):
                raise _fail(self.source, where, f"{p.name}={value!r} is not among its choices")
            if p.type != "choice":  # YAML 1.1 reads 1e-3 as text: a number, as a training setting takes it
                try:
                    value = typed_value(value, int if p.type == "int" else float, p.name)
                except CxrtuneError as exc:
                    raise _fail(self.source, where, str(exc)) from None
                if not p.low <= value <= p.high:
                    raise _fail(self.source, where, f"{p.name}={value!r} is outside [{p.low}, {p.high}]")
            out[name] = value
        return out

    def network_points(self) -> list[dict]:
        """Every network the space can draw, as points over its network parameters (arch,
        encoder, decoder, size; those it fixes come from ``fixed:`` in :meth:`train_config`):
        what a latency table must hold. A numeric one must be a finite set (an int with a step)."""
        network = ("arch", "encoder", "decoder", "size")
        varied = {p.name for p in self.params} & {"in_channels", "classification"}
        if varied:
            raise _fail(self.source, f"parameters.{sorted(varied)[0]}", "a latency table is keyed by arch, encoder, "
                        "decoder and size: fix this setting under fixed:")
        points: list[dict] = [{}]
        for p in (p for p in self.params if p.name in network):
            name = p.name
            if p.type == "float" or p.type == "log-float":
                raise _fail(self.source, f"parameters.{name}", "a network setting drawn from a continuous range "
                            "has no finite set of networks to measure: make it a choice or an int with a step")
            grown = []
            for point in points:
                values = p.values
                if p.given:
                    if p.given not in point:
                        raise _fail(self.source, f"parameters.{name}.given", "a network setting may depend on "
                                    "another network setting only (arch, encoder, decoder, size)")
                    values = p.values.get(point[p.given], p.values.get("default"))
                if p.type == "int":
                    low, high = (int(b) for b in p.bounds)
                    values = list(range(low, high + 1, int(p.step or 1)))
                grown += [{**point, name: v} for v in values] if values else [point]
            points = grown
        return points

    def __call__(self, trial) -> None:
        """Ray's OptunaSearch define-by-run hook (a picklable object, since Tune saves the searcher)."""
        self.suggest(trial)

    def train_config(self, sampled: dict) -> TrainConfig | GradeConfig:
        """The config of one trial (TrainConfig, or GradeConfig for ``task: grade``): fixed
        settings, then the sampled ones."""
        nested, nested_keys, _ = SCHEMA[self.task]
        cfg = {k: v for k, v in self.fixed.items() if k != nested}
        inner = dict(self.fixed.get(nested, {}) or {})
        for k, v in sampled.items():
            (inner if k in nested_keys else cfg)[k] = v
        if self.task == "grade":
            return GradeConfig.from_dict({**cfg, "classifier": inner})
        return TrainConfig.from_dict({**cfg, "task": self.task, "model": inner})

    def grid(self) -> dict:
        """Ray Tune ``grid_search`` over every choice parameter (``cxrtune tune --grid``): seed
        000's design, every combination trained. Numeric and conditional parameters have no grid:
        they are refused by name (fix them under ``fixed:``)."""
        from ray import tune

        for p in self.params:
            if p.type != "choice" or p.given:
                raise _fail(self.source, f"parameters.{p.name}", "grid mode crosses plain choice parameters only; "
                            "give this one a value under fixed: or make it a choice")
        return {p.name: tune.grid_search(list(p.values)) for p in self.params}

    def at_sizes(self, sizes: list[int]) -> SearchSpace:
        """The same space drawing its input size from ``sizes``: its networks at other sizes, for a
        latency table (``bench/latency_proxy.py --sizes``) or a check that one covers a bench's
        sizes. Its warm starts are left out: their sizes need not be among ``sizes``."""
        data = {**self.to_dict(), "warm_start": []}
        data["parameters"]["size"] = {"type": "choice", "values": list(sizes)}
        return parse_space(data, f"{self.source or 'the space'} at {'/'.join(map(str, sizes))} px")

    def to_dict(self) -> dict:
        params = {}
        for p in self.params:
            d = {"type": p.type}
            for k in ("values", "low", "high", "step", "given"):
                if getattr(p, k) is not None:
                    d[k] = getattr(p, k)
            params[p.name] = d
        out = {"task": self.task, "objective": self.objective, "fixed": self.fixed, "parameters": params}
        if self.warm_start:
            out["warm_start"] = self.warm_start
        return out


def _fail(source: str, key: str, msg: str) -> CxrtuneError:
    return CxrtuneError(f"{source}: {key}: {msg}")


def _check_values(source: str, key: str, name: str, values: list) -> None:
    allowed = CHECK_VALUES.get(name)
    if allowed:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise _fail(source, key, f"unknown value(s) {bad}; allowed: {', '.join(sorted(allowed))}")


def parse_space(data: dict, source: str = "<space>") -> SearchSpace:  # noqa: C901 - one check per key, each naming it
    """A search space from its parsed YAML, checked whole: every refusal names ``source`` and
    the key (docs/search_spaces.md)."""
    if not isinstance(data, dict):
        raise CxrtuneError(f"{source}: expected a mapping with task, fixed and parameters")
    unknown = set(data) - {"task", "objective", "fixed", "parameters", "description", "warm_start"}
    if unknown:
        raise _fail(source, ", ".join(sorted(unknown)), "unknown top-level key(s); allowed: task, objective, "
                    "fixed, parameters, warm_start, description")
    task = data.get("task")
    if task not in SPACE_TASKS:
        raise _fail(source, "task", f"must be one of {', '.join(SPACE_TASKS)}, got {task!r}")
    objective = data.get("objective") or DEFAULT_OBJECTIVE[task]
    if objective not in OBJECTIVES:
        raise _fail(source, "objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective not in TASK_OBJECTIVES[task]:
        raise _fail(source, "objective", f"{objective!r} is not an objective of task {task} "
                    f"(it has {', '.join(TASK_OBJECTIVES[task])})")
    nested, nested_keys, recipe_keys = SCHEMA[task]
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(source, "fixed", "must be a mapping of training settings")
    for k in fixed:
        if k != nested and k not in recipe_keys:
            raise _fail(source, f"fixed.{k}", f"unknown training setting; known: {', '.join(sorted(recipe_keys))}")
    for k in fixed.get(nested, {}) or {}:
        if k not in nested_keys:
            raise _fail(source, f"fixed.{nested}.{k}", f"unknown {nested} setting; known: {', '.join(sorted(nested_keys))}")
    raw = data.get("parameters") or {}
    if not isinstance(raw, dict) or not raw:
        raise _fail(source, "parameters", "must be a non-empty mapping of NAME: {type: ...}")
    params: list[Param] = []
    seen: dict[str, Param] = {}
    for name, spec in raw.items():
        key = f"parameters.{name}"
        if name not in nested_keys | recipe_keys:
            raise _fail(source, key, f"not a training or {nested} setting; known: "
                        f"{', '.join(sorted(nested_keys | recipe_keys))}")
        if not isinstance(spec, dict):
            raise _fail(source, key, "must be a mapping with a type")
        extra = set(spec) - {"type", "values", "low", "high", "step", "given"}
        if extra:
            raise _fail(source, f"{key}.{sorted(extra)[0]}", "unknown field; allowed: type, values, low, high, step, given")
        ptype = spec.get("type")
        if ptype not in TYPES:
            raise _fail(source, f"{key}.type", f"must be one of {', '.join(TYPES)}, got {ptype!r}")
        p = Param(name, ptype, spec.get("values"), spec.get("low"), spec.get("high"), spec.get("step"), spec.get("given"))
        if p.given is not None:
            if p.given not in seen:
                raise _fail(source, f"{key}.given", f"{p.given!r} must be a parameter listed before {name!r}")
            if ptype != "choice" or not isinstance(p.values, dict):
                raise _fail(source, f"{key}.values", "a conditional parameter is a choice with a mapping "
                            "parent value -> list (and optionally default)")
            for parent_value, lst in p.values.items():
                if not isinstance(lst, list) or not lst:
                    raise _fail(source, f"{key}.values.{parent_value}", "must be a non-empty list")
                _check_values(source, f"{key}.values.{parent_value}", name, lst)
        elif ptype == "choice":
            if not isinstance(p.values, list) or not p.values:
                raise _fail(source, f"{key}.values", "a choice needs a non-empty list of values")
            _check_values(source, f"{key}.values", name, p.values)
        else:
            for bound in ("low", "high"):
                if not isinstance(getattr(p, bound), (int, float)):
                    raise _fail(source, f"{key}.{bound}", f"{ptype} needs a numeric {bound}")
            low, high = p.bounds
            if low >= high:
                raise _fail(source, key, f"low ({p.low}) must be below high ({p.high})")
            if ptype == "log-float" and low <= 0:
                raise _fail(source, f"{key}.low", "log-float needs low > 0")
        params.append(p)
        seen[name] = p
    warm = data.get("warm_start") or []
    if not isinstance(warm, list) or not all(isinstance(w, dict) for w in warm):
        raise _fail(source, "warm_start", "must be a list of mappings NAME: value")
    fixed_values = [*((f"fixed.{k}", k, v) for k, v in fixed.items()),
                    *((f"fixed.{nested}.{k}", k, v) for k, v in (fixed.get(nested) or {}).items())]
    for key, name, value in fixed_values:  # a fixed value as a drawn one is checked
        if isinstance(value, str):
            _check_values(source, key, name, [value])
    space = SearchSpace(task, objective, fixed, params, source, [dict(w) for w in warm])
    try:  # and the settings' types: a trial would fail on them only after Ray had started
        space.train_config({})
    except CxrtuneError as exc:
        raise _fail(source, "fixed", str(exc)) from None
    _check_decoder_presets(space)
    for i, point in enumerate(space.warm_start):
        space.optuna_params(point, f"warm_start[{i}]")  # checked now, not when the sweep starts
    return space


def _check_decoder_presets(space: SearchSpace) -> None:
    """A decoder preset must exist for every architecture it can be drawn with (Linknet has
    ``standard`` only): the refusal comes now, not from a trial that cannot build its model."""
    by_name = {p.name: p for p in space.params}
    decoder, arch = by_name.get("decoder"), by_name.get("arch")
    fixed_model = space.fixed.get("model") or {}
    fixed_decoder = fixed_model.get("decoder")
    if arch is None:
        archs = [fixed_model.get("arch", ModelConfig().arch)]
    elif isinstance(arch.values, dict):  # an architecture conditional on another parameter: every branch
        archs = sorted({a for branch in arch.values.values() for a in branch})
    else:
        archs = list(arch.values)
    for a in archs:
        if decoder is not None and decoder.type == "choice" and decoder.given in ("arch", None):
            values = (decoder.values.get(a, decoder.values.get("default")) or [] if decoder.given == "arch"
                      else decoder.values)
        elif decoder is None and isinstance(fixed_decoder, str):
            values = [fixed_decoder]
        else:
            return
        missing = [v for v in values if a not in DECODER_PRESETS.get(v, {})]
        if missing:
            raise _fail(space.source, "parameters.decoder", f"{a} has no {missing[0]!r} decoder preset; make the "
                        "decoder a choice given arch (e.g. Linknet: [standard])")


def load_space(uri: str) -> SearchSpace:
    """The search space in the YAML file at ``uri`` (local or s3://), :func:`parse_space`-checked."""
    return parse_space(load_yaml(uri, expect=None), uri)
