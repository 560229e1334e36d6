"""The small pieces of the multi-objective search, without Ray: the front, its figure and the rules that pick
from it (on trials tables made here; the sweep that writes such tables for real is
tests/test_search_to_serve.py), constraints, decoder width presets, the GMACs cost and the split
hash a promoted trial records."""

import pandas as pd
import pytest

from cxrtune.errors import CxrtuneError
from cxrtune.plots import figure_png
from cxrtune.search.report import NoPointMeetsRule, PickRule, front_figure, pareto_front

# trial, score MAE (lower is better), GMACs, trained to the end, meets the constraints
ROWS = [("a", 0.50, 0.10, True, False),   # cheapest and good, but a constraint violator
        ("b", 0.60, 0.15, True, True),
        ("c", 0.40, 0.30, True, True),
        ("d", 0.45, 0.25, True, True),
        ("e", 0.30, 0.20, False, True),   # would dominate c and d, but ASHA stopped it
        ("f", 0.70, 0.20, True, True),    # dominated by b (cheaper and better)
        ("g", 0.40, 0.50, True, True)]    # ties c on MAE, costs more: dominated


def table() -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "val_score_mae": m, "gmacs": g, "complete": c, "feasible": f}
                         for t, m, g, c, f in ROWS])


def test_the_front_holds_complete_feasible_non_dominated_trials_only():
    front = pareto_front(table(), "val_score_mae", "min", "gmacs")
    assert list(front["trial_id"]) == ["b", "d", "c"]  # by cost
    everything = table().assign(complete=True, feasible=True)
    assert list(pareto_front(everything, "val_score_mae", "min", "gmacs")["trial_id"]) == ["a", "e"]  # what the filters keep off
    errored = pd.DataFrame([{"trial_id": "h", "complete": False, "feasible": True}])  # none reported its figures
    assert pareto_front(errored, "val_score_mae", "min", "gmacs").empty
    figure_png(front_figure(errored, pareto_front(errored, "val_score_mae", "min", "gmacs"), "val_score_mae", [], "gmacs"))
    with pytest.raises(CxrtuneError, match="the front is empty"):
        PickRule.parse("fastest").pick(pareto_front(errored, "val_score_mae", "min", "gmacs"), "val_score_mae", "min",
                                       "gmacs")


def test_the_front_figure_greys_violators_and_stopped_trials():
    """pareto.png: what each trial is drawn as, read from the figure's artists."""
    from matplotlib.colors import to_rgba

    front = pareto_front(table(), "val_score_mae", "min", "gmacs")
    fig = front_figure(table(), front, "val_score_mae", ["gmacs>=0.12"], "gmacs")
    ax = fig.axes[0]
    drawn = {c.get_label(): c for c in ax.collections}
    grey, blue = to_rgba("#999"), to_rgba("#1f77b4")
    violators, stopped = drawn["violates one of gmacs>=0.12"], drawn["stopped early"]
    assert violators.get_offsets().tolist() == [[0.10, 0.50]] and tuple(violators.get_facecolors()[0]) == grey  # a
    assert stopped.get_offsets().tolist() == [[0.20, 0.30]] and tuple(stopped.get_edgecolors()[0]) == grey  # e
    assert len(stopped.get_facecolors()) == 0  # an open circle
    assert sorted(map(tuple, drawn["complete, feasible"].get_offsets().tolist())) == sorted(
        (g, m) for _, m, g, c, f in ROWS if c and f)
    assert tuple(drawn["complete, feasible"].get_facecolors()[0]) == blue
    (line,) = ax.get_lines()
    assert line.get_xdata().tolist() == [0.15, 0.25, 0.30] and to_rgba(line.get_color()) == to_rgba("#d62728")
    figure_png(fig)  # renders, and closes the figure


