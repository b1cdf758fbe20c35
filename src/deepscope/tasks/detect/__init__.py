"""Object detection: config, task, inference (whole and tiled), outputs, report."""
