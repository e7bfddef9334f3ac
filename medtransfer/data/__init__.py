"""Scan discovery, DICOM/NIfTI/PNG decoding, manifests, splits, transforms and datasets."""
