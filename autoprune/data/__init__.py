"""Datasets and deterministic train/val/test splits (bundled digits, synthetic, ``.npz``, image
folders, torchvision sets), augmentation, the input recipe and the checks on user data."""
from .datasets import Dataset, DataSpec, load_data

__all__ = ["DataSpec", "Dataset", "load_data"]
