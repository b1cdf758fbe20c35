"""Self-supervised data: unlabelled image sets and the paired augmented views."""
