"""Does the input look like a frontal chest radiograph? The check that stands before every score.

Stage I finds "lungs" in whatever it is given: uniform noise, an inverted
radiograph, a sideways or lateral film. Scored, those give confident nonsense (noise and an
inverted CXR were scored 6). So after Stage I, and before Stage II, nine measurements of the
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
* ``lung_width``: the lungs' columns over the image's width (two lungs span most of a chest film;
  "lungs" found beside the bones of a limb are a narrow strip).
* ``lung_aspect``: the lungs' rows over their columns (a limb's "lungs" are tall and narrow).
* ``centre_row``: where the lungs' centre of mass sits, as a fraction of the height (an abdominal
  film shows lung bases at its top edge).
* ``midline_share``: the lungs' share of the central tenth of the columns. The mediastinum
  separates the lungs of a frontal film; a lateral film's lung field spans the middle.
* ``lung_gap``: the columns between the two lungs' boxes over the image's width (negative where
  they overlap), measured on the mask at its own size. The mediastinum lies between a frontal
  film's lungs; the two "lungs" Stage I draws in a lateral view can lie one in front of the other.
  None for one lung: a whited-out hemithorax can leave one, and so can Stage I's two "lungs" when
  they touch (one blob) or when the lung cleanup drops the second (overlapping the first by more
  than half its own width, or level with it over less than half its height); those are not
  judged here.

A calibrated bundle adds an appearance model (:class:`AppearanceModel`, fitted by ``cxrtune
calibrate`` on its validation rows): the image around the lungs, reduced to 32 x 32 and
histogram-equalised, must lie near the principal components of the frontal CXRs it was fitted on
(scikit-learn's PCA; the reconstruction residual and the Mahalanobis distance in the components,
each against 1.1 x its 99.9th percentile there). It refuses what the nine ranges let through: a film
turned sideways, an MRI slice, an inverted radiograph whose mediastinum the lungs still undercut.

What neither refuses reliably is a lateral film: a one-class model of frontal CXRs, fitted on
frontal CXRs alone, let half the laterals projected from chest CTs through (docs/scoring.md). So a
bundle may also hold a view model (:class:`ViewModel`), fitted by ``cxrtune calibrate
--not-frontal`` on the validation rows against radiographs known not to be frontal CXRs: a site's
own laterals, found in its PACS by ViewPosition. It is scikit-learn's logistic regression on the
same thumbnails, its limit set on the frontal rows' cross-validated scores (scores of models not
fitted on them).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from ..errors import CxrtuneError

CHECK_SIZE = 256  # long side at which the measurements are made (the scale of Stage I's input)


@dataclass(frozen=True)
class Measurements:
    """What the check measures on one image (see the module's docstring)."""
    roughness: float
    contrast: float
    lung_fraction: float
    lung_height: float
    lung_width: float
    lung_aspect: float
    centre_row: float
    midline_share: float
    lung_gap: float | None


@dataclass(frozen=True)
class PlausibilityRule:
    """The ranges a frontal CXR's measurements fall in. Calibrated on 1,000 COVID-QU-Ex Train
    images with the CPU accuracy bundle's Stage I (``bench/plausibility.py``, 2026-12-03): each
    bound is the extreme seen there moved outward by a quarter of the central 98 % range; for the
    lungs' share, where that would reach 0, half the smallest share seen (docs/scoring.md). The
    lungs' gap, added later, the same way through another run of that bundle's recipe (2026-12-05)."""
    max_roughness: float = 0.031  # seen at most 0.027
    min_contrast: float = 0.026  # seen at least 0.116
    min_lung_fraction: float = 0.029  # seen 0.057-0.579
    max_lung_fraction: float = 0.66
    min_lung_height: float = 0.21  # seen at least 0.336
    min_lung_width: float = 0.37  # seen at least 0.480
    max_lung_aspect: float = 1.84  # seen at most 1.68
    min_centre_row: float = 0.14  # seen 0.220-0.626
    max_centre_row: float = 0.70
    max_midline_share: float = 0.95  # seen at most 0.789
    min_lung_gap: float = -0.02  # seen at least 0.012 (the rule gives -0.0205)

    def failures(self, m: Measurements) -> list[str]:
        """Each range the measurements fall outside, said in words (empty: a frontal CXR's)."""
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
            (m.lung_width >= self.min_lung_width, f"the lungs span {m.lung_width:.0%} of the image's width "
                                                  f"(at least {self.min_lung_width:.0%}): not a chest film?"),
            (m.lung_aspect <= self.max_lung_aspect, f"the lungs are {m.lung_aspect:.2f} times as tall as wide (at most "
                                                    f"{self.max_lung_aspect}): not a chest film?"),
            (self.min_centre_row <= m.centre_row <= self.max_centre_row,
             f"the lungs' centre is at {m.centre_row:.0%} of the height ({self.min_centre_row:.0%}-"
             f"{self.max_centre_row:.0%}): not a chest film?"),
            (m.midline_share <= self.max_midline_share,
             f"lung fills {m.midline_share:.0%} of the midline (at most {self.max_midline_share:.0%}): "
             "no mediastinum between the lungs, a lateral film?"),
            (m.lung_gap is None or m.lung_gap >= self.min_lung_gap,
             f"the lungs overlap in {-(m.lung_gap or 0):.1%} of the image's width (at most {-self.min_lung_gap:.1%}): "
             "one behind the other, a lateral film?"),
        )
        return [message for ok, message in checks if not ok]


