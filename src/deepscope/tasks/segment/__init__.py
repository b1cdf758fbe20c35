"""Semantic and instance segmentation: config, task, prediction of whole images, plan of defaults, report."""
