"""Evaluation: FID (fid.py), the FID Inception v3 (inception.py), classifier-FID (classifier.py)."""
