"""The multi-objective front and the rules that pick from it, on trials tables made here (the
sweep that writes such tables for real: tests/test_search_to_serve.py)."""

import pandas as pd
import pytest

from cxrtune.errors import CxrtuneError
from cxrtune.search.report import PickRule, pareto_front

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
    front = pareto_front(table(), "val_score_mae", "min")
    assert list(front["trial_id"]) == ["b", "d", "c"]  # by cost
    everything = table().assign(complete=True, feasible=True)
    assert list(pareto_front(everything, "val_score_mae", "min")["trial_id"]) == ["a", "e"]  # what the filters keep off


def test_pick_rules_choose_the_documented_point():
    front = pareto_front(table(), "val_score_mae", "min")
    pick = PickRule.parse
    assert pick("fastest").pick(front, "val_score_mae", "min")["trial_id"] == "b"
    assert pick("most-accurate").pick(front, "val_score_mae", "min")["trial_id"] == "c"
    # the cheapest within 0.05 of the best MAE (0.40): d (0.45 at 0.25 GMACs)
    assert pick("fastest:accuracy<=best+0.05").pick(front, "val_score_mae", "min")["trial_id"] == "d"
    assert pick("most-accurate:cost<=0.26").pick(front, "val_score_mae", "min")["trial_id"] == "d"
    assert pick("most-accurate:gmacs<=best").pick(front, "val_score_mae", "min")["trial_id"] == "b"
    assert pick("fastest:val_score_mae<=0.5, cost>=0.2").pick(front, "val_score_mae", "min")["trial_id"] == "d"
    for rule, message in (("slowest", "start with fastest or most-accurate"),
                          ("fastest:accuracy=0.1", "not NAME<=VALUE"),
                          ("fastest:recall<=0.1", "no column 'recall'"),
                          ("fastest:accuracy<=best+x", "not a number"),
                          ("fastest:accuracy<=0.1", "no point of the front")):
        with pytest.raises(CxrtuneError, match=message):
            pick(rule).pick(front, "val_score_mae", "min")
    with pytest.raises(CxrtuneError, match="the front is empty"):
        pick("fastest").pick(front.iloc[0:0], "val_score_mae", "min")
