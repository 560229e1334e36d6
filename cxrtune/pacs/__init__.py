"""cxrtune and a PACS: results written as DICOM objects a PACS stores and a viewer reads
(``results``: a TID 1500 measurement report and a binary segmentation, docs/pacs.md)."""
