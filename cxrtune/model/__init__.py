"""Models and their training: the SMP model factory, checkpoint and bundle metadata (artifacts),
losses, metrics, the segmentation trainer, and the classification track's classifiers, recipe and
per-lung grading."""