def test_pick_rules_choose_the_documented_point():
    front = pareto_front(table(), "val_score_mae", "min", "gmacs")
    pick = PickRule.parse
    assert pick("fastest").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "b"
    assert pick("most-accurate").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "c"
    # the cheapest within 0.05 of the best MAE (0.40): d (0.45 at 0.25 GMACs)
    assert pick("fastest:accuracy<=best+0.05").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "d"
    assert pick("most-accurate:cost<=0.26").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "d"
    assert pick("most-accurate:gmacs<=best").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "b"
    assert pick("fastest:val_score_mae<=0.5, cost>=0.2").pick(front, "val_score_mae", "min", "gmacs")["trial_id"] == "d"
    for rule, message in (("slowest", "start with fastest or most-accurate"),
                          ("fastest:accuracy=0.1", "expected NAME<=VALUE"),
                          ("fastest:recall<=0.1", "no column 'recall'"),
                          ("fastest:accuracy<=best+x", "not a number"),
                          ("fastest:accuracy<=0.1", "no point of the front")):
        with pytest.raises(CxrtuneError, match=message) as refused:
            pick(rule).pick(front, "val_score_mae", "min", "gmacs")
        # only a well-formed rule that the sweep leaves unmet is a finding (search_to_serve goes on without it)
        assert isinstance(refused.value, NoPointMeetsRule) == (message == "no point of the front")
    with pytest.raises(CxrtuneError, match="the front is empty"):
        pick("fastest").pick(front.iloc[0:0], "val_score_mae", "min", "gmacs")


def test_the_front_and_best_follow_a_maximised_objective():
    """dice_cls is maximised: the front keeps high-Dice, low-cost trials, and best is the highest."""
    t = table().assign(val_dice_f1=lambda d: 1 - d["val_score_mae"]).drop(columns="val_score_mae")
    front = pareto_front(t, "val_dice_f1", "max", "gmacs")
    assert list(front["trial_id"]) == ["b", "d", "c"]
    # best = 0.60 (c); within 0.05 of it: d (0.55) and c; the cheaper is d
    assert PickRule.parse("fastest:accuracy>=best-0.05").pick(front, "val_dice_f1", "max", "gmacs")["trial_id"] == "d"
    assert PickRule.parse("most-accurate").pick(front, "val_dice_f1", "max", "gmacs")["trial_id"] == "c"
    with pytest.raises(CxrtuneError, match="'best' is defined for accuracy and cost only"):
        PickRule.parse("fastest:complete<=best").pick(front, "val_dice_f1", "max", "gmacs")


