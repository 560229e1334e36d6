"""Data in: local and S3 storage, image and DICOM decoding, the manifest, importers, reader grades,
splits, the training dataset and synthetic phantoms."""
