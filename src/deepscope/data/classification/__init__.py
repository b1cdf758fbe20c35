"""Classification data: class folders and NPZ arrays, batch augmentation, and the loaders that feed them."""