def test_a_measured_latency_table_redraws_the_front_and_the_rules_cost(tmp_path):
    """Over a latency table the front's cost is each network's measured ``int8_ms``, looked up by
    (arch, encoder, decoder, size) from the trial's parameters over the space's fixed settings: a
    network cheap in GMACs but slow on the CPU leaves the front, and ``fastest`` and ``cost``
    follow the measured column."""
    from dataclasses import replace

    from cxrtune.search.latency_table import load_latency_table
    from cxrtune.search.search_space import parse_space

    space = parse_space({"task": "disease", "fixed": {"size": 128, "model": {"in_channels": 1, "encoder": "resnet18"}},
                         "parameters": {"arch": {"type": "choice", "values": ["Unet", "Linknet"]},
                                        "decoder": {"type": "choice", "given": "arch",
                                                    "values": {"Linknet": ["standard"], "default": ["slim", "narrow"]}},
                                        "size": {"type": "int", "low": 128, "high": 160, "step": 32}}})
    networks = {"b": ("Linknet", 128), "c": ("Unet", 160), "d": ("Unet", 128)}  # b: fewest GMACs, slowest here
    ms = {("Linknet", "standard", 128): 9.0, ("Unet", "narrow", 160): 4.0, ("Unet", "narrow", 128): 2.0,
          ("Linknet", "standard", 160): 12.0, ("Unet", "slim", 128): 1.5, ("Unet", "slim", 160): 3.0}
    csv = tmp_path / "table.csv"
    pd.DataFrame([{"arch": a, "encoder": "resnet18", "decoder": d, "size": z, "gmacs": 0.0, "params_m": 0.0,
                   "int8_ms_per_image": v, "batch": 4, "threads": 1} for (a, d, z), v in ms.items()]).to_csv(csv, index=False)
    latency = load_latency_table(str(csv))
    t = table()[lambda d: d["trial_id"].isin(networks)].reset_index(drop=True)
    t["param:arch"] = [networks[i][0] for i in t["trial_id"]]
    t["param:decoder|Unet"] = ["narrow" if a == "Unet" else float("nan") for a in t["param:arch"]]
    t["param:decoder|Linknet"] = ["standard" if a == "Linknet" else float("nan") for a in t["param:arch"]]
    t["param:size"] = [float(networks[i][1]) for i in t["trial_id"]]  # as a CSV reads it back
    t["int8_ms"] = latency.trial_latency(t, space)
    assert dict(zip(t["trial_id"], t["int8_ms"])) == {"b": 9.0, "c": 4.0, "d": 2.0}
    assert list(pareto_front(t, "val_score_mae", "min", "gmacs")["trial_id"]) == ["b", "d", "c"]  # over GMACs
    front = pareto_front(t, "val_score_mae", "min", "int8_ms")
    assert list(front["trial_id"]) == ["d", "c"]  # b: slower than d and less accurate
    assert PickRule.parse("fastest").pick(front, "val_score_mae", "min", "int8_ms")["trial_id"] == "d"
    assert PickRule.parse("most-accurate:cost<=3").pick(front, "val_score_mae", "min", "int8_ms")["trial_id"] == "d"
    assert PickRule.parse("most-accurate:int8_ms<=best+2").pick(front, "val_score_mae", "min", "int8_ms")["trial_id"] == "c"

    # every network the space can draw (Unet: 2 decoders x 2 sizes; Linknet: 1 x 2) is in the table,
    # which a sweep checks before it starts; one missing is named
    assert len(space.network_points()) == 6
    latency.check_covers(space)
    partial = replace(latency, ms={k: v for k, v in latency.ms.items() if k[2] != "slim"})
    with pytest.raises(CxrtuneError, match="no latency for Unet/resnet18/slim/128"):
        partial.check_covers(space)

    unknown = t.assign(**{"param:size": 192.0})
    with pytest.raises(CxrtuneError, match="no latency for Linknet/resnet18/standard/192"):
        latency.trial_latency(unknown, space)
    header = "arch,encoder,decoder,size,int8_ms_per_image,batch,threads\n"
    for text, message in (("arch,encoder,size,int8_ms_per_image\nUnet,resnet18,128,2.0\n", "needs the columns decoder"),
                          (header, "no rows"),
                          (header + "Unet,resnet18,slim,128,2.0,4,1\nUnet,resnet18,slim,160,2.0,8,1\n", "batch sizes"),
                          (header + "Unet,resnet18,slim,,2.0,4,1\n", "size is missing"),
                          (header + "Unet,resnet18,slim,128.5,2.0,4,1\n", "not a whole number"),
                          (header + "Unet,resnet18,slim,128,nan,4,1\n", "not positive"),
                          (header + "Unet,resnet18,slim,128,0,4,1\n", "not positive"),
                          (header + "Unet,resnet18,slim,128,2.0,4,1\nUnet,resnet18,slim,128.0,3.0,4,1\n", "twice")):
        csv.write_text(text)
        with pytest.raises(CxrtuneError, match=message):
            load_latency_table(str(csv))


def test_the_front_cost_follows_the_sweep_and_a_table_given():
    """A GMACs sweep's front is over gmacs, a sweep run with a table over int8_ms, and a table given
    to report or promote redraws a multi-objective front only: one objective has no front."""
    from cxrtune.search.report import front_cost
    from cxrtune.search.tuning import EMBEDDED_SPACE, TuneOptions

    base = {"space": EMBEDDED_SPACE, "manifest": "m.parquet", "name": "n", "storage": "s"}
    assert front_cost(TuneOptions(**base, multi_objective=True)) == "gmacs"
    assert front_cost(TuneOptions(**base, multi_objective=True), "t.csv") == "int8_ms"
    assert front_cost(TuneOptions(**base, multi_objective=True, latency_table="t.csv")) == "int8_ms"
    with pytest.raises(CxrtuneError, match="this sweep has one objective"):
        front_cost(TuneOptions(**base), "t.csv")


