"""Overlay PNGs: lung outline, zone lines and letters, opacity mask and the score, drawn with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np

from .. import zones

LUNG = (80, 220, 80)  # BGR
ZONE_LINE = (0, 215, 255)
OPACITY = (40, 40, 230)


def render_overlay(image: np.ndarray, lungs: zones.LungPair, opacity: np.ndarray, record: dict,
                   min_side: int = 512, max_side: int = 1024, notice: str | None = None) -> np.ndarray:
    """BGR uint8 picture of one scored image, its long side scaled into [min_side, max_side],
    with the score in a banner above the image.

    Args:
        notice: a second banner line (e.g. "NOT FOR DIAGNOSTIC USE" on the DICOM overlay)."""
    h, w = image.shape
    scale = min(max(1.0, min_side / max(h, w)), max_side / max(h, w))
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))

    def fit(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0

    grey = cv2.resize((np.clip(image, 0, 1) * 255).astype(np.uint8), size, interpolation=cv2.INTER_AREA)
    out = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    opac = fit(opacity)
    out[opac] = (0.55 * out[opac] + 0.45 * np.array(OPACITY)).astype(np.uint8)
    thick = max(1, size[0] // 300)
    font = max(0.4, size[0] / 700)
    for letters, lung in ((zones.RIGHT_ZONES, lungs.right), (zones.LEFT_ZONES, lungs.left)):
        m = fit(lung)
        if not m.any():
            continue
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, LUNG, thick)
        y_top, y_bot = zones.equal_area_zones(m)
        cols = np.flatnonzero(m.any(axis=0))
        x0, x1 = int(cols[0]), int(cols[-1])
        for y in (y_top, y_bot):
            cv2.line(out, (x0, y), (x1, y), ZONE_LINE, thick)
        rows = np.flatnonzero(m.any(axis=1))
        bands = ((rows[0], y_top), (y_top, y_bot), (y_bot, rows[-1]))
        for letter, (a, b) in zip(letters, bands):
            affected = (record["zones"] or {}).get(letter, {}).get("affected")
            cv2.putText(out, letter, ((x0 + x1) // 2 - int(8 * font), (int(a) + int(b)) // 2 + int(8 * font)),
                        cv2.FONT_HERSHEY_SIMPLEX, font, OPACITY if affected else ZONE_LINE, thick + 1, cv2.LINE_AA)
    if record.get("status", "scored") == "scored":
        label = f"score {record['score']}/6  opacity {record['opacity_percent']:.1f}%"
    elif record.get("status") == "partial":
        label = f"PARTIAL: one lung only, no score  opacity {record['opacity_percent']:.1f}%"
    else:
        label = "UNSCORED: no lungs found"
    if record.get("disease_probability") is not None:
        label += f"  p(disease) {record['disease_probability']:.2f}"
    line = int(30 * font)
    banner = np.zeros((line * (2 if notice else 1) + 8, size[0], 3), np.uint8)
    cv2.putText(banner, label, (6, int(22 * font) + 2), cv2.FONT_HERSHEY_SIMPLEX, font * 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    if notice:
        cv2.putText(banner, notice, (6, line + int(22 * font) + 2), cv2.FONT_HERSHEY_SIMPLEX, font * 0.7,
                    (255, 255, 255), 2, cv2.LINE_AA)
    return np.vstack([banner, out])


def encode_overlay(image: np.ndarray, lungs: zones.LungPair, opacity: np.ndarray, record: dict) -> bytes:
    """The overlay PNG of a record (:func:`render_overlay`): lungs, zones, opacity and the score."""
    ok, buf = cv2.imencode(".png", render_overlay(image, lungs, opacity, record))
    return buf.tobytes()
