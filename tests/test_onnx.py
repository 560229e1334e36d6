"""The CPU fast path: a bundle exported to ONNX scores like the torch bundle."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cxrtune import images
from cxrtune.errors import CxrtuneError
from cxrtune.model.metrics import agreement_dice
from cxrtune.scoring.onnx_export import calibration_sample


@pytest.fixture(scope="module")
def exported(phantom_bundle, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("onnx") / "bundle"
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "bundle", "export", "onnx", str(phantom_bundle),
                        "--out", str(bundle)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    yield bundle
    shutil.rmtree(bundle.parent, ignore_errors=True)


@pytest.mark.slow
def test_export_is_recorded_and_auto_picks_onnx_on_cpu(exported):
    from cxrtune.scoring.scorer import load_bundle

    meta = json.loads((exported / "bundle.json").read_text())
    assert set(meta["onnx"]) >= {"lung", "disease", "opset"}
    assert (exported / "lung.onnx").stat().st_size > 1000 and (exported / "disease.onnx").stat().st_size > 1000
    assert load_bundle(str(exported), device="cpu").runtime == "onnx"
    assert load_bundle(str(exported), device="cpu", runtime="torch").runtime == "torch"


@pytest.mark.slow
def test_torch_and_onnx_give_the_same_records_and_masks(exported, phantom_dir):
    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.scorer import load_bundle

    scans = [load_scan(p.read_bytes()) for p in sorted((phantom_dir / "images").iterdir())[:8]]
    by_torch = load_bundle(str(exported), device="cpu", runtime="torch").score_scans(scans)
    by_onnx = load_bundle(str(exported), device="cpu", runtime="onnx").score_scans(scans)
    lung_found = 0
    for (rec_t, det_t), (rec_o, det_o) in zip(by_torch, by_onnx):
        assert rec_t["status"] == rec_o["status"] and rec_t["score"] == rec_o["score"]
        assert agreement_dice(det_t.lung, det_o.lung) >= 0.999
        assert agreement_dice(det_t.opacity, det_o.opacity) >= 0.999
        if rec_t["disease_probability"] is not None:
            assert rec_o["disease_probability"] == pytest.approx(rec_t["disease_probability"], abs=1e-3)
        lung_found += int(det_t.lung.any())
    # unrefined opacity masks too (the classifier gate can flip a whole mask when p is near T_cls)
    images = [s.image for s in scans]
    lungs = [d.lung for _, d in by_torch]
    raw_t = load_bundle(str(exported), device="cpu", runtime="torch").with_thresholds(cls=0.0).opacity_masks(images, lungs)
    raw_o = load_bundle(str(exported), device="cpu", runtime="onnx").with_thresholds(cls=0.0).opacity_masks(images, lungs)
    for (m_t, p_t), (m_o, p_o) in zip(raw_t, raw_o):
        assert agreement_dice(m_t, m_o) >= 0.999 and abs(p_t - p_o) < 1e-3
    # the parity means something only if the trained models find lungs and opacity
    assert lung_found == len(scans) and sum(int(m.any()) for m, _ in raw_t) >= 2, lung_found


@pytest.mark.slow
def test_a_stale_export_is_refused(exported, tmp_path):
    from cxrtune.scoring.scorer import load_bundle

    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    load_bundle(str(stale), device="cpu", runtime="onnx")  # the export of these very weights: used
    import torch

    state = torch.load(stale / "lung.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01  # retrained weights beside the old export
    torch.save(state, stale / "lung.pt")
    with pytest.raises(CxrtuneError, match="lung.onnx was exported from other weights"):
        load_bundle(str(stale), device="cpu", runtime="onnx")
    shutil.copy(exported / "lung.pt", stale / "lung.pt")
    load_bundle(str(stale), device="cpu", runtime="onnx")
    shutil.copy(exported / "disease.onnx", stale / "lung.onnx")  # not the file bundle.json records
    with pytest.raises(CxrtuneError, match="lung.onnx is not the file bundle.json records"):
        load_bundle(str(stale), device="cpu", runtime="onnx")
    with pytest.raises(CxrtuneError, match="has no ONNX export"):
        from cxrtune.scoring.scorer import load_bundle as lb

        plain = tmp_path / "plain"
        shutil.copytree(exported, plain)
        meta = json.loads((plain / "bundle.json").read_text())
        meta["onnx"] = {}
        (plain / "bundle.json").write_text(json.dumps(meta))
        lb(str(plain), device="cpu", runtime="onnx")


@pytest.fixture(scope="module")
def int8_exported(exported, phantom_dir, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("int8") / "bundle"
    r = subprocess.run([sys.executable, "-m", "cxrtune.cli", "bundle", "export", "onnx-int8", str(exported),
                        "--out", str(bundle),
                        "--calibration", str(phantom_dir / "images"), "--calibration-limit", "12"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibrated on 12 radiographs" in r.stdout, r.stdout
    yield bundle
    shutil.rmtree(bundle.parent, ignore_errors=True)


@pytest.mark.slow
def test_int8_export_is_opt_in_and_close_to_fp32(int8_exported, phantom_dir):
    """int8 runs only when asked for, and on the phantoms its masks stay close to FP32's (the
    real-data parity is in docs/BENCHMARKS.md)."""
    from cxrtune.preprocessing import load_scan
    from cxrtune.scoring.scorer import load_bundle

    meta = json.loads((int8_exported / "bundle.json").read_text())["onnx"]
    assert meta["int8"]["calibration_images"] == 12
    assert meta["int8"]["lung"]["onnx_sha256"] == meta["lung"]["sha256"]
    assert load_bundle(str(int8_exported), device="cpu").runtime == "onnx"  # auto never picks int8
    held_out = sorted((phantom_dir / "images").iterdir())[1::2][:8]  # calibration took every other file from 0
    scans = [load_scan(p.read_bytes()) for p in held_out]
    fp32 = load_bundle(str(int8_exported), device="cpu", runtime="onnx")
    int8 = load_bundle(str(int8_exported), device="cpu", runtime="onnx-int8")
    assert int8.runtime == "onnx-int8"
    by_fp32, by_int8 = fp32.score_scans(scans), int8.score_scans(scans)
    lung = [agreement_dice(a.lung, b.lung) for (_, a), (_, b) in zip(by_fp32, by_int8)]
    images, lungs = [s.image for s in scans], [d.lung for _, d in by_fp32]
    raw = list(zip(fp32.with_thresholds(cls=0.0).opacity_masks(images, lungs),
                   int8.with_thresholds(cls=0.0).opacity_masks(images, lungs)))
    opacity = [agreement_dice(a, b) for (a, _), (b, _) in raw if a.any() or b.any()]
    assert min(lung) >= 0.97, lung
    assert len(opacity) >= 2 and np.mean(opacity) >= 0.9, opacity
    assert max(abs(pa - pb) for (_, pa), (_, pb) in raw) < 0.1


@pytest.mark.slow
def test_a_stale_int8_export_is_refused(int8_exported, tmp_path):
    from cxrtune.scoring.onnx_export import export_bundle
    from cxrtune.scoring.scorer import load_bundle

    stale = tmp_path / "stale"
    shutil.copytree(int8_exported, stale)
    shutil.copy(stale / "lung.onnx", stale / "lung.int8.onnx")  # not the file bundle.json records
    with pytest.raises(CxrtuneError, match="lung.int8.onnx is not the int8 copy"):
        load_bundle(str(stale), device="cpu", runtime="onnx-int8")
    shutil.copy(stale / "disease.onnx", stale / "lung.onnx")  # a changed file is never carried on
    with pytest.raises(CxrtuneError, match="lung.onnx does not match the SHA-256"):
        export_bundle(str(stale), str(tmp_path / "from-stale"))
    assert not (tmp_path / "from-stale").exists()
    export_bundle(str(int8_exported), str(tmp_path / "again"))  # a new FP32 export: the int8 copy no longer describes it
    assert not list((tmp_path / "again").glob("*.int8.onnx"))  # and is not carried on
    with pytest.raises(CxrtuneError, match="no int8 export"):
        load_bundle(str(tmp_path / "again"), device="cpu", runtime="onnx-int8")


def test_int8_calibration_sample_spreads_over_every_input_and_skips_unreadable(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for i in range(10):
            images.write_png(str(tmp_path / folder / f"{i:02d}.png"), np.full((8, 8), i, np.uint8))
    (tmp_path / "b" / "99.png").symlink_to(tmp_path / "gone.png")  # listed, but unreadable
    sample = calibration_sample([str(tmp_path / "a"), str(tmp_path / "b")], limit=5)
    expected = [(tmp_path / "a" / f"{i:02d}.png").read_bytes() for i in (0, 4, 8)]
    expected += [(tmp_path / "b" / f"{i:02d}.png").read_bytes() for i in (2, 6)]
    assert sample == expected  # every 4th of the 21 files: both folders, not the first five of one
    short = calibration_sample([str(tmp_path / "b")], limit=8)  # 11 files, every one; the broken one skipped
    assert len(short) == 8 and all(s.startswith(b"\x89PNG") for s in short)
    with pytest.raises(CxrtuneError, match="at least"):
        calibration_sample([str(tmp_path / "a")], limit=2)
