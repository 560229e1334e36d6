"""Measured served latency per network, looked up instead of estimated (issue 23, item 3).

GMACs per image are exact and free of timing noise, but a poor stand-in for int8 latency on a CPU,
where an architecture's cost per MAC varies several-fold (docs/search_spaces.md). A latency table
holds the int8 ONNX latency of every (architecture, encoder, decoder preset, input size) of a
space, measured once on the serving hardware at the served batch size and threads by
``bench/latency_proxy.py --table``. ``cxrtune tune --multi-objective --latency-table`` makes it the
sweep's cost (``int8_ms``) instead of GMACs; ``cxrtune report`` and ``promote`` given one draw
any multi-objective sweep's front over it.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import pandas as pd

from .. import storage
from ..errors import CxrtuneError
from ..model.train import TrainConfig
from .search_space import SearchSpace, settings_of

KEY_COLUMNS = ("arch", "encoder", "decoder", "size")
LATENCY_COLUMN = "int8_ms_per_image"
RUNTIME_COLUMNS = ("batch", "threads")  # how it was measured: the served batch size and intra-op threads
TABLE_COLUMNS = (*KEY_COLUMNS, "gmacs", "params_m", LATENCY_COLUMN, *RUNTIME_COLUMNS)
TRIAL_COLUMN = "int8_ms"  # the cost a trial reports, and the column a trials table and its front gain

Key = tuple[str, str, str, int]


@dataclass(frozen=True)
class LatencyTable:
    """Measured int8 ms per image, keyed by (arch, encoder, decoder, size), all at one batch size
    and thread count; ``sha256`` is the file's, recorded with a promoted trial."""
    source: str
    ms: dict[Key, float]
    batch: int
    threads: int
    sha256: str

    def trial_latency(self, trials: pd.DataFrame, space: SearchSpace) -> pd.Series:
        """Each trial's measured latency, its network read from its parameters (``param:NAME``
        columns) over the space's fixed settings. A trial whose network the table does not hold is
        an error that names it: a table measured over another space."""
        out = [self.latency_at(space, settings_of(row, "param:"), f"trial {row.get('trial_id')}")
               for _, row in trials.iterrows()]
        return pd.Series(out, index=trials.index, name=TRIAL_COLUMN, dtype=float)

    def latency_at(self, space: SearchSpace, point: dict, what: str) -> float:
        """The measured latency of the network ``point`` draws from ``space`` (its fixed settings
        under the point's)."""
        cfg = space.train_config(point)
        if not isinstance(cfg, TrainConfig):
            raise CxrtuneError("a grading sweep trains no segmentation network: a latency table has nothing to key")
        return self.latency_of(cfg, what)

    def latency_of(self, cfg: TrainConfig, what: str) -> float:
        """The measured latency of ``cfg``'s network; an error naming ``what`` when the table lacks it."""
        key = network_key(cfg, what)
        if key not in self.ms:
            raise CxrtuneError(f"{self.source}: no latency for {'/'.join(map(str, key))} ({what}): measure the "
                               "sweep's space with bench/latency_proxy.py --table")
        return self.ms[key]

    def check_covers(self, space: SearchSpace) -> None:
        """Refuse, before a sweep starts, a table that lacks a network the space can draw."""
        for point in space.network_points():
            self.latency_at(space, point, f"a network of {space.source or 'the space'}")


def network_key(cfg: TrainConfig, what: str) -> Key:
    """A network's (arch, encoder, decoder preset, input size), the table's key; SMP's own decoder
    (no preset given) is ``standard``."""
    decoder = cfg.model.decoder or "standard"
    if not isinstance(decoder, str):
        raise CxrtuneError(f"{what}: its decoder is given by options, not a named preset; a latency table is "
                           "keyed by preset")
    return cfg.model.arch, cfg.model.encoder, decoder, int(cfg.size)


def load_latency_table(uri: str) -> LatencyTable:
    """Read a table written by ``bench/latency_proxy.py --table`` (a path or s3:// URI)."""
    return parse_latency_table(storage.read_bytes(uri), uri)


def parse_latency_table(data: bytes, source: str) -> LatencyTable:
    """A latency table from its CSV bytes, checked: every column, one batch size and thread count,
    integral sizes, finite positive latencies, one row per network; ``source`` names it in errors."""
    def bad(why: str) -> CxrtuneError:
        return CxrtuneError(f"{source}: not a latency table: {why}")

    try:
        frame = pd.read_csv(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's to fix, named
        raise bad(f"{type(exc).__name__}: {exc}") from None
    missing = [c for c in (*KEY_COLUMNS, LATENCY_COLUMN, *RUNTIME_COLUMNS) if c not in frame]
    if missing:
        raise bad(f"it needs the columns {', '.join(missing)}")
    if frame.empty:
        raise bad("it has no rows")
    runtimes = frame[list(RUNTIME_COLUMNS)].drop_duplicates()
    if len(runtimes) != 1:
        raise bad("its rows were measured at different batch sizes or thread counts")
    sizes = pd.to_numeric(frame["size"], errors="coerce")
    ms = pd.to_numeric(frame[LATENCY_COLUMN], errors="coerce")
    if not (sizes.notna() & (sizes == sizes.round())).all():
        raise bad("a size is missing or not a whole number of pixels")
    if not (ms.map(math.isfinite) & (ms > 0)).all():
        raise bad(f"a {LATENCY_COLUMN} is missing, not a number or not positive")
    keys = list(zip(frame["arch"].astype(str), frame["encoder"].astype(str), frame["decoder"].astype(str),
                    sizes.astype(int)))
    if len(set(keys)) != len(keys):
        raise bad("a network appears twice")
    batch, threads = (int(v) for v in runtimes.iloc[0])
    return LatencyTable(source, dict(zip(keys, ms.astype(float))), batch, threads, hashlib.sha256(data).hexdigest())
