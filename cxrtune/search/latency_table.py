"""Measured served latency per network, looked up instead of estimated (issue 23, item 3).

A sweep's cost objective is each network's GMACs per image: exact and free of timing noise, but a
poor stand-in for int8 latency on a CPU, where an architecture's cost per MAC varies several-fold
(docs/search_spaces.md). A latency table holds the int8 ONNX latency of every (architecture,
encoder, decoder, input size) of a space, measured once on the serving hardware by
``bench/latency_proxy.py --table`` at the served batch size and threads. ``cxrtune report`` and
``cxrtune promote`` given one draw the front over (objective, ``int8_ms``) instead of GMACs.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pandas as pd

from .. import storage
from ..errors import CxrtuneError
from ..model.train import TrainConfig
from .search_space import SearchSpace

KEY_COLUMNS = ("arch", "encoder", "decoder", "size")
LATENCY_COLUMN = "int8_ms_per_image"
TABLE_COLUMNS = (*KEY_COLUMNS, "gmacs", "params_m", LATENCY_COLUMN)
TRIAL_COLUMN = "int8_ms"  # the column a trials table and its front gain


@dataclass(frozen=True)
class LatencyTable:
    """Measured int8 ms per image, keyed by (arch, encoder, decoder, size)."""
    source: str
    ms: dict[tuple[str, str, str, int], float]

    def trial_latency(self, trials: pd.DataFrame, space: SearchSpace) -> pd.Series:
        """Each trial's measured latency, its network read from its parameters (``param:NAME``
        columns) over the space's fixed settings. A trial whose network the table does not hold is
        an error that names it: a table measured over another space."""
        out = [self.latency_of(trial_config(space, row), f"trial {row.get('trial_id')}") for _, row in trials.iterrows()]
        return pd.Series(out, index=trials.index, name=TRIAL_COLUMN, dtype=float)

    def latency_of(self, cfg: TrainConfig, what: str) -> float:
        """The measured latency of ``cfg``'s network (SMP's own decoder, no preset given, is
        ``standard``); an error naming ``what`` when the table lacks it."""
        decoder = cfg.model.decoder or "standard"
        if not isinstance(decoder, str):
            raise CxrtuneError(f"{what}: its decoder is given by options, not a named preset; a latency table is "
                               "keyed by preset")
        key = (cfg.model.arch, cfg.model.encoder, decoder, int(cfg.size))
        if key not in self.ms:
            raise CxrtuneError(f"{self.source}: no latency for {'/'.join(map(str, key))} ({what}): measure the "
                               "sweep's space with bench/latency_proxy.py --table")
        return self.ms[key]


def trial_config(space: SearchSpace, row: pd.Series) -> TrainConfig:
    """A trials-table row's config: its ``param:NAME`` columns over the space's fixed settings (a
    conditional parameter's column is named as Optuna names it, ``param:decoder|Linknet``)."""
    point = {name.removeprefix("param:").split("|")[0]: value for name, value in row.items()
             if str(name).startswith("param:") and not (isinstance(value, float) and math.isnan(value))}
    cfg = space.train_config(point)
    if not isinstance(cfg, TrainConfig):
        raise CxrtuneError("a grading sweep trains no segmentation network: a latency table has nothing to key")
    return cfg


def load_latency_table(uri: str) -> LatencyTable:
    """Read a table written by ``bench/latency_proxy.py --table`` (a path or s3:// URI)."""
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except CxrtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable file is the user's to fix
        raise CxrtuneError(f"{uri}: cannot read the latency table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in (*KEY_COLUMNS, LATENCY_COLUMN) if c not in frame]
    if missing:
        raise CxrtuneError(f"{uri}: a latency table needs the columns {', '.join(missing)}")
    ms = {(str(r.arch), str(r.encoder), str(r.decoder), int(r.size)): float(getattr(r, LATENCY_COLUMN))
          for r in frame.itertuples(index=False)}
    return LatencyTable(uri, ms)
