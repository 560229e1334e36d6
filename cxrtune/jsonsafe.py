"""JSON that every reader accepts: what cxrtune writes to reports, records and metadata."""

from __future__ import annotations

import math

import numpy as np


def json_safe(obj):
    """NaN and infinities -> None (JSON has neither), numpy scalars -> Python, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
