"""Data: the synthetic scene world, image-caption pairs, and segmentation benchmark readers."""
