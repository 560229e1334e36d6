"""Data in: the manifest, importers, reader grades, splits, the training dataset and synthetic
phantoms (storage and decoding are in the bottom layer: cxrtune.storage, .images, .dicom)."""
