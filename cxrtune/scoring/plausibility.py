"""Does the input look like a frontal chest radiograph? The check that stands before every score.

Stage I finds "lungs" in whatever it is given: uniform noise, an inverted
radiograph, a sideways or lateral film. Scored, those give confident nonsense (noise and an
inverted CXR were scored 6). So after Stage I, and before Stage II, six measurements of the
working image and its cleaned lung mask are checked against ranges calibrated on real CXRs
(``bench/plausibility.py``; the thresholds, the data and the refusal rate are in
docs/scoring.md and docs/BENCHMARKS.md). Any one out of range makes the record ``unscored`` with
the reason, never a score.

A colour photograph is refused before this, when it is decoded (``cxrtune.images.MAX_CHROMA``).
Written by hand: no library judges whether an image is a frontal CXR; the measurements are plain
OpenCV/numpy, each chosen for one failure:

* ``roughness``: the median absolute difference between the image and its Gaussian blur, over its
  1st-99th percentile range. Radiographs are smooth at 256 px; noise is not.
* ``contrast``: the mean grey of the mediastinum (the central strip between the lungs, over the
  lungs' rows) minus that of the lungs. Aerated lungs are darker than the mediastinum in a
  MONOCHROME2 image, however opaque; an inverted radiograph reverses it.
* ``lung_fraction``: the lungs' share of the image. Tiny "lungs" (an abdomen, a photograph) or
  lungs filling the frame are not a chest PA/AP.
* ``lung_height``: the lungs' rows over the image's height (a film turned sideways has short,
  wide lungs).
* ``centre_row``: where the lungs' centre of mass sits, as a fraction of the height (an abdominal
  film shows lung bases at its top edge).
* ``midline_share``: the lungs' share of the central tenth of the columns. The mediastinum
  separates the lungs of a frontal film; a lateral film's lung field spans the middle.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CHECK_SIZE = 256  # long side at which the measurements are made (the scale of Stage I's input)


@dataclass(frozen=True)
class Measurements:
    """What the check measures on one image (see the module's docstring)."""
    roughness: float
    contrast: float
    lung_fraction: float
    lung_height: float
    centre_row: float
    midline_share: float


@dataclass(frozen=True)
class PlausibilityRule:
    """The ranges a frontal CXR's measurements fall in. Calibrated on 1,000 COVID-QU-Ex Train
    images with the CPU accuracy bundle's Stage I (``bench/plausibility.py``, 2026-12-03): each
    bound is the extreme seen there moved outward by a quarter of the central 98 % range; for the
    lungs' share, where that would reach 0, half the smallest share seen (docs/scoring.md)."""
    max_roughness: float = 0.031  # seen at most 0.027
    min_contrast: float = 0.026  # seen at least 0.116
    min_lung_fraction: float = 0.029  # seen 0.057-0.579
    max_lung_fraction: float = 0.66
    min_lung_height: float = 0.21  # seen at least 0.336
    min_centre_row: float = 0.14  # seen 0.220-0.626
    max_centre_row: float = 0.70
    max_midline_share: float = 0.95  # seen at most 0.789

    def refusal(self, m: Measurements) -> str | None:
        """The reason the measurements are not a frontal chest radiograph's, or None."""
        checks = (
            (m.roughness <= self.max_roughness, f"the image is noise-like (roughness {m.roughness:.3f} > "
                                                f"{self.max_roughness})"),
            (m.contrast >= self.min_contrast, f"the lungs are not darker than the mediastinum (contrast "
                                              f"{m.contrast:.3f} < {self.min_contrast}): an inverted radiograph?"),
            (self.min_lung_fraction <= m.lung_fraction <= self.max_lung_fraction,
             f"the lungs cover {m.lung_fraction:.0%} of the image (a chest PA/AP: "
             f"{self.min_lung_fraction:.0%}-{self.max_lung_fraction:.0%})"),
            (m.lung_height >= self.min_lung_height, f"the lungs span {m.lung_height:.0%} of the image's height "
                                                    f"(at least {self.min_lung_height:.0%}): turned sideways?"),
            (self.min_centre_row <= m.centre_row <= self.max_centre_row,
             f"the lungs' centre is at {m.centre_row:.0%} of the height ({self.min_centre_row:.0%}-"
             f"{self.max_centre_row:.0%}): not a chest film?"),
            (m.midline_share <= self.max_midline_share,
             f"lung fills {m.midline_share:.0%} of the midline (at most {self.max_midline_share:.0%}): "
             "no mediastinum between the lungs, a lateral film?"),
        )
        failed = [message for ok, message in checks if not ok]
        return "not a frontal chest radiograph: " + "; ".join(failed) if failed else None


DEFAULT_RULE = PlausibilityRule()


def measure(image: np.ndarray, lung: np.ndarray) -> Measurements:
    """The measurements of a working image (float32 in [0, 1]) and its cleaned lung mask (bool, the
    same shape, not empty)."""
    scale = CHECK_SIZE / max(image.shape)
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    small = cv2.resize(image.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    lungs = cv2.resize(lung.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    low, high = np.percentile(small, (1, 99))
    spread = max(float(high - low), 1e-6)
    roughness = float(np.median(np.abs(small - cv2.GaussianBlur(small, (0, 0), 1.5)))) / spread
    h, w = small.shape
    rows = np.flatnonzero(lungs.any(axis=1))
    if rows.size == 0:
        return Measurements(roughness, 0.0, 0.0, 0.0, 0.0, 0.0)
    band = np.zeros_like(lungs)
    band[rows[0]:rows[-1] + 1, int(0.45 * w):int(np.ceil(0.55 * w))] = True
    mediastinum = band & ~lungs
    contrast = (float(small[mediastinum].mean()) - float(small[lungs].mean())) / spread if mediastinum.any() else 0.0
    ys = np.nonzero(lungs)[0]
    return Measurements(roughness=roughness, contrast=contrast, lung_fraction=float(lungs.mean()),
                        lung_height=float(rows[-1] - rows[0] + 1) / h, centre_row=float(ys.mean()) / h,
                        midline_share=float(lungs[band].mean()))

