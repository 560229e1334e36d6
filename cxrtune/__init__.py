"""cxrtune: hyperparameter search on Ray for chest X-ray severity scoring."""

__version__ = "0.2.0"