def test_the_shipped_latency_table_covers_the_shipped_cpu_space():
    """search_spaces/disease_cpu.int8_ms.csv holds every network disease_cpu.yaml can draw (a sweep
    with it would otherwise refuse to start), and the same networks at 96 px, which the sampler
    comparison (bench/sweep.py --cpu --multi-objective, 96-128 px) draws too; all measured at the
    CPU Serve config's batch and threads."""
    from pathlib import Path

    import yaml

    from cxrtune.search.latency_table import load_latency_table
    from cxrtune.search.search_space import load_space

    root = Path(__file__).resolve().parent.parent
    space = load_space(str(root / "search_spaces" / "disease_cpu.yaml"))
    table = load_latency_table(str(root / "search_spaces" / "disease_cpu.int8_ms.csv"))
    table.check_covers(space)
    table.check_covers(space.at_sizes([96, 128]))
    assert len(space.network_points()) == 200 and len(table.ms) == 240
    served = yaml.safe_load((root / "serve" / "config.cpu.yaml").read_text())
    assert (table.batch, table.threads) == (served["applications"][0]["args"]["max_batch_size"], 1)


def test_constraints_parse_strictly():
    from cxrtune.search.tuning import Constraint

    c = Constraint.parse(" val_fp_rate_normal <= 0.10 ")
    assert (c.metric, c.op, c.limit) == ("val_fp_rate_normal", "<=", 0.10)
    assert c.violation(0.05) == pytest.approx(-0.05) and c.violation(0.2) == pytest.approx(0.1)
    assert Constraint.parse("gmacs>=2").violation(1.5) == pytest.approx(0.5)  # short of a minimum: violated
    for bad in ("<=0.1", "x<=", "x<=nan", "x<=inf", "x=0.1", "x<=ten"):
        with pytest.raises(CxrtuneError, match="--constraint"):
            Constraint.parse(bad)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "MAnet", "PAN", "PSPNet", "UnetPlusPlus", "Linknet"])
def test_decoder_presets_build_and_shrink_in_order(arch):
    """Every preset an architecture has builds; slim < narrow < standard in GMACs; Linknet has
    standard only, and a space that could draw a preset it lacks is refused when read."""
    from cxrtune.model.models import DECODER_PRESETS, ModelConfig, build_model, model_gmacs

    presets = [p for p in ("slim", "narrow", "standard") if arch in DECODER_PRESETS[p]]
    cost = []
    for preset in presets:
        model = build_model(ModelConfig(arch=arch, encoder="resnet18", decoder=preset, classification=True)).train()
        cost.append(model_gmacs(model, 128, 1))
        assert model.training  # counting leaves the model in the mode it was in
    assert cost == sorted(cost) and len(set(cost)) == len(cost)
    if arch == "Linknet":
        assert presets == ["standard"]
        with pytest.raises(CxrtuneError, match="Linknet has no 'narrow' decoder preset"):
            build_model(ModelConfig(arch="Linknet", decoder="narrow"))


def test_a_space_that_could_draw_a_missing_preset_is_refused():
    from cxrtune.search.search_space import parse_space

    base = {"task": "disease", "fixed": {"model": {"in_channels": 1}},
            "parameters": {"arch": {"type": "choice", "values": ["Unet", "Linknet"]}}}
    for bad in ({**base, "parameters": {**base["parameters"], "decoder": {"type": "choice", "values": ["slim", "standard"]}}},
                {**base, "fixed": {"model": {"decoder": "narrow"}}}):
        with pytest.raises(CxrtuneError, match="Linknet has no"):
            parse_space(bad)
    parse_space({**base, "parameters": {**base["parameters"], "decoder": {
        "type": "choice", "given": "arch", "values": {"Linknet": ["standard"], "default": ["slim", "narrow"]}}}})


def test_split_hash_follows_the_assignment_not_the_paths():
    import pandas as pd

    from cxrtune.data.splits import split_hash

    df = pd.DataFrame({"image": ["/a/x1.png", "/a/x2.png", "/a/x3.png"], "split": ["train", "val", "train"],
                       "tuning": [True, False, False]})
    moved = df.assign(image=[f"s3://bucket/{p.rsplit('/', 1)[1]}" for p in df["image"]])
    assert split_hash(df) == split_hash(moved) == split_hash(df.iloc[::-1])  # where the files are, row order
    assert split_hash(df) != split_hash(df.assign(split=["train", "train", "train"]))
    assert split_hash(df) != split_hash(df.assign(tuning=[True, True, False]))
