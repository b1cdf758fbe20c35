"""Segmentation data: image and label pairs, patches, augmentation, label checks and the training targets."""
