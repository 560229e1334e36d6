"""The package's layers hold: import-linter's contracts (pyproject.toml), every module in a layer,
and no function-local import that hides a dependency (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cxrtune"

# Third-party modules a function may import locally, and why: each is heavy to import (or
# optional), and only some code paths need it. (The CLI imports the library at its top, so a
# command still loads torch and ray.tune: --help takes ~7 s; docs/BENCHMARKS.md.)
LOCAL_THIRD_PARTY = {
    "ray": "Ray's submodules (schedulers, the Serve SDK, the dashboard client, ray.init): loaded by the "
           "functions that use them; the bottom layer's cluster.py must not load Ray on import",
    "optuna": "Optuna: only sweeps and their reports",
    "matplotlib": "plots of evaluate and report only; the Agg backend is chosen before pyplot loads",
    "sklearn": "scikit-learn (~0.5 s): metrics and folds, not needed to score",
    "scipy": "scipy.stats: bootstrap intervals and correlations of evaluate only",
    "segmentation_models_pytorch": "SMP and its timm encoders (~1 s): building a network, not reading metadata",
    "pydicom": "pydicom and its pixel handlers: only DICOM inputs",
    "onnxruntime": "optional at run time: the ONNX runtime is used only when a bundle has an export",
    "onnx": "ONNX export only",
    "pytorch_grad_cam": "Grad-CAM: audits only",
    "boto3": "boto3 (~0.4 s): only s3:// URIs",
    "botocore": "botocore's exceptions and config: only s3:// URIs, with boto3",
    "pyarrow": "pyarrow's S3 filesystem: only s3:// manifests",
    "wandb": "Weights & Biases: only sweeps that log to it",
}


def _contracts() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def _local_imports(path: Path):
    """(line, module) of every import inside a function body; relative modules keep their dots."""
    tree = ast.parse(path.read_text())
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    yield from ((node.lineno, a.name) for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    yield node.lineno, "." * node.level + (node.module or "")


def test_import_linter_contracts_are_kept():
    """Layers and "inference never imports training", as import-linter checks them."""
    lint = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout
    ids = {c["id"] for c in _contracts()["contracts"]}
    assert ids == {"layers", "inference-never-imports-training"}
    assert all("ignore_imports" not in c for c in _contracts()["contracts"])  # none without a written reason


def test_every_module_is_in_a_layer():
    layers = next(c for c in _contracts()["contracts"] if c["id"] == "layers")["layers"]
    named = {m.strip() for layer in layers for m in layer.replace("|", ":").split(":")}
    modules = {f"cxrtune.{p.stem}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"cxrtune.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert modules == named, (sorted(modules - named), sorted(named - modules))


def test_no_local_imports_of_cxrtune_modules():
    """A dependency between cxrtune's modules is stated at the top of the module, where
    import-linter and a reader see it; a function-local import was a way around a cycle."""
    found = [f"{p.relative_to(ROOT)}:{line} {mod}" for p in sorted(PACKAGE.rglob("*.py"))
             for line, mod in _local_imports(p) if mod.startswith(".") or mod.split(".")[0] == "cxrtune"]
    assert not found, found


def test_local_third_party_imports_are_heavy_ones_with_a_reason():
    found = [f"{p.relative_to(ROOT)}:{line} {mod}" for p in sorted(PACKAGE.rglob("*.py"))
             for line, mod in _local_imports(p)
             if not mod.startswith(".") and mod.split(".")[0] not in LOCAL_THIRD_PARTY.keys() | {"cxrtune"}]
    assert not found, f"import these at the module's top (or add the module with its reason): {found}"


def test_every_torch_load_is_weights_only():
    """Checkpoints, bundles and training state come from storage another node can write: every
    ``torch.load`` in the package passes ``weights_only=True`` (no pickled object runs code)."""
    calls = []
    for path in (ROOT / "cxrtune").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert len(calls) >= 3  # model weights, bundle stages, training state
    assert [c for c, safe in calls if not safe] == []
