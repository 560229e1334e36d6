import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrtune import storage
from cxrtune.data import manifest
from cxrtune.errors import CxrtuneError
from cxrtune.model.losses import DynamicLossWeighting, segmentation_loss
from cxrtune.model.models import ARCHITECTURES, ModelConfig, build_model
from cxrtune.model.train import TrainConfig, train


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
    for budget in (0, -3.5):  # a spent budget is an error, not "no budget"
        with pytest.raises(CxrtuneError, match="max_minutes must be > 0"):
            TrainConfig.from_dict({"max_minutes": budget})
    with pytest.raises(CxrtuneError, match="monitor must name a validation metric"):
        TrainConfig.from_dict({"monitor": "train_loss"})  # best/ would follow the training loss
    with pytest.raises(CxrtuneError, match="size must be a multiple of 32, got 300"):
        TrainConfig.from_dict({"size": 300})  # FPN, Linknet, DeepLabV3+... fail on it at the first batch


def test_both_stages_train_checkpoint_and_resume(phantom_dir, bucket):
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    base = {"model": {"arch": "FPN", "encoder": "resnet18"}, "size": 64, "batch_size": 4, "epochs": 2}
    seen = []
    import glob
    import tempfile

    def staged():
        return set(glob.glob(f"{tempfile.gettempdir()}/cxrtune-ckpt-*"))
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
    # an upload of epoch 3 cut off half-way (its completion marker, meta.json, never written)
    state2 = storage.read_bytes(f"s3://{bucket}/runs/lung/checkpoints/epoch_0002/state.pt")
    storage.write_bytes(f"s3://{bucket}/runs/lung/checkpoints/epoch_0003/model.pt", b"partial")
    storage.write_bytes(f"s3://{bucket}/runs/lung/checkpoints/epoch_0003/state.pt", state2[: len(state2) // 2])
    resumed = train(TrainConfig.from_dict({**base, "task": "lung", "epochs": 3}), df,
                    f"s3://{bucket}/runs/lung", resume=True)  # from epoch 2, the last complete one
    assert resumed["epochs"] == 3 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]

    # a state.pt planted in the bucket holds a pickled object: refused, never run
    ran = Path(tempfile.mkdtemp()) / "payload-ran"
    torch.save({"epoch": 3, "payload": _Payload(str(ran))}, buf := io.BytesIO())
    storage.write_bytes(f"s3://{bucket}/runs/lung/checkpoints/epoch_0003/state.pt", buf.getvalue())
    with pytest.raises(CxrtuneError, match="refused"):
        train(TrainConfig.from_dict({**base, "task": "lung", "epochs": 4}), df, f"s3://{bucket}/runs/lung", resume=True)
    assert not ran.exists()

    disease = train(TrainConfig.from_dict({**base, "task": "disease", "dlw_alpha": 0.05}), df,
                    f"s3://{bucket}/runs/disease")
    last = disease["history"][-1]
    assert {"val_dice", "val_f1", "val_roc_auc", "val_dice_f1", "val_fp_rate_empty"} <= set(last)


class _Payload:
    """What an attacker pickles into a checkpoint: unpickling it creates a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unannotated_masks_stay_out_of_the_segmentation_loss(phantom_dir):
    from cxrtune.model.train import Trainer

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


def test_json_safe():
    from cxrtune.jsonsafe import json_safe

    assert json_safe({"a": float("nan"), "b": [np_float(1.5)]}) == {"a": None, "b": [1.5]}


def np_float(x):
    import numpy as np

    return np.float32(x)


def test_dlw_initial_loss_waits_for_a_nonempty_target_and_weights_stay_bounded():
    dlw = DynamicLossWeighting(alpha=0.5)
    # first batch: only annotated-empty opacity masks; the Dice loss on them is ~0
    dlw({"seg": torch.tensor(1e-7), "cls": torch.tensor(0.7)}, {"seg": False, "cls": True})
    assert "seg" not in dlw.initial and dlw.initial["cls"] == pytest.approx(0.7)
    assert dlw.last_weights["seg"] == 1.0
    dlw({"seg": torch.tensor(0.8), "cls": torch.tensor(0.7)}, {"seg": True, "cls": True})
    assert dlw.initial["seg"] == pytest.approx(0.8)
    dlw({"seg": torch.tensor(800.0), "cls": torch.tensor(1e-6)})
    assert dlw.last_weights == {"seg": 10.0, "cls": 0.1}  # clipped to [0.1, 10]


def test_trainer_never_takes_l0_from_an_empty_target(phantom_dir):
    """A first epoch of annotated-empty masks only (normal phantoms): no L0 for the opacity task."""
    from cxrtune.model.train import Trainer

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    normals = df[df["label"] == "normal"].assign(split="train")
    df = __import__("pandas").concat([normals, df[df["split"] == "val"]], ignore_index=True)
    trainer = Trainer(TrainConfig.from_dict({"task": "disease", "size": 64, "batch_size": 4, "epochs": 1,
                                             "model": {"arch": "FPN", "encoder": "resnet18"}}), df)
    trainer.train_epoch()
    assert "seg" not in trainer.dlw.initial and "cls" in trainer.dlw.initial
    assert trainer.dlw.last_weights["seg"] == 1.0


def test_best_is_the_best_epoch_and_min_delta_only_drives_patience(phantom_dir, tmp_path, monkeypatch, capsys):
    from cxrtune.model.train import Trainer

    values = iter([0.50, 0.505, 0.503, 0.99])
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, progress=False: {"train_loss": 1.0})
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_dice": next(values), "val_loss": 1.0})
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    cfg = TrainConfig.from_dict({"task": "lung", "size": 64, "epochs": 4, "patience": 2, "min_delta": 0.01,
                                 "model": {"arch": "FPN", "encoder": "resnet18"}})
    summary = train(cfg, df, str(tmp_path / "run"), progress=True)
    # epoch 2 beat epoch 1 by less than min_delta: not progress (patience runs out after epoch 3),
    # but it is the best epoch, and best/ holds it
    assert summary["epochs"] == 3 and summary["best"] == {"value": 0.505, "epoch": 2}
    assert json.loads((tmp_path / "run" / "best" / "meta.json").read_text())["epoch"] == 2
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    assert lines[1].startswith("epoch 2: val_dice=0.5050 train_loss=1.0000")


def test_a_loss_monitor_is_minimised(phantom_dir, tmp_path, monkeypatch):
    from cxrtune.model.train import Trainer

    losses = iter([0.9, 0.6, 0.7])
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, progress=False: {"train_loss": 1.0})
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_dice": 0.5, "val_loss": next(losses, 1.0)})
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    cfg = TrainConfig.from_dict({"task": "lung", "size": 64, "epochs": 3, "monitor": "val_loss",
                                 "model": {"arch": "FPN", "encoder": "resnet18"}})
    assert cfg.monitor_mode == "min" and TrainConfig().monitor == "val_dice"
    assert TrainConfig.from_dict({"task": "disease"}).monitor == "val_dice_f1"
    summary = train(cfg, df, str(tmp_path / "run"))
    assert summary["best"] == {"value": 0.6, "epoch": 2}
    # a new run into that folder is refused: its epochs would mix with these, a later --resume would
    # take this run's newest checkpoint for its own
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(CxrtuneError, match="run holds a run already: choose another folder"):
        train(cfg, df, str(tmp_path / "run"))
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    (tmp_path / "partial" / "checkpoints" / "epoch_0001").mkdir(parents=True)  # a killed run's first epoch
    (tmp_path / "partial" / "checkpoints" / "epoch_0001" / "model.pt").write_bytes(b"weights")
    with pytest.raises(CxrtuneError, match="holds a run already"):
        train(cfg, df, str(tmp_path / "partial"))
    bad = TrainConfig.from_dict({"task": "lung", "size": 64, "epochs": 1, "monitor": "val_f1",
                                 "model": {"arch": "FPN", "encoder": "resnet18"}})
    with pytest.raises(CxrtuneError, match="monitor 'val_f1' is not a validation metric of a lung run"):
        train(bad, df, str(tmp_path / "bad"))


def test_encoder_transfer_from_a_cxrtune_run(tmp_path):
    """Stage II can start from the Stage I encoder a run trained (no hub download needed)."""
    from cxrtune.model.artifacts import CheckpointMeta  # noqa: F401  (the run layout the trainer writes)

    lung = build_model(ModelConfig(arch="Unet", encoder="resnet18"))
    (tmp_path / "run" / "best").mkdir(parents=True)
    torch.save(lung.state_dict(), tmp_path / "run" / "best" / "model.pt")
    two = build_model(ModelConfig(arch="Unet", encoder="resnet18", classification=True,
                                  encoder_weights=str(tmp_path / "run")))
    for key, value in lung.encoder.state_dict().items():
        assert torch.equal(two.encoder.state_dict()[key], value), key
    fresh = build_model(ModelConfig(arch="Unet", encoder="resnet18", classification=True))
    assert not torch.equal(fresh.encoder.conv1.weight, lung.encoder.conv1.weight)
    with pytest.raises(CxrtuneError, match="other shapes"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", in_channels=3,
                                encoder_weights=str(tmp_path / "run" / "best" / "model.pt")))
    with pytest.raises(CxrtuneError, match="tensors are not in it .*another encoder"):  # half random, unsaid
        build_model(ModelConfig(arch="Unet", encoder="resnet34", encoder_weights=str(tmp_path / "run")))


def test_patience_rule_is_shared_with_the_tune_stopper():
    from cxrtune.search.tuning import PatienceStopper

    stopper = PatienceStopper("val_dice", "max", min_delta=0.01, patience=2)
    assert [stopper("t", {"val_dice": v}) for v in (0.50, 0.505, 0.503)] == [False, False, True]
    low = PatienceStopper("val_score_mae", "min", min_delta=0.01, patience=1)
    assert [low("t", {"val_score_mae": v}) for v in (1.0, 0.5, 0.499)] == [False, False, True]


def test_unlabelled_rows_never_train_the_classifier(phantom_dir):
    from cxrtune.model.train import select_rows

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    df.loc[df.index[:3], "label"] = ""
    rows = select_rows(df, TrainConfig.from_dict({"task": "disease"}), "train")
    assert (rows["label"] != "").all() and len(rows) == (df[df.split == "train"]["label"] != "").sum()
    train = df[(df.split == "train") & (df.label != "")].index
    df.loc[train[:2], "lung_mask"] = ""  # no lungs to crop to: Stage II would see the whole radiograph
    rows = select_rows(df, TrainConfig.from_dict({"task": "disease"}), "train")
    assert set(rows.index) == set(train[2:])


def test_a_last_batch_of_one_image_is_left_to_the_next_epoch(phantom_dir):
    """DeepLabV3+'s decoder has BatchNorm after a global pool, which fails on a batch of one in
    training mode: a train set one image over a whole number of batches trains without it."""
    from cxrtune.model.train import Trainer, select_rows

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    base = {"task": "lung", "size": 64, "epochs": 1, "augment": False,
            "model": {"arch": "DeepLabV3Plus", "encoder": "resnet18"}}
    n = len(select_rows(df, TrainConfig.from_dict(base), "train"))
    cfg = TrainConfig.from_dict({**base, "batch_size": n - 1})  # n = (n - 1) + 1
    trainer = Trainer(cfg, df)
    assert trainer.train_loader.drop_last and len(trainer.train_loader) == 1
    trainer.fit()


def test_a_tuning_subset_asked_of_a_manifest_without_one_is_refused(phantom_dir):
    """A shipped space tunes on the manifest's tuning subset: a manifest that marks none is refused,
    not trained on whole at several times the compute the space was sized for."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.model.train import select_rows

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    cfg = TrainConfig.from_dict({"task": "lung", "tuning_subset": True})
    with pytest.raises(CxrtuneError, match="marks no tuning subset .*--tuning-fraction"):
        select_rows(df.drop(columns=["tuning"], errors="ignore"), cfg, "train")
    marked = df.assign(tuning=[i % 2 == 0 for i in range(len(df))])
    rows = select_rows(marked, cfg, "train")
    assert rows["tuning"].all() and len(rows) == (marked[marked.split == "train"]["tuning"]).sum()


def test_eval_only_rows_never_train(phantom_dir):
    """Reader-graded reference sets (brixia-dev) are for calibration and evaluation only."""
    from cxrtune.model.train import select_rows

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    df["eval_only"] = False
    train_rows = df.index[df.split == "train"]
    df.loc[train_rows[:4], "eval_only"] = True
    for task in ("lung", "disease"):
        rows = select_rows(df, TrainConfig.from_dict({"task": task}), "train")
        assert not rows.index.isin(train_rows[:4]).any() and len(rows) == len(train_rows) - 4


def test_ema_is_what_is_validated_checkpointed_and_resumed(phantom_dir, tmp_path):
    """``ema_decay``: after every optimiser step the average moves by (1 - decay) toward the weights,
    decay warmed up as min(decay, (1 + n) / (10 + n)) at the n-th update (the first step copies
    them); checkpoints' model.pt hold the average, state.pt resumes it."""
    from cxrtune.model.train import Trainer

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    cfg = TrainConfig.from_dict({"task": "lung", "size": 64, "batch_size": 4, "epochs": 1, "ema_decay": 0.6,
                                 "model": {"arch": "FPN", "encoder": "resnet18"}})
    trainer = Trainer(cfg, df)
    name = "segmentation_head.0.weight"
    weights, step = [], trainer.optimizer.step

    def recording_step(*a, **kw):
        out = step(*a, **kw)
        weights.append(dict(trainer.model.named_parameters())[name].detach().clone())
        return out

    trainer.optimizer.step = recording_step
    trainer.train_epoch()
    assert len(weights) >= 2
    expected = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        decay = min(0.6, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * w
    averaged = dict(trainer.eval_model.named_parameters())[name]
    assert torch.allclose(averaged, expected, atol=1e-6)
    assert not torch.allclose(averaged, weights[-1], atol=1e-6)  # the average, not the last weights
    bn = "encoder.bn1.running_mean"  # batch-norm statistics are averaged too
    assert not torch.allclose(trainer.eval_model.state_dict()[bn], trainer.model.state_dict()[bn])

    metrics = trainer.validate()
    ckpt = trainer.write_checkpoint(tmp_path / "ckpt", metrics)
    saved = torch.load(ckpt / "model.pt", weights_only=True)
    assert torch.equal(saved[name], averaged.detach())
    fresh = Trainer(cfg, df)
    fresh.load_state(torch.load(ckpt / "state.pt", weights_only=False))
    assert torch.equal(dict(fresh.eval_model.named_parameters())[name], averaged)
    assert fresh.validate()["val_loss"] == pytest.approx(metrics["val_loss"])
    fresh.ema = None  # the raw weights validate differently: validation ran the average
    assert fresh.validate()["val_loss"] != pytest.approx(metrics["val_loss"], rel=1e-4)
    with pytest.raises(CxrtuneError, match="no weight average"):
        Trainer(cfg, df).load_state({**torch.load(ckpt / "state.pt", weights_only=False), "ema": None})
    with pytest.raises(CxrtuneError, match="carries a weight average"):
        Trainer(TrainConfig.from_dict({**cfg.to_dict(), "ema_decay": 0.0}), df).load_state(
            torch.load(ckpt / "state.pt", weights_only=False))
    with pytest.raises(CxrtuneError, match="ema_decay must be in"):
        TrainConfig.from_dict({"ema_decay": 1.0})


def test_cpu_amp_trains_the_convolutions_in_bf16_only_when_asked(phantom_dir):
    """``cpu_amp`` turns bf16 autocast on for a CPU run (what bench/accuracy.py uses where the CPU
    computes bf16 natively); without it a CPU run stays in float32. The weights stay float32."""
    from cxrtune.model.train import Trainer

    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    for cpu_amp, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        cfg = TrainConfig.from_dict({"task": "disease", "size": 64, "batch_size": 4, "epochs": 1, "cpu_amp": cpu_amp,
                                     "max_train_images": 8, "max_val_images": 4,
                                     "model": {"arch": "Unet", "encoder": "resnet18"}})
        trainer = Trainer(cfg, df)
        seen = []
        hook = trainer.model.encoder.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        losses = trainer.train_epoch()
        hook.remove()
        assert seen and set(seen) == {dtype}, (cpu_amp, set(seen))
        assert np.isfinite(losses["train_loss"])
        assert trainer.model.encoder.conv1.weight.dtype == torch.float32
        assert np.isfinite(trainer.validate()["val_loss"])


def test_epoch_folders_of_killed_processes_are_removed(tmp_path, monkeypatch):
    """A process killed hard never runs fit's clean-up: the next fit (and a sweep's end) removes
    the epoch folders no live process holds, and only those."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from cxrtune.model.train import STAGING_PREFIX, remove_orphaned_staging, staging_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom cxrtune.model.train import staging_dir\n"
         "with staging_dir() as p:\n    (p / 'epoch_0003').mkdir()\n    print(p, flush=True)\n    time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        theirs = Path(holder.stdout.readline().strip())
        unrelated = tmp_path / f"{STAGING_PREFIX}old_style"  # no lock file: not ours to judge
        unrelated.mkdir()
        with staging_dir() as mine:
            assert theirs.parent == tmp_path and (theirs / "epoch_0003").is_dir()
            assert remove_orphaned_staging() == 0 and theirs.exists()  # alive: kept
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            assert remove_orphaned_staging() == 1 and not theirs.exists()
            assert mine.exists() and unrelated.exists()  # a live fit's folder is never an orphan
    finally:
        holder.kill()
    assert not mine.exists()
    with staging_dir():  # its clean-up ran: nothing left to remove
        assert remove_orphaned_staging() == 0
