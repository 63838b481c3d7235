"""Data sets: built-in loaders, uploaded .npz files and image-folder archives."""
