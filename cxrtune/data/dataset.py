"""A torch Dataset over a manifest, with seed 004's augmentation pipeline.

Each item is a dict of tensors: ``image`` (C x H x W float32), ``lung_mask`` and ``opacity_mask``
(1 x H x W float32 in {0, 1}), ``opacity_annotated`` (bool: False means the opacity mask is not
annotated and must be left out of the segmentation loss), ``label`` (1 = disease) and ``index``
(the manifest row). Masks go through exactly the same geometric transforms as their image.
Remote files are read through a :class:`~cxrtune.storage.ContentCache`.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .. import images, storage
from ..preprocessing import Preprocessing, extract_roi, resize_image, resize_mask
from . import manifest


def seed_augmentation(size: int, seed: int | None = None) -> A.Compose:
    """Seed 004's final-training augmentation (albumentations): CLAHE p=0.2; random-sized crop of
    0.7-0.9 of the height p=0.2; rotate +-15 deg p=0.5; horizontal flip p=0.5;
    brightness/contrast +-0.2 p=0.2. Input is uint8 at the model size. Albumentations draws from
    its own generator, so ``seed`` (not torch's or numpy's) makes it reproducible."""
    return A.Compose([
        A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=0.2),
        A.RandomSizedCrop(min_max_height=(int(0.7 * size), int(0.9 * size)), size=(size, size), p=0.2),
        A.Rotate(limit=15, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.2),
    ], seed=seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's copy of the augmentation its own stream,
    from torch's per-worker seed (set by the loader's generator, so still reproducible)."""
    info = torch.utils.data.get_worker_info()
    if info is None:  # called outside a worker: nothing to seed
        return
    augment = getattr(info.dataset, "augment", None)
    if augment is not None:
        augment.set_random_seed(info.seed % 2**32)


class CXRDataset(Dataset):
    """Rows of a manifest as training examples.

    ``augment`` applies :func:`seed_augmentation` (reproducible with ``seed``; use
    :func:`seed_worker` as the DataLoader's ``worker_init_fn``); a missing lung mask gives an
    all-zero mask (filter rows by ``lung_mask != ""`` when training Stage I).
    """

    def __init__(self, df: pd.DataFrame, preprocessing: Preprocessing = Preprocessing(),
                 augment: bool = False, cache: storage.ContentCache | None = None, roi: bool = False,
                 seed: int | None = None):
        self.df = df.reset_index(drop=True)
        self.pre = preprocessing
        self.roi = roi  # Stage II input: lungs only, cropped to their box
        self.augment = seed_augmentation(preprocessing.size, seed) if augment else None
        self.cache = cache or storage.ContentCache()

    def __len__(self) -> int:
        return len(self.df)

    def _mask(self, uri: str, shape: tuple[int, int]) -> np.ndarray:
        if not uri:
            return np.zeros(shape, np.uint8)
        m = images.read_mask(uri, self.cache)
        if m.shape != shape:
            raise images.ImageDecodeError(f"{uri}: mask is {m.shape[1]}x{m.shape[0]} but its image "
                                          f"is {shape[1]}x{shape[0]}")
        return m.astype(np.uint8)

    def __getitem__(self, i: int) -> dict:
        row = self.df.iloc[i]
        image = images.read_image(row["image"], self.cache)
        lung = self._mask(row.get("lung_mask", ""), image.shape)
        opacity = self._mask(row.get("opacity_mask", ""), image.shape)
        if self.roi:
            image, (lung, opacity), _ = extract_roi(image, lung, lung, opacity)
        image = resize_image(image, self.pre.size)
        lung, opacity = resize_mask(lung, self.pre.size), resize_mask(opacity, self.pre.size)
        if self.augment is not None:
            out = self.augment(image=(image * 255).round().astype(np.uint8), masks=[lung, opacity])
            image = out["image"].astype(np.float32) / 255.0
            lung, opacity = out["masks"]
        return {
            "image": self.pre.to_tensor(image),
            "lung_mask": torch.from_numpy(np.ascontiguousarray(lung, np.float32))[None],
            "opacity_mask": torch.from_numpy(np.ascontiguousarray(opacity, np.float32))[None],
            "opacity_annotated": torch.tensor(bool(row.get("opacity_mask", ""))),
            "label": torch.tensor(float(manifest.is_disease(row["label"]))),
            "index": torch.tensor(i),
        }
