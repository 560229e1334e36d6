"""Seed 001's five representations of a radiograph for ROI Hide-and-Seek.

A classifier is trained and tested on each. One that stays accurate when the lungs are removed
(or boxed out) reads something other than the lungs: a marker, a device, the source hospital.
Written by hand: these are masks and boxes, no library has them.
"""

from __future__ import annotations

import numpy as np

from ..preprocessing import lung_box

REPRESENTATIONS = ("original", "lungs_isolated", "lungs_removed", "lungs_framed", "lungs_boxed_out")
# the representations in which the lungs cannot be seen: accuracy there is a shortcut's
HIDDEN = ("lungs_removed", "lungs_boxed_out")


def represent(image: np.ndarray, lung: np.ndarray, name: str) -> np.ndarray:
    """``image`` (HxW) in representation ``name``, given the lung mask (same shape):

    * ``original``: unchanged;
    * ``lungs_isolated``: outside the lungs set to 0;
    * ``lungs_removed``: the lungs set to 0;
    * ``lungs_framed``: outside the lungs' bounding box set to 0;
    * ``lungs_boxed_out``: inside the lungs' bounding box set to 0.

    With no lungs in the mask, the lung-dependent representations are all zeros or unchanged as
    the definitions give (nothing isolated, nothing removed)."""
    if name not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {name!r}; one of {', '.join(REPRESENTATIONS)}")
    if image.shape != lung.shape:
        raise ValueError(f"image {image.shape} and lung mask {lung.shape} differ in shape")
    lung = lung.astype(bool)
    if name == "original":
        return image.copy()
    if name == "lungs_isolated":
        return np.where(lung, image, 0).astype(image.dtype)
    if name == "lungs_removed":
        return np.where(lung, 0, image).astype(image.dtype)
    box = np.zeros_like(lung)
    b = lung_box(lung, margin=0.0)
    if b is not None:
        y0, y1, x0, x1 = b
        box[y0:y1, x0:x1] = True
    inside = name == "lungs_framed"
    return np.where(box if inside else ~box, image, 0).astype(image.dtype)
