"""Inference: preprocessing, bundle artifacts, lung zones, the scoring policy, batch scoring,
overlays, calibration and evaluation, agreement statistics, the ONNX runtime. Nothing here
imports training (``cxrtune.model.train``) or the training dataset."""
