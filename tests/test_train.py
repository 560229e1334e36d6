import json

import pytest
import torch

from cxrtune import manifest, storage
from cxrtune.errors import CxrtuneError
from cxrtune.losses import DynamicLossWeighting, segmentation_loss
from cxrtune.models import ARCHITECTURES, ModelConfig, build_model
from cxrtune.train import TrainConfig, train


def test_dlw_weights_follow_ratio_and_carry_no_gradient():
    dlw = DynamicLossWeighting(alpha=0.5)
    w = torch.tensor(2.0, requires_grad=True)
    first = {"seg": w * 2.0, "cls": w * 1.0}  # L0 = 4 and 2
    total = dlw(first)
    assert dlw.last_weights == {"seg": 1.0, "cls": 1.0}
    total.backward()
    assert w.grad.item() == pytest.approx(3.0)  # d/dw (2w + w), weights constant
    w.grad = None
    second = {"seg": w * 0.5, "cls": w * 0.5}  # L = 1 and 1: ratios 1/4 and 1/2
    total = dlw(second)
    assert dlw.last_weights["seg"] == pytest.approx(0.25 ** 0.5)
    assert dlw.last_weights["cls"] == pytest.approx(0.5 ** 0.5)
    total.backward()
    assert w.grad.item() == pytest.approx(0.5 * 0.5 + 0.5 * 0.5 ** 0.5)
    plain = DynamicLossWeighting(alpha=0)
    plain({"a": torch.tensor(3.0)})
    assert float(plain({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})) == 3.0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_builds_for_both_stages(arch):
    x = torch.zeros(1, 1, 128, 128)  # PAN needs at least 128 px
    seg = build_model(ModelConfig(arch=arch, encoder="resnet18"))
    with torch.no_grad():
        assert seg.eval()(x).shape == (1, 1, 128, 128)
        two = build_model(ModelConfig(arch=arch, encoder="resnet18", classification=True)).eval()
        mask, logit = two(x)
    assert mask.shape == (1, 1, 128, 128) and logit.shape == (1, 1)


def test_timm_encoder_and_local_weights(tmp_path):
    cfg = ModelConfig(arch="Unet", encoder="tu-resnet10t", in_channels=3)
    model = build_model(cfg)
    path = tmp_path / "enc.pt"
    torch.save(model.encoder.state_dict(), path)
    again = build_model(ModelConfig(arch="Unet", encoder="tu-resnet10t", in_channels=3, encoder_weights=str(path)))
    key = next(iter(model.encoder.state_dict()))
    assert torch.equal(again.encoder.state_dict()[key], model.encoder.state_dict()[key])


def test_bad_settings_name_the_key():
    with pytest.raises(CxrtuneError, match="unknown architecture 'Unett'"):
        build_model(ModelConfig(arch="Unett"))
    with pytest.raises(CxrtuneError, match="lrr"):
        TrainConfig.from_dict({"lrr": 1})
    with pytest.raises(CxrtuneError, match="unknown segmentation loss"):
        segmentation_loss("hinge")


def test_both_stages_train_checkpoint_and_resume(phantom_dir, bucket):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    base = {"model": {"arch": "FPN", "encoder": "resnet18"}, "size": 64, "batch_size": 4, "epochs": 2}
    seen = []
    import glob
    import tempfile

    staged = lambda: set(glob.glob(f"{tempfile.gettempdir()}/cxrtune-ckpt-*"))
    before = staged()
    lung = train(TrainConfig.from_dict({**base, "task": "lung"}), df, f"s3://{bucket}/runs/lung",
                 on_epoch=lambda m, d: seen.append((m["epoch"], sorted(p.name for p in d.iterdir()))))
    assert staged() == before  # no local staging left behind
    assert seen == [(1, ["meta.json", "model.pt", "state.pt"]), (2, ["meta.json", "model.pt", "state.pt"])]
    assert lung["epochs"] == 2 and 0 <= lung["history"][-1]["val_dice"] <= 1
    keys = set(storage.list_keys(f"s3://{bucket}/runs/lung/"))
    assert f"s3://{bucket}/runs/lung/checkpoints/epoch_0002/state.pt" in keys
    assert f"s3://{bucket}/runs/lung/checkpoints/epoch_0001/model.pt" in keys
    assert f"s3://{bucket}/runs/lung/checkpoints/epoch_0001/state.pt" not in keys  # only the newest resumes
    meta = json.loads(storage.read_text(f"s3://{bucket}/runs/lung/best/meta.json"))
    assert meta["config"]["task"] == "lung" and meta["preprocessing"]["size"] == 64
    resumed = train(TrainConfig.from_dict({**base, "task": "lung", "epochs": 3}), df,
                    f"s3://{bucket}/runs/lung", resume=True)
    assert resumed["epochs"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]

    disease = train(TrainConfig.from_dict({**base, "task": "disease", "dlw_alpha": 0.05}), df,
                    f"s3://{bucket}/runs/disease")
    last = disease["history"][-1]
    assert {"val_dice", "val_f1", "val_roc_auc", "val_dice_f1", "val_fp_rate_empty"} <= set(last)


def test_unannotated_masks_stay_out_of_the_segmentation_loss(phantom_dir):
    from cxrtune.train import Trainer

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    trainer = Trainer(TrainConfig.from_dict({"task": "disease", "model": {"arch": "FPN", "encoder": "resnet18"},
                                             "size": 64, "seg_loss": "bce"}), df)
    seg = torch.randn(4, 1, 64, 64)
    cls = torch.randn(4, 1)
    batch = {"opacity_annotated": torch.tensor([True, False, True, False]),
             "opacity_mask": torch.zeros(4, 1, 64, 64), "label": torch.ones(4)}
    batch["opacity_mask"][1] = 1.0  # garbage in an unannotated row must not count
    losses = trainer._losses((seg, cls), batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(seg[[0, 2]], batch["opacity_mask"][[0, 2]])
    assert torch.isclose(losses["seg"], expected)
    none = {**batch, "opacity_annotated": torch.zeros(4, dtype=torch.bool)}
    assert trainer._losses((seg, cls), none)["seg"] is None  # the classifier still trains


def test_score_metrics():
    from cxrtune.metrics import json_safe, score_metrics

    m = score_metrics([0, 1, 2, 3], [0, 1, 2, 4])
    assert m["mae"] == 0.25 and m["rmse"] == 0.5 and m["pearson"] > 0.9
    assert 0 < m["kappa_linear"] <= 1 and 0 < m["kappa_quadratic"] <= 1
    assert json_safe({"a": float("nan"), "b": [np_float(1.5)]}) == {"a": None, "b": [1.5]}


def np_float(x):
    import numpy as np

    return np.float32(x)
