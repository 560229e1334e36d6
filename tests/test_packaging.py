"""The wheel cluster.yaml installs carries serve/, search_spaces/ and configs/, and cxrtune finds
them in an installed wheel, away from the source tree."""

import re
import subprocess
import sys
import zipfile

import pytest

import cxrtune
from cxrtune.errors import CxrtuneError
from cxrtune.resources import shipped
from tests.conftest import ROOT


def test_shipped_files_in_the_source_tree():
    assert shipped("serve", "config.cpu.yaml") == ROOT / "serve" / "config.cpu.yaml"
    assert shipped("search_spaces", "lung_segmentation") == ROOT / "search_spaces" / "lung_segmentation.yaml"
    with pytest.raises(CxrtuneError, match="no shipped search_spaces/nope; shipped: disease_cpu.yaml, disease_segmentation.yaml"):
        shipped("search_spaces", "nope")


@pytest.mark.slow
def test_the_wheel_carries_and_finds_them(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("cxrtune-*.whl"))
    assert wheel.name == f"cxrtune-{cxrtune.__version__}-py3-none-any.whl"  # pyproject reads the one version
    installed = re.findall(r"cxrtune-[^/\s]+\.whl", (ROOT / "cluster.yaml").read_text())
    assert installed and set(installed) == {wheel.name}  # the wheel cluster.yaml installs is this one
    names = zipfile.ZipFile(wheel).namelist()
    for kind, name in (("serve", "config.yaml"), ("serve", "config.cpu.yaml"),
                       ("search_spaces", "lung_segmentation.yaml"), ("search_spaces", "disease_segmentation.yaml"),
                       ("search_spaces", "disease_cpu.yaml"),
                       ("configs", "lung_deeplabv3plus_effb1.yaml")):
        assert any(n.endswith(f".data/data/share/cxrtune/{kind}/{name}") for n in names), (kind, name)
    for module in ("cxrtune/py.typed", "cxrtune/serving/viewer.html", "cxrtune/serving/app.py", "cxrtune/scoring/scorer.py",
                   "cxrtune/storage.py", "cxrtune/model/train.py", "cxrtune/search/tuning.py",
                   "cxrtune/audit/gates.py"):  # every group and the viewer page the ingress serves
        assert module in names, module
    # installed as pip lays a wheel out under a prefix (unpacked by hand: `pip install --prefix`
    # would first uninstall the development copy from this environment)
    prefix = tmp_path / "prefix"
    site_dir = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if ".data/data/" in name:
                target = prefix / name.split(".data/data/", 1)[1]
            elif ".dist-info/" in name or ".data/" in name:
                continue
            else:
                target = site_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
    site = next(prefix.glob("lib/python*/site-packages"))
    probe = ("from cxrtune.resources import shipped; import cxrtune; "
             "print(cxrtune.__file__); print(shipped('serve', 'config.cpu.yaml')); "
             "print(shipped('search_spaces', 'disease_segmentation'))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    package, serve_cfg, space = r.stdout.split()
    assert package.startswith(str(site))  # the installed copy, not the checkout
    assert serve_cfg == str(prefix / "share" / "cxrtune" / "serve" / "config.cpu.yaml")
    assert space == str(prefix / "share" / "cxrtune" / "search_spaces" / "disease_segmentation.yaml")