DEFAULT_RULE = PlausibilityRule()
NOT_FRONTAL = "not a frontal chest radiograph: "

APPEARANCE_FILE = "appearance.npz"  # in a calibrated bundle, listed with its hash in bundle.json
APPEARANCE_SIZE = 32  # side of the lung-box thumbnail
APPEARANCE_COMPONENTS = 10
MIN_APPEARANCE_IMAGES = 200  # fewer: no model (ten components would fit the images, not frontal CXRs)
APPEARANCE_MARGIN = 1.1  # each limit: this x the 99.9th percentile on the images fitted on
APPEARANCE_ARRAYS = ("mean", "components", "variances", "limits")


def _npz(**arrays: Any) -> bytes:
    """Arrays as an ``.npz`` file's bytes (what a bundle stores: no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _from_npz(data: bytes, names: tuple[str, ...], file: str) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` a bundle stores as ``file``, read without pickle."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = sorted(set(names) - set(z.files))
        if missing:
            raise CxrtuneError(f"the bundle's {file} lacks {', '.join(missing)}: calibrate it again")
        return {name: z[name] for name in names}


def appearance_vector(image: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """The image around the lungs (their bounding box, 15 % wider each way), 32 x 32,
    histogram-equalised, in [0, 1]: what :class:`AppearanceModel` compares. Cropping to the lungs
    makes the field of view, the label boxes and the contrast of different sites alike."""
    ys, xs = np.nonzero(lung)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    my, mx = int(0.15 * (y1 - y0)), int(0.15 * (x1 - x0))
    crop = image[max(0, y0 - my):min(image.shape[0], y1 + my), max(0, x0 - mx):min(image.shape[1], x1 + mx)]
    u8 = (np.clip(crop, 0, 1) * 255).astype(np.uint8)
    small = cv2.resize(u8, (APPEARANCE_SIZE, APPEARANCE_SIZE), interpolation=cv2.INTER_AREA)
    return cv2.equalizeHist(small).astype(np.float32).ravel() / 255


@dataclass(frozen=True, eq=False)
class AppearanceModel:
    """Principal components of frontal CXRs' lung-box thumbnails (:func:`appearance_vector`) and the
    two limits an input must stay within: its reconstruction residual and its Mahalanobis distance
    in the components. Arrays only: stored as an ``.npz`` read without pickle."""
    mean: np.ndarray
    components: np.ndarray  # (k, 1024)
    variances: np.ndarray  # (k,)
    limits: np.ndarray  # (max residual, max distance)
    n: int  # images fitted on

    def distances(self, vector: np.ndarray) -> tuple[float, float]:
        """(reconstruction residual, Mahalanobis distance in the components) of one vector."""
        centred = vector - self.mean
        z = self.components @ centred
        residual = float(np.linalg.norm(centred - self.components.T @ z))
        return residual, float(np.sqrt(np.sum(z ** 2 / self.variances)))

    def failure(self, vector: np.ndarray) -> str | None:
        """Why the image around the lungs (its :func:`appearance_vector`) does not look like the
        frontal CXRs fitted on, or None."""
        residual, distance = self.distances(vector)
        if residual <= self.limits[0] and distance <= self.limits[1]:
            return None
        return (f"the image around the lungs does not look like a frontal CXR (appearance residual {residual:.2f}, "
                f"limit {self.limits[0]:.2f}, distance {distance:.2f}, limit {self.limits[1]:.2f})")

    def to_bytes(self) -> bytes:
        return _npz(n=np.array(self.n), **{name: getattr(self, name) for name in APPEARANCE_ARRAYS})

    @classmethod
    def from_bytes(cls, data: bytes) -> "AppearanceModel":
        arrays = _from_npz(data, (*APPEARANCE_ARRAYS, "n"), APPEARANCE_FILE)
        return cls(**{name: arrays[name].astype(np.float32) for name in APPEARANCE_ARRAYS}, n=int(arrays["n"]))

    def summary(self) -> dict:
        """What /v1/models says about it."""
        return {"images": self.n, "components": int(len(self.variances)), "size": APPEARANCE_SIZE,
                "max_residual": round(float(self.limits[0]), 4), "max_distance": round(float(self.limits[1]), 4)}


def fit_appearance(vectors: np.ndarray) -> AppearanceModel | None:
    """The appearance model of frontal CXRs' :func:`appearance_vector` rows, or None for fewer than
    ``MIN_APPEARANCE_IMAGES``. Each limit is ``APPEARANCE_MARGIN`` x its 99.9th percentile on them."""
    from sklearn.decomposition import PCA  # here: only calibration fits; serving only reads

    if len(vectors) < MIN_APPEARANCE_IMAGES:
        return None
    pca = PCA(n_components=APPEARANCE_COMPONENTS, random_state=0).fit(vectors)
    fitted = AppearanceModel(mean=pca.mean_.astype(np.float32), components=pca.components_.astype(np.float32),
                             variances=pca.explained_variance_.astype(np.float32), limits=np.zeros(2, np.float32),
                             n=len(vectors))
    seen = np.array([fitted.distances(v) for v in vectors])
    limits = (APPEARANCE_MARGIN * np.quantile(seen, 0.999, axis=0)).astype(np.float32)
    return AppearanceModel(fitted.mean, fitted.components, fitted.variances, limits, len(vectors))


VIEW_FILE = "view.npz"  # in a bundle calibrated with --not-frontal, listed with its hash in bundle.json
MIN_NOT_FRONTAL_IMAGES = 20  # fewer: no view model (a handful of laterals is one patient's, not a view's)
VIEW_REGULARISATION = 0.1  # logistic regression's C: thousands of frontal rows against tens to hundreds of others
VIEW_ARRAYS = ("weights", "bias", "limit", "cv_refused")


@dataclass(frozen=True, eq=False)
class ViewModel:
    """A linear score on :func:`appearance_vector` that is high for the not-frontal radiographs it
    was fitted on (a site's laterals) and low for its frontal CXRs, and the limit above which an
    input is refused. Arrays only: stored as an ``.npz`` read without pickle."""
    weights: np.ndarray  # (1024,)
    bias: np.ndarray  # (1,)
    limit: np.ndarray  # (1,)
    cv_refused: np.ndarray  # (1,): the share of the not-frontal rows refused in cross-validation
    n_frontal: int
    n_not_frontal: int

    def score(self, vector: np.ndarray) -> float:
        """The log-odds that ``vector`` is one of the not-frontal kind."""
        return float(vector @ self.weights + self.bias[0])

    def failure(self, vector: np.ndarray) -> str | None:
        """Why the image around the lungs (its :func:`appearance_vector`) looks like the
        not-frontal views fitted on, or None."""
        score = self.score(vector)
        if score <= self.limit[0]:
            return None
        return (f"the image around the lungs looks like the not-frontal views the bundle was calibrated with "
                f"(view score {score:.2f}, limit {self.limit[0]:.2f}): a lateral film?")

    def to_bytes(self) -> bytes:
        return _npz(n=np.array([self.n_frontal, self.n_not_frontal]), **{name: getattr(self, name) for name in VIEW_ARRAYS})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ViewModel":
        arrays = _from_npz(data, (*VIEW_ARRAYS, "n"), VIEW_FILE)
        n_frontal, n_not_frontal = (int(v) for v in arrays["n"])
        return cls(**{name: arrays[name].astype(np.float32) for name in VIEW_ARRAYS}, n_frontal=n_frontal,
                   n_not_frontal=n_not_frontal)

    def summary(self) -> dict:
        """What /v1/models says about it."""
        return {"frontal_images": self.n_frontal, "not_frontal_images": self.n_not_frontal,
                "limit": round(float(self.limit[0]), 4), "cv_refused": round(float(self.cv_refused[0]), 4)}


def fit_view(frontal: np.ndarray, not_frontal: np.ndarray) -> ViewModel | None:
    """The view model of frontal CXRs' :func:`appearance_vector` rows against not-frontal ones
    (balanced logistic regression), or None with fewer than ``MIN_APPEARANCE_IMAGES`` frontal or
    ``MIN_NOT_FRONTAL_IMAGES`` other rows. The limit is the 99.9th percentile of the frontal rows'
    five-fold cross-validated scores (scores of models not fitted on them), moved up by a quarter of
    those scores' central 98 % range (the margin the ranges take beyond the extremes seen,
    :class:`PlausibilityRule`). ``cv_refused``: the not-frontal rows' cross-validated scores over
    that limit, a site's measure of whether its model refuses its own laterals."""
    from sklearn.linear_model import LogisticRegression  # here: only calibration fits; serving only reads
    from sklearn.model_selection import cross_val_predict

    if len(frontal) < MIN_APPEARANCE_IMAGES or len(not_frontal) < MIN_NOT_FRONTAL_IMAGES:
        return None
    x = np.vstack([frontal, not_frontal]).astype(np.float64)
    y = np.r_[np.zeros(len(frontal)), np.ones(len(not_frontal))]
    model = LogisticRegression(C=VIEW_REGULARISATION, class_weight="balanced", max_iter=5000)
    unseen = cross_val_predict(model, x, y, cv=5, method="decision_function")
    low, high, top = np.quantile(unseen[: len(frontal)], (0.01, 0.99, 0.999))
    limit = top + 0.25 * (high - low)
    model.fit(x, y)
    return ViewModel(weights=model.coef_[0].astype(np.float32), bias=model.intercept_.astype(np.float32),
                     limit=np.array([limit], np.float32),
                     cv_refused=np.array([np.mean(unseen[len(frontal):] > limit)], np.float32),
                     n_frontal=len(frontal), n_not_frontal=len(not_frontal))


