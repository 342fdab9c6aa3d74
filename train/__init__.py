"""Training entry points (``python train/train.py``). Not part of the installed package."""
