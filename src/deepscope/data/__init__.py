"""Data: readers for images on disk, splits, in-memory loaders and batched augmentation."""
