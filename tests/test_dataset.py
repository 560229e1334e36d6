import numpy as np
import torch

from cxrtune import images
from cxrtune.data import manifest
from cxrtune.data.dataset import CXRDataset, seed_augmentation
from cxrtune.preprocessing import Preprocessing


def test_items_and_channels(phantom_dir):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    for c in (1, 3):
        item = CXRDataset(df, Preprocessing(size=96, in_channels=c))[0]
        assert item["image"].shape == (c, 96, 96)
        assert item["lung_mask"].shape == item["opacity_mask"].shape == (1, 96, 96)
        assert set(item["lung_mask"].unique().tolist()) <= {0.0, 1.0}
    flags = [bool(CXRDataset(df)[i]["opacity_annotated"]) for i in range(len(df))]
    assert flags == [bool(u) for u in df.opacity_mask]
    assert sorted(df.label[~np.array(flags)].unique()) == ["other_pneumonia"]


def test_masks_move_with_their_image(tmp_path):
    """The image is its own lung mask: after any augmentation the two must still coincide."""
    m = np.zeros((128, 128), bool)
    m[20:100, 10:50] = True
    m[30:90, 80:120] = True
    images.write_png(str(tmp_path / "i.png"), (m * 255).astype(np.uint8))
    images.write_png(str(tmp_path / "m.png"), m)
    df = manifest.new_manifest([{"image": str(tmp_path / "i.png"), "lung_mask": str(tmp_path / "m.png"),
                                 "opacity_mask": str(tmp_path / "m.png"), "label": "covid", "patient_id": "p"}])
    pre = Preprocessing(size=128, mean=0.0, std=1.0)
    ds = CXRDataset(df, pre, augment=True, seed=0)  # bilinear image vs nearest mask: edges differ slightly
    for _ in range(30):
        item = ds[0]
        img = item["image"][0] > 0.5
        lung = item["lung_mask"][0] > 0.5
        assert (img ^ lung).float().mean() < 0.02
        assert torch.equal(item["lung_mask"], item["opacity_mask"])


def test_seed_pipeline_settings():
    names = [type(t).__name__ for t in seed_augmentation(256).transforms]
    assert names == ["CLAHE", "RandomSizedCrop", "Rotate", "HorizontalFlip", "RandomBrightnessContrast"]
    probs = [t.p for t in seed_augmentation(256).transforms]
    assert probs == [0.2, 0.2, 0.5, 0.5, 0.2]


def test_augmentation_is_reproducible_in_workers(phantom_dir):
    import pandas as pd
    from torch.utils.data import DataLoader

    from cxrtune.data.dataset import seed_worker

    df = pd.concat([manifest.load_manifest(str(phantom_dir / "manifest.parquet")).head(1)] * 8)  # one image, 8 times

    def epoch(seed: int, workers: int) -> torch.Tensor:
        ds = CXRDataset(df, Preprocessing(size=64), augment=True, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, generator=gen, worker_init_fn=seed_worker)
        return torch.cat([b["image"] for b in loader])

    assert torch.equal(epoch(0, 0), epoch(0, 0))
    assert not torch.equal(epoch(0, 0), epoch(1, 0))
    a, b = epoch(0, 2), epoch(0, 2)
    assert torch.equal(a, b)
    assert not torch.equal(a[:4], a[4:])  # same image: equal batches would mean the workers share draws
