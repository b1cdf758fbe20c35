"""Losses for segmentation: Dice, binary and multi-class cross-entropy (see :mod:`deepscope.losses.segmentation`)."""
