"""Figures as PNG: every plot cxrtune writes (evaluate, agreement, report) goes through here, with
matplotlib's file-only backend chosen before pyplot loads."""

from __future__ import annotations

import io

from . import storage


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on servers and CI)."""
    import matplotlib  # heavy: only the commands that plot load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """``fig`` as PNG bytes (110 dpi, tight), and the figure closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, uri: str) -> None:
    """``fig`` as a PNG at ``uri`` (local or s3://)."""
    storage.write_bytes(uri, figure_png(fig))
