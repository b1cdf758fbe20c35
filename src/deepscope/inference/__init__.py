"""Applying trained models: tile geometry, tiled prediction, block-wise image I/O and rebuilding models from checkpoints."""
