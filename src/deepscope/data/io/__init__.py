"""Image and volume I/O every task shares: readers, probing, split folders, lazy volumes and normalised views."""
