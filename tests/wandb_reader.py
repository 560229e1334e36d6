"""Read an offline W&B run file (``run-*.wandb``) to check what was logged.

wandb 0.31 ships no Python reader; the file is LevelDB's log format (32 KiB blocks of records
with a 7-byte header: crc32, length, type) after a 7-byte W&B header, each record a protobuf
``Record``. Test helper only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending + chunk)
            pending = b""
            yield rec
        else:  # FIRST or MIDDLE
            pending += chunk


def summarize(path: str | Path) -> dict:
    """History rows, config keys and the run's project/group."""
    out = {"history": [], "config": {}, "project": "", "group": ""}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "config":
            for i in rec.config.update:
                out["config"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "run":
            out["project"], out["group"] = rec.run.project, rec.run.run_group
    return out
