"""Audits of what a model looks at: seed 001's ROI Hide-and-Seek (``hide_and_seek``) and seed
000's Heatmap Concordance Score (``heatmaps``), run as commands and as release gates."""