@dataclass(frozen=True)
class PlausibilityCheck:
    """The whole check one bundle applies: the nine ranges, and its appearance and view models if
    it has them."""
    rule: PlausibilityRule = DEFAULT_RULE
    appearance: AppearanceModel | None = field(default=None, compare=False)
    view: ViewModel | None = field(default=None, compare=False)

    def refusal(self, image: np.ndarray, lung: np.ndarray) -> str | None:
        """Why the image and its lungs are not a frontal chest radiograph's, or None."""
        failed = self.rule.failures(measure(image, lung))
        models = [model for model in (self.appearance, self.view) if model is not None]
        if models:
            vector = appearance_vector(image, lung)
            failed += [reason for reason in (model.failure(vector) for model in models) if reason]
        return NOT_FRONTAL + "; ".join(failed) if failed else None

    def summary(self) -> dict:
        return {"rule": asdict(self.rule),
                "appearance": self.appearance.summary() if self.appearance is not None else None,
                "view": self.view.summary() if self.view is not None else None}


DEFAULT_CHECK = PlausibilityCheck()


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
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    if rows.size == 0:
        return Measurements(roughness, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
    band = np.zeros_like(lungs)
    band[rows[0]:rows[-1] + 1, int(0.45 * w):int(np.ceil(0.55 * w))] = True
    mediastinum = band & ~lungs
    contrast = (float(small[mediastinum].mean()) - float(small[lungs].mean())) / spread if mediastinum.any() else 0.0
    ys = np.nonzero(lungs)[0]
    return Measurements(roughness=roughness, contrast=contrast, lung_fraction=float(lungs.mean()),
                        lung_height=float(rows[-1] - rows[0] + 1) / h, lung_width=float(cols[-1] - cols[0] + 1) / w,
                        lung_aspect=float(rows[-1] - rows[0] + 1) / float(cols[-1] - cols[0] + 1),
                        centre_row=float(ys.mean()) / h,
                        midline_share=float(lungs[band].mean()), lung_gap=lung_gap(lung))


def lung_gap(lung: np.ndarray) -> float | None:
    """The columns between the boxes of the two largest lung blobs over the mask's width (negative:
    they overlap), measured at the mask's own size; None with fewer than two blobs."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(lung, dtype=np.uint8), connectivity=8)
    if n < 3:
        return None
    two = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:2]
    (_, a1), (b0, _) = sorted((int(stats[i, cv2.CC_STAT_LEFT]), int(stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH]))
                               for i in two)
    return (b0 - a1) / lung.shape[1]

