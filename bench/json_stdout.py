"""What the benches that start Ray in their own process share: stdout kept for their one JSON object."""

from __future__ import annotations

import os
import sys
from typing import TextIO


def reserve_stdout() -> TextIO:
    """A stream on this process's stdout, for the bench's JSON; from now on everything else
    written to file descriptor 1 goes to stderr. Ray's driver prints its workers' and raylets'
    lines to stdout (e.g. ``(raylet) Task ServeController.graceful_shutdown failed`` while Serve
    shuts down), which would leave stdout no longer one JSON object. Called once, before Ray
    starts; the redirect lasts to the end of the process, since Ray may print up to its exit."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out
