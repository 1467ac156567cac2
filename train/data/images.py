"""Image training data (folder per class, or folder + labels CSV)."""
