"""Inference: the scoring policy, batch scoring, overlays, calibration and evaluation, agreement
statistics, the ONNX runtime and export. Nothing here imports training (an import-linter contract)."""
